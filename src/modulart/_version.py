"""The library version (single source of truth, read by hatch)."""

__version__ = "0.4.0"
