"""FFN views: the keys, values, activation and hook sites of any feed-forward block.

Notation (all canonical, whatever the storage — ``nn.Linear``, HF ``Conv1D``):

- ``keys``   ``[d_ff, d_model]``: rows of the first layer (the gate rows for gated FFNs);
- ``up``     ``[d_ff, d_model]``: gated FFNs only;
- ``values`` ``[d_model, d_ff]``: the second layer;
- ``h = σ(q·keysᵀ + b_k)`` or ``h = σ(q·keysᵀ + b_k) ⊙ (q·upᵀ + b_u)``; ``y = h·valuesᵀ + b_v``.

Hook sites (see :class:`~modulart.core.hooks.HookSite`): ``input_site`` (q), ``hidden_site``
(h, the input of the value projection — after dropout in training mode where the model has one
there) and ``output_site`` (y, before any residual, dropout or norm).

Example:
    >>> import torch
    >>> import modulart as mt
    >>> class MLP(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc_in, self.act, self.fc_out = torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)
    ...     def forward(self, x):
    ...         return self.fc_out(self.act(self.fc_in(x)))
    >>> model = torch.nn.Sequential(MLP(), MLP())
    >>> ffn = mt.find_ffns(model)[1]
    >>> ffn.path, tuple(ffn.keys.shape), tuple(ffn.values.shape), ffn.gated
    ('1', (32, 8), (8, 32), False)
    >>> x = torch.randn(3, 8)
    >>> torch.allclose(ffn.forward(x), model[1](x))
    True
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modulart.core.activations import identify_activation
from modulart.core.arch import FFN_LAYOUTS, FFNLayout, block_position, get_attr, infer_ffn_layout
from modulart.core.errors import UnsupportedModuleError
from modulart.core.ffn_discovery import discover_ffns
from modulart.core.ffn_verify import ProbeInputs, verify_ffn
from modulart.core.hooks import HookSite
from modulart.core.linear import LinearRef, base_linear, is_linear_map
from modulart.core.moe_layouts import moe_block_parts
from modulart.core.select import filter_by_selector
from modulart.core.verify import Verification

__all__ = ["FFN", "UnprobedBlockWarning", "adapter_help", "ffn_from_layout", "find_ffns"]


class UnprobedBlockWarning(UserWarning):
    """Some blocks could not be probed (``find_ffns(strict=False)`` goes on without them)."""


class FFN:
    """A typed view of one feed-forward block (reads and writes go to the model's own tensors).

    Attributes:
        path: dotted path of the block in the model.
        module: the block.
        layout: the :class:`~modulart.core.arch.FFNLayout` it was read with.
        layer: index within its block list (``None`` if it is not in a ``ModuleList``).
        stack: path of that block list (e.g. ``"encoder.block"``).
        key_proj / up_proj / value_proj: the projections as :class:`LinearRef`.
        activation: σ.
        input_site / hidden_site / output_site: where q, h and y can be hooked.
    """

    def __init__(
        self,
        path: str,
        module: nn.Module,
        layout: FFNLayout,
        *,
        layer: int | None = None,
        stack: str | None = None,
        source: str = "explicit",
    ) -> None:
        self.path, self.module, self.layout, self.layer, self.stack = path, module, layout, layer, stack
        self.source = source
        self.verification: Verification | None = None
        if layout.fused_gate_up is not None:
            fused = self._linear(layout.key)
            if fused.out_features % 2:
                raise UnsupportedModuleError(
                    f"{fused.path!r}: a fused gate/up layer needs an even number of output rows, "
                    f"got {fused.out_features}"
                )
            half = fused.out_features // 2
            first, second = slice(0, half), slice(half, 2 * half)
            gate_rows, up_rows = (first, second) if layout.fused_gate_up == "gate_first" else (second, first)
            home = self._home(layout.key)
            self.key_proj = LinearRef(fused.module, fused.path, rows=gate_rows, home=home)
            self.up_proj: LinearRef | None = LinearRef(fused.module, fused.path, rows=up_rows, home=home)
        else:
            self.key_proj = self._linear(layout.key)
            self.up_proj = self._linear(layout.up) if layout.up is not None else None
        self.value_proj = self._linear(layout.value)
        act = layout.activation
        self.activation: Callable[[torch.Tensor], torch.Tensor] = (
            act if callable(act) else self._attr(act, "activation")
        )
        if not callable(self.activation):
            raise UnsupportedModuleError(f"{path!r}: activation {act!r} is not callable")
        d_ff, d_model = self.key_proj.out_features, self.key_proj.in_features
        want = {"value": (d_model, d_ff)} | ({"up": (d_ff, d_model)} if self.up_proj else {})
        got = {"value": tuple(self.values.shape)} | ({"up": tuple(self.up_proj.weight.shape)} if self.up_proj else {})
        if want != got:
            raise UnsupportedModuleError(
                f"{path!r}: inconsistent FFN shapes: keys [{d_ff}, {d_model}] needs {want}, found {got}"
            )
        if layout.input is not None:
            inp = self._attr(layout.input, "input")
            self.input_site = HookSite(inp, _join(path, layout.input), "forward_pre")
        elif layout.up is not None:
            self.input_site = HookSite(module, path, "forward_pre")
        else:
            self.input_site = HookSite(self.key_proj.module, self.key_proj.path, "forward_pre")
        self.hidden_site = HookSite(self.value_proj.module, self.value_proj.path, "forward_pre")
        self.output_site = HookSite(self.value_proj.module, self.value_proj.path, "forward")

    def _attr(self, rel: str, what: str) -> Any:
        try:
            return get_attr(self.module, rel)
        except AttributeError as e:
            raise UnsupportedModuleError(
                f"{self.path!r} ({type(self.module).__name__}): layout field {what!r} "
                f"points to {rel!r}, which does not exist ({e})"
            ) from None

    def _linear(self, rel: str) -> LinearRef:
        mod = self._attr(rel, rel)
        if not isinstance(mod, nn.Module) or not is_linear_map(mod):
            raise UnsupportedModuleError(
                f"{_join(self.path, rel)!r} is {type(mod).__name__}; expected nn.Linear, a Hugging Face Conv1D "
                "or a PEFT tuner layer around one"
            )
        return LinearRef(mod, _join(self.path, rel), home=self._home(rel))

    def _home(self, rel: str) -> tuple[nn.Module, str] | None:
        """``(parent module, attribute name)`` of the projection at ``rel`` (a later wrap is followed)."""
        up, _, name = rel.rpartition(".")
        parent = self.module if not up else self._attr(up, rel)
        return (parent, name) if isinstance(parent, nn.Module) and name in parent._modules else None

    # --- shapes -------------------------------------------------------------------------------
    @property
    def gated(self) -> bool:
        return self.up_proj is not None

    @property
    def fused(self) -> bool:
        """Whether gate and up share one stored layer (``keys`` and ``up`` are row blocks of it)."""
        return self.key_proj.is_partial

    @property
    def activation_name(self) -> str | None:
        """The catalogue name of what the activation computes (``"gelu_tanh"``...), or None."""
        return identify_activation(self.activation, self.keys)

    @property
    def d_model(self) -> int:
        return self.key_proj.in_features

    @property
    def d_ff(self) -> int:
        return self.key_proj.out_features

    # --- canonical weights (views: in-place edits reach the model) ----------------------------
    @property
    def keys(self) -> torch.Tensor:
        """``[d_ff, d_model]`` first-layer rows (gate rows when gated)."""
        return self.key_proj.weight

    @keys.setter
    def keys(self, value: torch.Tensor) -> None:
        self.key_proj.set_weight(value)

    @property
    def up(self) -> torch.Tensor | None:
        """``[d_ff, d_model]`` up-projection rows (gated FFNs), else None."""
        return self.up_proj.weight if self.up_proj is not None else None

    @up.setter
    def up(self, value: torch.Tensor) -> None:
        if self.up_proj is None:
            raise UnsupportedModuleError(f"{self.path!r} is not gated: it has no up projection")
        self.up_proj.set_weight(value)

    @property
    def values(self) -> torch.Tensor:
        """``[d_model, d_ff]`` second layer (column i is neuron i's value vector)."""
        return self.value_proj.weight

    @values.setter
    def values(self, value: torch.Tensor) -> None:
        self.value_proj.set_weight(value)

    @property
    def key_bias(self) -> torch.Tensor | None:
        """``[d_ff]`` or None."""
        return self.key_proj.bias

    @property
    def up_bias(self) -> torch.Tensor | None:
        """``[d_ff]`` or None."""
        return self.up_proj.bias if self.up_proj is not None else None

    @property
    def value_bias(self) -> torch.Tensor | None:
        """``[d_model]`` or None."""
        return self.value_proj.bias

    # --- recomputation ------------------------------------------------------------------------
    def pre_activation(self, q: torch.Tensor) -> torch.Tensor:
        """``q [..., d_model] -> q·keysᵀ + b_k  [..., d_ff]``."""
        return F.linear(q, self.keys, self.key_bias)

    def hidden(self, q: torch.Tensor) -> torch.Tensor:
        """``q [..., d_model] -> h [..., d_ff]`` (σ, or σ(gate) ⊙ up)."""
        h = self.activation(self.pre_activation(q))
        if self.up_proj is not None:
            h = h * self.up_proj(q)
        return h

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """``q [..., d_model] -> y [..., d_model]`` computed from the canonical weights."""
        return F.linear(self.hidden(q), self.values, self.value_bias)

    def parameters(self) -> dict[str, torch.Tensor]:
        """The FFN's own stored parameters by role: ``key``, ``up``, ``value`` (+ ``*_bias``).

        For a fused gate/up layer, ``key`` is the fused parameter (``up`` is the same tensor).
        """
        out: dict[str, torch.Tensor] = {"key": self.key_proj.param, "value": self.value_proj.param}
        if self.up_proj is not None and not self.fused:
            out["up"] = self.up_proj.param
        for role, ref in (("key", self.key_proj), ("up", self.up_proj), ("value", self.value_proj)):
            bias = getattr(base_linear(ref.module), "bias", None) if ref is not None else None
            if isinstance(bias, torch.Tensor) and not (role == "up" and self.fused):
                out[f"{role}_bias"] = bias
        return out

    def __repr__(self) -> str:
        kind = ("fused-gated" if self.fused else "gated") if self.gated else "plain"
        return (
            f"FFN({self.path!r}, {type(self.module).__name__}, {kind}, d_model={self.d_model}, "
            f"d_ff={self.d_ff}, layer={self.layer})"
        )


def _join(a: str, b: str) -> str:
    return ".".join(p for p in (a, b) if p)


def ffn_from_layout(
    model: nn.Module,
    path: str,
    layout: FFNLayout,
    *,
    verify: bool = True,
    source: str = "explicit",
    probe_inputs: ProbeInputs | None = None,
) -> FFN:
    """Build the view of the block at ``path`` with an explicit layout, verified against the block.

    Raises:
        UnsupportedModuleError: the layout does not fit the block, or (``verify=True``) the view
            does not recompute what the block computes (the message gives the measured error).
    """
    module = model.get_submodule(path)
    stack, layer = block_position(model, path)
    view = FFN(path, module, layout, layer=layer, stack=stack, source=source)
    if verify:
        check = verify_ffn(view, model, probe_inputs)
        if not check.ok:
            raise UnsupportedModuleError(
                f"{path!r} ({type(module).__name__}): the {source} layout {layout} does not reproduce "
                f"the block: {check.detail}. modulart hands out no view that computes something else "
                "than the model; fix or register the layout, or pass verify=False if you know better.\n"
                + adapter_help("ffn")
            )
        view.verification = check
    return view


def find_ffns(
    model: nn.Module,
    selector: Any = None,
    *,
    strict: bool = True,
    include_shared_experts: bool = False,
    verify: bool = True,
    probe_inputs: ProbeInputs | None = None,
) -> list[FFN]:
    """Every dense feed-forward block of ``model``, in depth (module-definition) order, verified.

    Blocks are recognised through :data:`~modulart.core.arch.FFN_LAYOUTS` (the fast path for known
    classes, walked along the MRO) and otherwise by data flow
    (:func:`~modulart.core.ffn_discovery.discover_ffns`): any pair of linear layers whose recorded
    values show ``h = σ(A·q)`` (or a gated / fused-gated form) between them, whatever the classes,
    the child order or the activation (a module of any class or a function). Every view is checked
    against the block's own forward on a probe before it is returned (cached per block type):
    a view that does not recompute what the block computes is never handed out. Routed experts of
    MoE blocks are not dense FFNs and are left out (shared experts are included with
    ``include_shared_experts=True``).

    Args:
        model: any ``nn.Module``.
        selector: optionally keep only blocks whose path it selects (see :func:`as_selector`).
        strict: raise :class:`UnsupportedModuleError` when nothing is found.
        include_shared_experts: also return the shared experts of MoE blocks.
        verify: check every table view against the block, and find the rest by data flow
            (``False``: no probe at all — the table and a structural guess from the children's
            names and shapes are trusted; for models that cannot run, e.g. on the meta device).
        probe_inputs: keyword inputs for a whole-model forward, used to probe blocks that cannot be
            called on a hidden-state tensor alone (Hugging Face models get them from their config).

    Returns:
        The FFN views, outermost first, in the order modules are defined.

    Raises:
        UnsupportedModuleError: a table layout that does not reproduce its block, a block that may
            hold an FFN but cannot be probed (``strict``; otherwise :class:`UnprobedBlockWarning`),
            or no FFN found.

    A wrapped model (DDP ``.module``, ``torch.compile``, PEFT) is unwrapped first: paths are
    relative to the model inside (:func:`modulart.core.unwrap.unwrap_model`).
    """
    from modulart.core.unwrap import unwrap_model

    model = unwrap_model(model)
    skip_roots = _moe_exclusions(model, include_shared_experts)
    found: list[FFN] = []
    claimed: list[str] = []

    def skipped(path: str) -> bool:
        return any(path == r or path.startswith(r + ".") or r == "" for r in (*skip_roots, *claimed))

    for path, module in model.named_modules():
        layout = FFN_LAYOUTS.lookup(type(module))
        source = "table"
        if layout is None and not verify:  # no probe at all: the structural guess, trusted
            layout, source = infer_ffn_layout(module), "guessed"
        if layout is None or skipped(path):
            continue
        found.append(ffn_from_layout(model, path, layout, verify=verify, source=source, probe_inputs=probe_inputs))
        claimed.append(path)
    notes: list[str] = []
    unprobed: list[str] = []
    discovered = (
        discover_ffns(model, skip=skipped, probe_inputs=probe_inputs, notes=notes, unprobed=unprobed) if verify else []
    )
    for d in discovered:
        view = ffn_from_layout(model, d.path, d.layout, verify=False, source="discovered")
        view.verification = d.verification
        found.append(view)
    if unprobed:
        msg = (
            f"{len(unprobed)} block(s) of {type(model).__name__} may hold feed-forward layers but could not be "
            "probed, so whether they do is unknown:\n"
            + "".join(f"  - {u}\n" for u in unprobed[:8])
            + "Tell modulart how to call the model once, e.g. mt.set_probe_inputs(model, {'input_ids': ids}) "
            "(or pass probe_inputs= to find_ffns)."
        )
        if strict:
            raise UnsupportedModuleError(msg)
        warnings.warn(msg, UnprobedBlockWarning, stacklevel=2)
    order = {p: i for i, (p, _) in enumerate(model.named_modules())}
    found.sort(key=lambda f: order[f.path])
    if selector is not None:
        found = filter_by_selector(found, selector, model, strict=strict, what="FFNs")
    if not found and strict:
        raise UnsupportedModuleError(_no_ffn_message(model, notes))
    return found


def _moe_exclusions(model: nn.Module, include_shared_experts: bool) -> list[str]:
    """Paths whose subtrees hold no dense FFN: routed experts and routers of MoE blocks (and the
    whole MoE block unless shared experts are wanted)."""
    out: list[str] = []
    for path, parts in moe_block_parts(model).items():
        if include_shared_experts:
            out.extend((*parts.experts, *((parts.router,) if parts.router else ())))
        else:
            out.extend((path, *parts.beside))
    return out


def _no_ffn_message(model: nn.Module, notes: list[str]) -> str:
    candidates = []
    for path, m in model.named_modules():
        lin = [(n, tuple(c.weight.shape)) for n, c in m.named_children() if is_linear_map(c)]
        name = type(m).__name__.lower()
        if len(lin) >= 2 or any(k in name for k in ("mlp", "ffn", "feedforward", "feed_forward")):
            candidates.append(f"  - {path or '<root>'} ({type(m).__name__}): linear children {lin[:4]}")
    shown = "\n".join(candidates[:10]) or "  (no module with two or more linear children)"
    probed = "".join(f"  - {n}\n" for n in dict.fromkeys(notes))
    probed = f"Probed and rejected:\n{probed}" if probed else ""
    return f"found no feed-forward block in {type(model).__name__}. Candidates seen:\n{shown}\n{probed}" + adapter_help(
        "ffn"
    )


def adapter_help(kind: str) -> str:
    """The how-to text shown when a model is not understood (``kind``: ``"ffn"`` or ``"moe"``)."""
    if kind == "ffn":
        return (
            "Register an adapter for your block class (attribute paths relative to the block):\n"
            "    import modulart as mt\n"
            "    mt.register_ffn_layout(MyMLP, mt.FFNLayout(key='fc_in', value='fc_out', activation='act'))\n"
            "    # gated: mt.FFNLayout(key='w_gate', up='w_up', value='w_down', activation=torch.nn.functional.silu)\n"
            "See docs/adapters.md."
        )
    return (
        "Register an adapter for your MoE block class:\n"
        "    import modulart as mt\n"
        "    mt.register_moe_layout(MyMoE, mt.MoELayout(router='router', experts='experts',\n"
        "        storage='module_list', scoring='softmax_topk', top_k='top_k'))\n"
        "See docs/adapters.md."
    )
