"""The live EMoE conversion: routing telemetry, the balance loss, state, ``to_dense()``.

Verbs (see :mod:`modulart.core.operator`):

- ``remove()`` / ``to_dense()``: drop the routing and go back to the dense FFNs. Both are the same
  action; ``to_dense()`` returns the model and says in its name what it is. With ``top_k <
  num_experts`` this *changes the function* (the routed model has no dense equivalent).
- ``merge_()``: function-preserving only when ``top_k == num_experts`` (routing selects every
  expert, so the routed model *is* the dense one); otherwise it raises
  :class:`~modulart.core.errors.UnsupportedOperationError`.
- ``state_dict()`` / ``load_state_dict()``: the labels and the conversion-time centroids of every
  converted FFN.
- ``expert_groups()``: the :class:`~modulart.core.neuron_groups.NeuronExperts` protocol that
  ``modulart.introspect`` reads.

Example:
    >>> import torch, modulart as mt
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    >>> x = torch.randn(5, 8); dense = model(x)
    >>> h = mt.emoe.apply(model, num_experts=4, top_k=2, layers="all")
    >>> h.merge_()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    modulart.core.errors.UnsupportedOperationError: EMoE with top_k = 2 < num_experts = 4 ...
    >>> dense_again = h.to_dense()                      # back to the dense FFNs (changes the function)
    >>> torch.equal(model(x), dense)
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from modulart.core.errors import IncompatibleArtifactError, UnsupportedOperationError
from modulart.core.neuron_groups import NeuronExpertSplit
from modulart.core.operator import AnyOperator, Handle
from modulart.core.types import StateDict, StateValue
from modulart.emoe.config import EMoEConfig
from modulart.emoe.layer import ConvertedFFN, RoutingStats

if TYPE_CHECKING:
    from modulart.emoe.operator import EMoEPlan

__all__ = ["EMoEHandle"]


class EMoEHandle(Handle[EMoEConfig]):
    """A live EMoE conversion: routing telemetry, the balance loss, state, ``to_dense()``.

    Attributes:
        layers: ``{ffn_path: ConvertedFFN}``, the routing state of every converted FFN (built here;
            :meth:`EMoE.install <modulart.emoe.EMoE.install>` only installs their hooks).
    """

    def __init__(self, model: nn.Module, operator: AnyOperator, config: EMoEConfig, plan: EMoEPlan) -> None:
        super().__init__(model, operator, config, plan)
        self.layers: dict[str, ConvertedFFN] = {f.path: ConvertedFFN(f, plan.labels[f.path], config) for f in plan.ffns}

    # --- telemetry ----------------------------------------------------------------------------
    def routing_stats(self) -> dict[str, RoutingStats]:
        """Per converted FFN: expert load, normalised selection entropy and stability since the last call."""
        return {path: layer.stats() for path, layer in self.layers.items()}

    def balance_loss(self) -> torch.Tensor:
        """``balance_loss_weight`` × the sum over layers of the last forward's balance loss (add it to yours)."""
        losses = [layer.last_balance_loss for layer in self.layers.values() if layer.last_balance_loss is not None]
        if not losses:
            return torch.zeros(())
        return self.config.balance_loss_weight * torch.stack(losses).sum()

    def labels(self) -> dict[str, torch.Tensor]:
        """Expert id of every neuron, per converted FFN (``[d_ff]`` int64)."""
        return {p: layer.groups.labels.clone() for p, layer in self.layers.items()}

    def expert_groups(self) -> dict[str, NeuronExpertSplit]:
        """The :class:`~modulart.core.neuron_groups.NeuronExperts` protocol: ``{ffn_path: split}``.

        ``centroids`` are the conversion-time router rows for ``router="frozen"`` and None otherwise
        (the router row is then each group's mean live key row); ``scores`` is the layer's router.
        """
        cfg = self.config
        return {
            path: NeuronExpertSplit(
                groups=layer.groups,
                centroids=layer.frozen if cfg.router == "frozen" else None,
                top_k=cfg.top_k,
                scores=layer.scores,
                needs_hidden=cfg.router == "oracle",
            )
            for path, layer in self.layers.items()
        }

    # --- state --------------------------------------------------------------------------------
    def state_dict(self) -> StateDict:
        """``{path}.labels`` (``[d_ff]`` int64) and ``{path}.centroids`` (``[N, d_model]`` fp32) per FFN."""
        out: StateDict = {}
        for p, layer in self.layers.items():
            out[f"{p}.labels"] = layer.groups.labels.detach().cpu()
            out[f"{p}.centroids"] = layer.frozen.detach().cpu()
        return out

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        """Restore what :meth:`state_dict` returned: every layer's labels and centroids.

        Raises:
            IncompatibleArtifactError: keys, types or shapes differ from this conversion's.
        """
        expected = {f"{p}.{what}" for p in self.layers for what in ("labels", "centroids")}
        if set(state) != expected:
            raise IncompatibleArtifactError(
                f"EMoE state keys differ: missing {sorted(expected - set(state))[:6]}, "
                f"unexpected {sorted(set(state) - expected)[:6]}"
            )
        n = self.config.num_experts
        splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for p, layer in self.layers.items():
            labels, centroids = state[f"{p}.labels"], state[f"{p}.centroids"]
            if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (layer.ffn.d_ff,):
                raise IncompatibleArtifactError(
                    f"{p}.labels: expected a ({layer.ffn.d_ff},) tensor, got {_shape(labels)}"
                )
            if not isinstance(centroids, torch.Tensor) or tuple(centroids.shape) != (n, layer.ffn.d_model):
                raise IncompatibleArtifactError(
                    f"{p}.centroids: expected a ({n}, {layer.ffn.d_model}) tensor, got {_shape(centroids)}"
                )
            splits[p] = (labels, centroids)
        for p, (labels, centroids) in splits.items():  # all checked first: nothing changes on a bad state
            self.layers[p].set_split(labels, centroids)

    # --- back to dense ------------------------------------------------------------------------
    def merge_(self) -> nn.Module:
        """Remove the routing where that preserves the function: only with ``top_k == num_experts``.

        With ``top_k == num_experts`` every token selects every expert, so the routed model is the
        dense one and removing the hooks changes nothing (up to float rounding for the sparse
        executor): the handle is removed and the model returned.

        Raises:
            UnsupportedOperationError: ``top_k < num_experts``: the routed model has no dense
                equivalent; :meth:`to_dense` goes back to the dense model, changing the function.
        """
        self._check_live()
        cfg = self.config
        if cfg.top_k != cfg.num_experts:
            raise UnsupportedOperationError(
                f"EMoE with top_k = {cfg.top_k} < num_experts = {cfg.num_experts} has no dense equivalent "
                "(each token uses only some of every FFN's neurons), so there is nothing function-preserving "
                "to merge; to_dense() returns to the dense model, changing the function back to the dense FFNs"
            )
        return self.to_dense()

    def to_dense(self) -> nn.Module:
        """Go back to the dense model: removes the operator and returns the model.

        This *changes the function* whenever ``top_k < num_experts``: the FFNs compute all their
        neurons again, with the weights as they are now (fine-tuned under routing, if they were).
        No weight was ever permuted or added, so the model has its stock layout.
        """
        self._check_live()
        self.remove()
        return self.model


def _shape(value: StateValue) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__
