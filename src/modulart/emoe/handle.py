"""The live EMoE conversion: routing telemetry, the balance loss, state, ``to_dense()``.

Verbs (see :mod:`modulart.core.operator`):

- ``remove()`` / ``to_dense()``: drop the routing and go back to the dense FFNs. Both are the same
  action (except with ``per_expert_bias``, below); ``to_dense()`` returns the model and says in its
  name what it is. With ``top_k < num_experts`` this *changes the function* (the routed model has
  no dense equivalent).
- ``merge_()``: function-preserving only when ``top_k == num_experts`` (routing selects every
  expert, so the routed model *is* the dense one); otherwise it raises
  :class:`~modulart.core.errors.UnsupportedOperationError`.
- ``state_dict()`` / ``load_state_dict()``: the labels and the conversion-time centroids of every
  converted FFN (and, with ``per_expert_bias``, the per-expert bias copies).
- ``expert_groups()``: the :class:`~modulart.core.neuron_groups.NeuronExperts` protocol that
  ``modulart.introspect`` reads.

With ``per_expert_bias`` the trained copies ``B_e`` replace ``b_out`` (frozen meanwhile):
``to_dense()`` writes ``b_out ← (k / N) Σ_e B_e`` (the bias of a token whose ``k`` experts are
drawn uniformly; exactly the original ``b_out`` until the copies diverge) before removing the
routing, so the dense model keeps what they learned on average, not token by token; ``merge_()``
(``k = N``, every token using every expert) writes ``Σ_e B_e``, which is function-preserving;
``remove()`` discards the copies and leaves ``b_out`` as it was. An artefact saved before
``to_dense()`` belongs to the model with the original ``b_out``.

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
from modulart.emoe.config import HIDDEN_ROUTERS, EMoEConfig
from modulart.emoe.layer import ConvertedFFN, ExpertBias, RoutingStats

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
        self.holders: list[tuple[nn.Module, str, ExpertBias]] = []  # per-expert bias copies registered by install

    def _teardown(self) -> None:
        while self.holders:  # one at a time, forgotten once undone: a retried remove() resumes
            module, name, holder = self.holders[-1]
            if module._modules.get(name) is holder:
                del module._modules[name]
            self.holders.pop()

    # --- telemetry ----------------------------------------------------------------------------
    def routing_stats(self) -> dict[str, RoutingStats]:
        """Per converted FFN: expert load, normalised selection entropy and stability since the last call."""
        return {path: layer.stats() for path, layer in self.layers.items()}

    def balance_loss(self) -> torch.Tensor:
        """``balance_loss_weight`` × the sum over layers of the last forward's balance loss (add it to yours).

        The loss is :func:`~modulart.emoe.routing.balance_loss` (``balance_loss="counts"``) or the
        reference code's :func:`~modulart.emoe.routing.reference_balance_loss` (``"reference"``).
        """
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
                needs_hidden=cfg.router in HIDDEN_ROUTERS,
            )
            for path, layer in self.layers.items()
        }

    # --- state --------------------------------------------------------------------------------
    def state_dict(self) -> StateDict:
        """``{path}.labels`` (``[d_ff]`` int64) and ``{path}.centroids`` (``[N, d_model]`` fp32) per FFN.

        With ``per_expert_bias`` also ``{path}.expert_bias`` (``[N, d_model]``, the bias's dtype).
        """
        out: StateDict = {}
        for p, layer in self.layers.items():
            out[f"{p}.labels"] = layer.groups.labels.detach().cpu()
            out[f"{p}.centroids"] = layer.frozen.detach().cpu()
            if layer.bias is not None:
                out[f"{p}.expert_bias"] = layer.bias.weight.detach().cpu().clone()
        return out

    def _state_keys(self) -> set[str]:
        what = ("labels", "centroids", "expert_bias") if self.config.per_expert_bias else ("labels", "centroids")
        return {f"{p}.{w}" for p in self.layers for w in what}

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        """Restore what :meth:`state_dict` returned: every layer's labels and centroids.

        Raises:
            IncompatibleArtifactError: keys, types or shapes differ from this conversion's.
        """
        expected = self._state_keys()
        if set(state) != expected:
            raise IncompatibleArtifactError(
                f"EMoE state keys differ: missing {sorted(expected - set(state))[:6]}, "
                f"unexpected {sorted(set(state) - expected)[:6]}"
            )
        n = self.config.num_experts
        splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        biases: dict[str, torch.Tensor] = {}
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
            if layer.bias is not None:
                bias = state[f"{p}.expert_bias"]
                if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != tuple(layer.bias.weight.shape):
                    raise IncompatibleArtifactError(
                        f"{p}.expert_bias: expected a {tuple(layer.bias.weight.shape)} tensor, got {_shape(bias)}"
                    )
                biases[p] = bias
        for p, (labels, centroids) in splits.items():  # all checked first: nothing changes on a bad state
            self.layers[p].set_split(labels, centroids)
        with torch.no_grad():
            for p, bias in biases.items():
                holder = self.layers[p].bias
                assert holder is not None
                holder.weight.copy_(bias.to(holder.weight.device, holder.weight.dtype))

    # --- back to dense ------------------------------------------------------------------------
    def merge_(self) -> nn.Module:
        """Remove the routing where that preserves the function: only with ``top_k == num_experts``.

        With ``top_k == num_experts`` every token selects every expert, so the routed model is the
        dense one and removing the hooks changes nothing (up to float rounding for the sparse
        executor): the handle is removed and the model returned. With ``per_expert_bias`` the
        output bias becomes ``Σ_e B_e``, the bias every token had.

        Raises:
            UnsupportedOperationError: ``top_k < num_experts``: the routed model has no dense
                equivalent; :meth:`to_dense` goes back to the dense model, changing the function.
                Also with a ``capacity_factor`` below 1, which can drop assignments even then.
        """
        self._check_live()
        cfg = self.config
        if cfg.top_k != cfg.num_experts:
            raise UnsupportedOperationError(
                f"EMoE with top_k = {cfg.top_k} < num_experts = {cfg.num_experts} has no dense equivalent "
                "(each token uses only some of every FFN's neurons), so there is nothing function-preserving "
                "to merge; to_dense() returns to the dense model, changing the function back to the dense FFNs"
            )
        if cfg.capacity_factor is not None and cfg.capacity_factor < 1:
            raise UnsupportedOperationError(
                f"EMoE with capacity_factor = {cfg.capacity_factor} < 1 drops token assignments that depend on the "
                "batch, so the routed model has no dense equivalent; to_dense() returns to the dense model"
            )
        return self.to_dense()

    def to_dense(self) -> nn.Module:
        """Go back to the dense model: removes the operator and returns the model.

        This *changes the function* whenever ``top_k < num_experts``: the FFNs compute all their
        neurons again, with the weights as they are now (fine-tuned under routing, if they were).
        No weight was ever permuted or added, so the model has its stock layout. With
        ``per_expert_bias`` the output bias is set to ``(k / N) Σ_e B_e`` first (see the module
        docstring); :meth:`remove` instead discards the copies.
        """
        self._check_live()
        k, n = self.config.top_k, self.config.num_experts
        with torch.no_grad():
            for layer in self.layers.values():
                b = layer.ffn.value_bias
                if layer.bias is not None and b is not None:
                    b.copy_((layer.bias.weight.float().sum(0) * (k / n)).to(b.dtype))
        self.remove()
        return self.model


def _shape(value: StateValue) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__
