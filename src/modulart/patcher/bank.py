"""The patch neurons of one FFN, stored as stacked fp32 tensors and evaluated as one batched matmul.

For FFN input ``q [..., d_model]`` and ``P`` patches::

    a = q·Kᵀ + b                     [..., P]   (gate pre-activation for gated FFNs)
    h = σ(a)  (⊙ (q·Uᵀ + b_u))       [..., P]
    Δy = (h ⊙ enabled) · V           [..., d_model]

``K``/``U`` ``[P, d_model]``, ``b``/``b_u`` ``[P]``, ``V`` ``[P, d_model]``. Patches are independent
additive terms, so removing one is an exact inverse. While an edit is trained, its new neurons sit
in :class:`Pending` next to the committed ones, each applied only to its own batch rows.

The committed neurons are shared by every thread and published as one snapshot after each change,
so a forward running while another thread adds or removes patches sees either the old or the new set,
never a mix of shapes. The in-flight training state (``pending``, ``record``, ``recorded``) is per
thread, so a forward another thread runs while an edit trains sees only the committed patches.

Example:
    >>> import torch
    >>> from modulart.patcher.bank import PatchBank
    >>> bank = PatchBank(d_model=4, d_out=4, gated=False, activation=torch.relu)
    >>> q = torch.randn(2, 3, 4)
    >>> bank.contribution(q) is None  # no patches: the hook changes nothing
    True
    >>> bank.add(["p1"], keys=torch.eye(4)[:1], key_bias=torch.zeros(1), values=torch.ones(1, 4))
    >>> torch.allclose(bank.contribution(q), torch.relu(q[..., :1]) * torch.ones(4))
    True
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from modulart.core.errors import ConfigError, IncompatibleArtifactError, KeyNotFoundError, ShapeError

__all__ = ["PatchBank", "Pending"]


@dataclass(frozen=True)
class _Neurons:
    """One consistent view of the committed neurons (what a forward reads)."""

    keys: torch.Tensor
    key_bias: torch.Tensor
    values: torch.Tensor
    enabled: torch.Tensor
    up: torch.Tensor | None
    up_bias: torch.Tensor | None


@dataclass
class Pending:
    """Neurons being trained: each is applied only to the batch rows in ``rows``.

    Attributes:
        keys / up: ``[Pn, d_model]``; key_bias / up_bias: ``[Pn]``; values: ``[Pn, d_out]``.
        rows: ``[batch, Pn]`` float mask: neuron j acts on batch row i where ``rows[i, j] == 1``.
        pre_activations: filled by the hook with ``[batch, seq, Pn]`` (graph kept for the loss).
    """

    keys: torch.Tensor
    key_bias: torch.Tensor
    values: torch.Tensor
    rows: torch.Tensor
    up: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    pre_activations: torch.Tensor | None = field(default=None, repr=False)


class PatchBank:
    """Committed patch neurons of one FFN (fp32, whatever the model's dtype).

    Args:
        d_model: FFN input width; d_out: FFN output width.
        gated: whether neurons have an up key (gated FFNs).
        activation: the FFN's σ.
        device: where the tensors live.
    """

    def __init__(
        self,
        d_model: int,
        d_out: int,
        gated: bool,
        activation: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device | str = "cpu",
    ) -> None:
        self.d_model, self.d_out, self.gated, self.activation = d_model, d_out, gated, activation
        self.device = torch.device(device)
        self.ids: list[str] = []
        self.keys = torch.zeros(0, d_model, device=self.device)
        self.key_bias = torch.zeros(0, device=self.device)
        self.up: torch.Tensor | None = torch.zeros(0, d_model, device=self.device) if gated else None
        self.up_bias: torch.Tensor | None = torch.zeros(0, device=self.device) if gated else None
        self.values = torch.zeros(0, d_out, device=self.device)
        self.enabled = torch.zeros(0, dtype=torch.bool, device=self.device)
        self._local = threading.local()  # pending / record / recorded: per thread
        self._publish()

    def _publish(self) -> None:
        """Make the current neurons what forwards read (one attribute store: atomic for other threads)."""
        self._neurons = _Neurons(self.keys, self.key_bias, self.values, self.enabled, self.up, self.up_bias)

    # --- per-thread training state --------------------------------------------------------------
    @property
    def pending(self) -> Pending | None:
        """The neurons this thread is training (``None``: none; other threads never see them)."""
        pending: Pending | None = getattr(self._local, "pending", None)
        return pending

    @pending.setter
    def pending(self, value: Pending | None) -> None:
        self._local.pending = value

    @property
    def record(self) -> bool:
        """Whether this thread's forwards store the committed pre-activations in :attr:`recorded`."""
        return bool(getattr(self._local, "record", False))

    @record.setter
    def record(self, value: bool) -> None:
        self._local.record = value

    @property
    def recorded(self) -> torch.Tensor | None:
        """``[..., P]`` committed pre-activations of this thread's last forward (while :attr:`record`)."""
        recorded: torch.Tensor | None = getattr(self._local, "recorded", None)
        return recorded

    @recorded.setter
    def recorded(self, value: torch.Tensor | None) -> None:
        self._local.recorded = value

    def __len__(self) -> int:
        return len(self.ids)

    # --- evaluation ---------------------------------------------------------------------------
    def pre_activation(self, q: torch.Tensor) -> torch.Tensor:
        """``q [..., d_model] -> a [..., P]`` (fp32)."""
        return q.float() @ self.keys.T + self.key_bias

    def _hidden(
        self, q: torch.Tensor, a: torch.Tensor, up: torch.Tensor | None, up_b: torch.Tensor | None
    ) -> torch.Tensor:
        h = self.activation(a)
        if up is not None and up_b is not None:
            h = h * (q @ up.T + up_b)
        return h

    def contribution(self, q: torch.Tensor) -> torch.Tensor | None:
        """``q [..., d_model] -> Δy [..., d_out]`` in fp32, or ``None`` when nothing would be added."""
        pending, nrn = self.pending, self._neurons
        count = nrn.keys.shape[0]
        active = bool(nrn.enabled.any()) if count else False
        if not active and pending is None and not self.record:
            return None
        qf = q.float()
        out: torch.Tensor | None = None
        if count:
            a = qf @ nrn.keys.T + nrn.key_bias
            if self.record:
                self.recorded = a.detach()
            if active:
                h = self._hidden(qf, a, nrn.up, nrn.up_bias) * nrn.enabled.to(a.dtype)
                out = h @ nrn.values
        elif self.record:
            self.recorded = qf.new_zeros(*qf.shape[:-1], 0)
        if pending is not None:
            qp, n = qf, pending.rows.shape[0]
            if qf.dim() == 2 and qf.shape[0] != n and qf.shape[0] % n == 0:
                qp = qf.view(n, qf.shape[0] // n, qf.shape[1])  # tokens flattened before the FFN (OPT)
            a_new = qp @ pending.keys.T + pending.key_bias
            pending.pre_activations = a_new
            h_new = self._hidden(qp, a_new, pending.up, pending.up_bias)
            rows = pending.rows
            if h_new.dim() == 3:
                rows = rows[:, None, :]
            if rows.shape[0] != h_new.shape[0]:
                raise ShapeError(
                    f"pending patch rows cover a batch of {rows.shape[0]}, the FFN input has batch {h_new.shape[0]}"
                )
            delta = ((h_new * rows) @ pending.values).reshape(*qf.shape[:-1], -1)
            out = delta if out is None else out + delta
        return out

    # --- editing ------------------------------------------------------------------------------
    def add(
        self,
        ids: Sequence[str],
        *,
        keys: torch.Tensor,
        key_bias: torch.Tensor,
        values: torch.Tensor,
        up: torch.Tensor | None = None,
        up_bias: torch.Tensor | None = None,
    ) -> None:
        """Append neurons (copied to fp32 on the bank's device), enabled."""
        n = len(ids)
        want = {"keys": (n, self.d_model), "key_bias": (n,), "values": (n, self.d_out)}
        got = {"keys": tuple(keys.shape), "key_bias": tuple(key_bias.shape), "values": tuple(values.shape)}
        if self.gated:
            if up is None or up_bias is None:
                raise ShapeError("a gated FFN's patches need 'up' and 'up_bias'")
            want |= {"up": (n, self.d_model), "up_bias": (n,)}
            got |= {"up": tuple(up.shape), "up_bias": tuple(up_bias.shape)}
        if want != got:
            raise ShapeError(f"patch tensors have shapes {got}; expected {want}")
        dup = sorted(set(ids) & set(self.ids)) or sorted({i for i in ids if list(ids).count(i) > 1})
        if dup:
            raise ConfigError(f"patch ids already used: {dup}")

        def cat(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            return torch.cat([old, new.detach().to(self.device, torch.float32)])

        self.keys, self.key_bias, self.values = (
            cat(self.keys, keys),
            cat(self.key_bias, key_bias),
            cat(self.values, values),
        )
        if self.gated:
            assert self.up is not None and self.up_bias is not None and up is not None and up_bias is not None
            self.up, self.up_bias = cat(self.up, up), cat(self.up_bias, up_bias)
        self.enabled = torch.cat([self.enabled, torch.ones(n, dtype=torch.bool, device=self.device)])
        self.ids.extend(ids)
        self._publish()

    def index(self, patch_id: str) -> int:
        try:
            return self.ids.index(patch_id)
        except ValueError:
            raise KeyNotFoundError(f"no patch {patch_id!r} in this bank; patches: {self.ids[:10]}") from None

    def remove(self, patch_ids: Sequence[str]) -> None:
        """Drop neurons (exact inverse of :meth:`add`)."""
        drop = {self.index(i) for i in patch_ids}
        keep = torch.tensor([i for i in range(len(self.ids)) if i not in drop], dtype=torch.long, device=self.device)
        self.keys, self.key_bias, self.values = self.keys[keep], self.key_bias[keep], self.values[keep]
        if self.up is not None and self.up_bias is not None:
            self.up, self.up_bias = self.up[keep], self.up_bias[keep]
        self.enabled = self.enabled[keep]
        self.ids = [p for i, p in enumerate(self.ids) if i not in drop]
        self._publish()

    def set_enabled(self, patch_id: str, enabled: bool) -> None:
        self.enabled[self.index(patch_id)] = enabled

    # --- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``keys``, ``key_bias``, ``values``, ``enabled`` (+ ``up``, ``up_bias``): fp32 / bool, CPU copies."""
        out = {"keys": self.keys, "key_bias": self.key_bias, "values": self.values, "enabled": self.enabled}
        if self.up is not None and self.up_bias is not None:
            out |= {"up": self.up, "up_bias": self.up_bias}
        return {k: v.detach().to("cpu").clone() for k, v in out.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], ids: Sequence[str]) -> None:
        """Replace the bank's neurons with ``state`` (validated before anything changes)."""
        need = {"keys", "key_bias", "values", "enabled"} | ({"up", "up_bias"} if self.gated else set())
        missing = sorted(need - set(state))
        if missing:
            raise IncompatibleArtifactError(f"patch state lacks {missing}")
        n = len(ids)
        if state["enabled"].shape != (n,):
            raise IncompatibleArtifactError(f"patch state has {tuple(state['enabled'].shape)} flags for {n} patches")
        fresh = PatchBank(self.d_model, self.d_out, self.gated, self.activation, self.device)
        try:
            fresh.add(
                list(ids),
                keys=state["keys"],
                key_bias=state["key_bias"],
                values=state["values"],
                up=state.get("up"),
                up_bias=state.get("up_bias"),
            )
        except (ShapeError, ValueError) as e:
            raise IncompatibleArtifactError(f"patch state does not fit this FFN: {e}") from None
        fresh.enabled = state["enabled"].to(self.device, torch.bool).clone()
        self.ids, self.keys, self.key_bias, self.values = fresh.ids, fresh.keys, fresh.key_bias, fresh.values
        self.up, self.up_bias, self.enabled = fresh.up, fresh.up_bias, fresh.enabled
        self._publish()
