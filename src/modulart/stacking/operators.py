"""The four atomic growth operators (Du et al. 2024), what each preserves, and their block edits.

| name     | depthwise                                     | preserves function at growth        |
|----------|-----------------------------------------------|-------------------------------------|
| direct   | G_stack: copy block ``plan[i]``               | no                                  |
| zero     | copies whose residual outputs are zero        | yes, for pre-norm residual blocks   |
| random   | new random blocks behind a mask ramping 0->1  | yes (mask 0 makes them identities)  |
| learn    | learned linear mix of the source blocks       | no                                  |

Example:
    >>> from modulart.stacking import OPERATORS
    >>> [(o.name, o.preserves_function) for o in OPERATORS.values()]
    [('direct', False), ('zero', True), ('random', True), ('learn', False)]
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modulart.core.arch import BLOCK_GROWTH_GENERIC, get_attr
from modulart.core.errors import CompositionError, ConfigError, UnsupportedModuleError
from modulart.core.ffn import find_ffns
from modulart.core.hooks import HookRegistry, Priority
from modulart.core.moe import find_moes
from modulart.core.sharing import live_hooks, root_scope
from modulart.core.types import OptimizerLike
from modulart.core.unwrap import unwrap_optimizer
from modulart.stacking.blocks import block_info

__all__ = [
    "OPERATORS",
    "GrowthOperator",
    "GrowthRamp",
    "drop_copied_hooks",
    "get_growth_operator",
    "randomize_block",
    "refuse_live_hooks",
    "zero_block_outputs",
]

# the per-module torch hook dicts holding callables, each with the flag dicts keyed like it (state-dict
# hooks, which module classes register for themselves, are not among them)
_RUN_HOOK_DICTS: dict[str, tuple[str, ...]] = {
    "_forward_hooks": ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"),
    "_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",),
    "_backward_hooks": (),
    "_backward_pre_hooks": (),
}


@dataclass(frozen=True)
class GrowthOperator:
    """An atomic growth operator.

    Attributes:
        name: ``"direct"``, ``"zero"``, ``"random"`` or ``"learn"``.
        preserves_function: depthwise growth leaves the model's outputs unchanged at growth time.
        width_preserves_function: widthwise (FFN width) growth leaves the outputs unchanged.
        needs_in_order_plan: new blocks must be identities, so the plan must contain 0..L-1 in order.
        description: one line.
    """

    name: str
    preserves_function: bool
    width_preserves_function: bool
    needs_in_order_plan: bool
    description: str


OPERATORS: dict[str, GrowthOperator] = {
    "direct": GrowthOperator("direct", False, True, False, "G_stack: block i = copy of source block plan[i]"),
    "zero": GrowthOperator(
        "zero", True, True, True, "copies with zeroed residual outputs (attention out, FFN down): identity blocks"
    ),
    "random": GrowthOperator("random", True, True, True, "random new blocks blended in by a mask ramping 0 -> 1 (MSG)"),
    "learn": GrowthOperator(
        "learn", False, False, False, "each block a learned mix of source blocks; width: learned expansions (LiGO)"
    ),
}


def get_growth_operator(name: str) -> GrowthOperator:
    """The operator called ``name``; :class:`ConfigError` listing the known ones otherwise."""
    if name not in OPERATORS:
        raise ConfigError(f"operator = {name!r}: must be one of {sorted(OPERATORS)}")
    return OPERATORS[name]


def refuse_live_hooks(model: nn.Module, what: str) -> None:
    """Refuse to copy a model that carries live modulart hooks (EMoE, LoRA, patcher, MIGU...).

    A deep copy would copy the hooks' dispatchers with the modules: the copies would run
    callbacks still tied to the original handle, and survive its ``remove()``.

    Raises:
        CompositionError: naming every operator with hooks on ``model`` and where they are.
    """
    hooks = live_hooks([model], subtree=True)
    if not hooks:
        return
    ops = sorted({root_scope(h.scope) for h in hooks})
    paths = sorted({h.path for h in hooks})
    more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
    raise CompositionError(
        f"{what}: operator(s) {ops} have live hooks on the model (at {paths[:3]}{more}); a copy would carry "
        f"them, still tied to their handles: remove() (or merge_()) those handles first, then apply them to "
        f"the result again"
    )


def _shared_with_source(fn: object) -> bool:
    """Whether a deep copy shares this hook callable with the source (plain functions are not copied)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return isinstance(fn, (types.FunctionType, types.BuiltinFunctionType))


