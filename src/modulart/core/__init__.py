"""The common ground every modulart operator stands on: hooks, selectors, FFN/MoE views, lifecycle, I/O."""