def drop_copied_hooks(grown: nn.Module, what: str) -> list[str]:
    """Drop the forward / backward torch hooks a deep copy would share with the source; warn naming them.

    A deep copy keeps plain functions (lambdas, closures, ``functools.partial`` of them) by
    reference: such a hook would run on every copy of its module with its state still tied to the
    source, and the handle the user holds could not remove it from the copies. Those are dropped.
    Hooks that the copy duplicated along with the module (callable objects, methods of copied
    objects) act on the module they are called with and are kept, as are state-dict hooks.
    Returns the module paths whose hooks were dropped.
    """
    dropped: list[str] = []
    for name, m in grown.named_modules():
        hit = False
        for attr, flag_dicts in _RUN_HOOK_DICTS.items():
            hooks = getattr(m, attr, None)
            if not isinstance(hooks, dict):
                continue
            for key in [k for k, fn in hooks.items() if _shared_with_source(fn)]:
                hit = True
                del hooks[key]
                for flags in flag_dicts:
                    table = getattr(m, flags, None)
                    if isinstance(table, dict):
                        table.pop(key, None)
        if hit:
            dropped.append(name or "<root>")
            if not m._backward_hooks and not m._backward_pre_hooks:
                m._is_full_backward_hook = None
    if dropped:
        more = f" and {len(dropped) - 5} more" if len(dropped) > 5 else ""
        warnings.warn(
            f"{what}: the forward/backward hook functions registered on the source model (at {dropped[:5]}{more}) "
            f"were not copied into the result; register them on it again if it needs them",
            UserWarning,
            stacklevel=3,
        )
    return dropped


def _residual_tensors(block: nn.Module, path: str) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight / bias whose output is added to the residual stream."""
    out: list[tuple[str, torch.Tensor]] = []
    names = dict(block.named_modules())
    rels = [r for r in block_info(block).residual_outputs if r in names]
    if not rels:  # not in the table (or the table's paths moved): the generic suffixes
        rels = [n for n in names for r in BLOCK_GROWTH_GENERIC.residual_outputs if n == r or n.endswith("." + r)]
    for h in rels:
        out.extend((f"{h}.{k}", p) for k, p in names[h].named_parameters(recurse=False))
    for ffn in find_ffns(block, strict=False):
        out.extend((f"{ffn.value_proj.path}.{k}", p) for k, p in ffn.value_proj.module.named_parameters(recurse=False))
    for moe in find_moes(block, strict=False):
        exp = moe.experts_module
        if isinstance(exp, nn.ModuleList):
            for f in find_ffns(exp, strict=False):
                out.extend((f"{moe.path}.experts.{f.path}.value", p) for p in f.value_proj.module.parameters(False))
        else:
            for k in ("down_proj", "down_proj_bias"):
                t = getattr(exp, k, None)
                if isinstance(t, torch.Tensor):
                    out.append((f"{moe.path}.{moe.layout.experts}.{k}", t))
        for s in moe.shared_experts:
            out.extend((f"{s.path}.value", p) for p in s.value_proj.module.parameters(False))
    if not out:
        raise UnsupportedModuleError(
            f"{path} ({type(block).__name__}): no residual output projection found; register the block with "
            "modulart.core.arch.BLOCK_GROWTH (attention output paths) and an FFN layout"
        )
    return out


def zero_block_outputs(block: nn.Module, path: str = "block") -> list[str]:
    """Zero the attention output and FFN value projections of ``block`` (in place); returns their names.

    For a pre-norm residual block ``x + attn(norm(x)) + ffn(norm(x))`` this makes the block the
    identity. Post-norm blocks (BERT) are not identities: their norm still acts on ``x``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class B(nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.o_proj = nn.Linear(2, 2)
        ...     def forward(self, x): return x + self.o_proj(x)
        >>> b = B(); _ = zero_block_outputs(b); x = torch.randn(3, 2)
        >>> torch.equal(b(x), x)
        True
    """
    names = []
    with torch.no_grad():
        for name, t in _residual_tensors(block, path):
            t.zero_()
            names.append(name)
    return names


def randomize_block(block: nn.Module, generator: torch.Generator, init_std: float | None = None) -> None:
    """Fresh random weights for a copied block: normal with each tensor's own std (or ``init_std``).

    1-D tensors (norm scales, biases) keep their copied values, so norms stay calibrated.
    """
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() >= 2:
                std = float(p.float().std()) if init_std is None else init_std
                p.copy_((torch.randn(p.shape, generator=generator) * std).to(p.dtype))


class GrowthRamp:
    """The 0 -> 1 mask of the ``random`` operator: new block ``i`` computes ``x + m·(f(x) - x)``.

    ``m = min(1, t / steps)`` after ``t`` calls to :meth:`step` (or optimizer steps, after
    :meth:`attach`). At ``m = 0`` the new blocks are identities; at ``m = 1`` they are plain blocks
    and :meth:`remove` drops the hooks. Find it on a grown model with
    :func:`~modulart.stacking.get_ramp`.

    Not an operator handle: growth builds a new model and returns it, and the ramp is a plain
    object that :func:`~modulart.stacking.grow` leaves on that model (no ``save()``, ``disable()``
    or ``merge_()``; the grown model's weights are saved like any model's). :meth:`attach` and
    :meth:`remove` mean what they mean on handles: hook an optimizer (accelerate's wrappers
    unwrapped), undo the hooks (idempotent).

    Args:
        model: the grown model.
        block_paths: dotted paths of the new (masked) blocks.
        steps: ramp length in steps (0 means the mask is 1 at once).
    """

    def __init__(self, model: nn.Module, block_paths: list[str], steps: int) -> None:
        self.model, self.block_paths, self.steps = model, list(block_paths), int(steps)
        self.t = 0
        self.registry = HookRegistry(model, name="stacking-ramp")
        for p in self.block_paths:
            self._install(get_attr(model, p), p)

    @property
    def value(self) -> float:
        """Current mask value ``m`` in [0, 1]."""
        return 1.0 if self.steps <= 0 else min(1.0, self.t / self.steps)

    @property
    def done(self) -> bool:
        return self.value >= 1.0

    def step(self, n: int = 1) -> float:
        """Advance the ramp by ``n`` steps; returns the new mask value."""
        self.t += n
        return self.value

    def attach(self, optimizer: OptimizerLike) -> None:
        """Advance the ramp after every ``optimizer.step()`` (``optimizer`` may be an accelerate wrapper).

        Raises:
            InvalidArgumentError: ``optimizer`` holds no ``torch.optim.Optimizer``.
        """

        def post(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.step()

        self.registry.optimizer_step_post(unwrap_optimizer(optimizer), post, name="ramp-step")

    def remove(self) -> None:
        """Remove the blending hooks (the new blocks then run at full strength); idempotent."""
        self.registry.remove()
        if getattr(self.model, "_modulart_growth_ramp", None) is self:
            del self.model._modulart_growth_ramp

    def _install(self, block: nn.Module, path: str) -> None:
        stash: list[torch.Tensor] = []

        def pre(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(x, torch.Tensor):
                raise UnsupportedModuleError(f"{path}: could not find the block's hidden-state input")
            stash[:] = [x]

        def post(m: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            x = stash.pop()
            mask = self.value
            blend: Callable[[torch.Tensor], torch.Tensor] = lambda y: x + mask * (y - x)  # noqa: E731
            if isinstance(output, tuple):
                return (blend(output[0]), *output[1:])
            if isinstance(output, torch.Tensor):
                return blend(output)
            raise UnsupportedModuleError(f"{path}: block output is a {type(output).__name__}, expected a tensor")

        self.registry.forward_pre(block, pre, with_kwargs=True, priority=Priority.INTERVENE)
        self.registry.forward(block, post, priority=Priority.INTERVENE)


def get_ramp(model: nn.Module) -> GrowthRamp | None:
    """The :class:`GrowthRamp` that ``grow(..., operator="random")`` attached to ``model``, or None.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import modulart.stacking as st
        >>> net = nn.Sequential(nn.ModuleList([nn.Linear(4, 4) for _ in range(2)]))
        >>> big = st.grow(net, 2, operator="random", ramp_steps=4)
        >>> ramp = st.get_ramp(big); ramp.value, ramp.step(2), ramp.done
        (0.0, 0.5, False)
        >>> ramp.remove(); st.get_ramp(big) is None
        True
    """
    ramp = getattr(model, "_modulart_growth_ramp", None)
    return ramp if isinstance(ramp, GrowthRamp) else None
