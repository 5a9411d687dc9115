"""Widthwise growth: more FFN units (``d_ff``) and a wider residual stream (``d_model``).

| operator | new units                                                            | function at growth            |
|----------|----------------------------------------------------------------------|-------------------------------|
| direct   | split neurons: copies of random old units, their readers halved...   | d_ff: exact; d_model: approx. |
| zero     | zero padding; RMSNorm scales multiplied by ``sqrt(d_old / d_new)``   | exact (d_model: RMSNorm only) |
| random   | random units (d_ff) behind a mask ramping 0 -> 1                      | exact at mask 0               |
| learn    | d_ff: learned expansions ``B = [I; N]`` fitted on a loss (LiGO)       | no                            |

``d_ff`` growth works on every FFN the :func:`~modulart.find_ffns` views find (any model);
``d_model`` growth rebuilds a Hugging Face model from its config with the new width and fills every
tensor whose shape changed along the residual axis (heads keep their ``head_dim``).

Example:
    >>> import torch
    >>> import modulart.stacking as st
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    >>> wide = st.grow_width(mlp, d_ff=12, operator="direct")
    >>> wide[0].weight.shape, st.function_difference(mlp, wide, torch.randn(3, 4)) < 1e-6
    (torch.Size([12, 4]), True)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from modulart.core.errors import ConfigError, ShapeError, UnsupportedModuleError
from modulart.core.ffn import find_ffns
from modulart.core.hooks import HookRegistry, Priority
from modulart.core.linear import is_conv1d
from modulart.stacking.operators import GrowthRamp, drop_copied_hooks, refuse_live_hooks

__all__ = ["D_FF_KEYS", "D_MODEL_KEYS", "WidthRamp", "grow_width"]

Role = Literal["out", "in", "unit"]
D_MODEL_KEYS = ("hidden_size", "n_embd", "d_model")
D_FF_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff")
D_MODEL_FOLLOW = ("word_embed_proj_dim", "embedding_size")


class _Units:
    """Which old unit each new unit copies (``direct``), and how many copies each old unit has."""

    def __init__(self, old: int, new: int, gen: torch.Generator) -> None:
        if new < old:
            raise ConfigError(f"width {new} is smaller than the current {old}: growth cannot shrink")
        self.old, self.new = old, new
        self.src = torch.cat([torch.arange(old), torch.randint(0, old, (new - old,), generator=gen)])
        self.count = torch.bincount(self.src, minlength=old).float()


def _expand(t: torch.Tensor, axis: int, role: Role, u: _Units, operator: str, gen: torch.Generator) -> torch.Tensor:
    if t.shape[axis] != u.old:
        raise ShapeError(f"expected size {u.old} along axis {axis}, got shape {tuple(t.shape)}")
    if operator == "direct":
        out = t.index_select(axis, u.src)
        if role == "in":
            shape = [1] * t.dim()
            shape[axis] = u.new
            out = out / u.count[u.src].reshape(shape).to(t.dtype)
        return out
    pad_shape = list(t.shape)
    pad_shape[axis] = u.new - u.old
    if operator == "random" and role != "unit":
        std = float(t.float().std()) if t.numel() > 1 else 0.02
        pad = (torch.randn(pad_shape, generator=gen) * std).to(t.dtype)
    else:
        pad = torch.zeros(pad_shape, dtype=t.dtype)
    return torch.cat([t, pad], dim=axis)


def _linear_roles(module: nn.Module, name: str) -> dict[int, Role]:
    if name == "bias":
        return {0: "out"}
    return {0: "in", 1: "out"} if is_conv1d(module) else {0: "out", 1: "in"}


def _grow_ffns(model: nn.Module, d_ff: int, operator: str, gen: torch.Generator) -> list[tuple[str, int]]:
    """Widen every FFN in place; returns (value projection path, old d_ff) per FFN."""
    done: list[tuple[str, int]] = []
    ffns = find_ffns(model)
    fused = [f.path for f in ffns if f.fused]
    if fused:
        raise UnsupportedModuleError(
            f"width growth of FFNs whose gate and up share one layer is not supported: {fused[:4]} "
            "(the new neurons would have to be inserted into both halves of the fused weight)"
        )
    for f in ffns:
        old = f.d_ff
        u = _Units(old, d_ff, gen)
        sides = [(f.key_proj, "out"), (f.value_proj, "in")] + ([(f.up_proj, "out")] if f.up_proj else [])
        for ref, side in sides:
            m = ref.module
            for pname, p in list(m.named_parameters(recurse=False)):
                roles = _linear_roles(m, pname)
                axis = next(a for a, r in roles.items() if r == side) if pname == "weight" else 0
                if pname == "bias" and side == "in":
                    continue
                new = _expand(p.detach(), axis, "out" if side == "out" else "in", u, operator, gen)
                setattr(m, pname, nn.Parameter(new, requires_grad=p.requires_grad))
            attr = (
                ("nf" if is_conv1d(m) else "out_features")
                if side == "out"
                else (None if is_conv1d(m) else "in_features")
            )
            if attr is not None and hasattr(m, attr):
                setattr(m, attr, d_ff)
        done.append((f.value_proj.path, old))
    return done


def _config_key(config: Any, keys: tuple[str, ...], what: str) -> str:
    d = config.to_dict()
    for k in keys:
        if k in d:
            return k
    raise UnsupportedModuleError(f"the model config has none of {list(keys)}; cannot change {what}")


def _grow_d_model(model: nn.Module, d_model: int, operator: str, gen: torch.Generator) -> nn.Module:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise UnsupportedModuleError(
            f"{type(model).__name__}: d_model growth needs a Hugging Face model (it is rebuilt from its config)"
        )
    key = _config_key(config, D_MODEL_KEYS, "d_model")
    old = int(getattr(config, key))
    u = _Units(old, d_model, gen)
    cfg = copy.deepcopy(config)
    ffns = find_ffns(model, strict=False)
    for k in D_FF_KEYS:  # keep d_ff where it is derived from d_model (GPT-2's n_inner=None)
        if k in cfg.to_dict() and ffns:
            setattr(cfg, k, ffns[0].d_ff)
            break
    heads = cfg.to_dict().get("num_attention_heads")
    if getattr(cfg, "head_dim", None) is None and isinstance(heads, int) and heads > 0 and old % heads == 0:
        cfg.head_dim = old // heads  # keep the heads' size (models that read config.head_dim)
    for k in D_MODEL_FOLLOW:  # widths defined equal to d_model (OPT's word_embed_proj_dim)
        if cfg.to_dict().get(k) == old:
            setattr(cfg, k, d_model)
    setattr(cfg, key, d_model)
    eps = cfg.to_dict().get("rms_norm_eps")
    if operator == "zero" and isinstance(eps, float):  # mean(x²) over d_new shrinks by d_old / d_new: so does eps
        cfg.rms_norm_eps = eps * old / d_model
    fresh = type(model)(cfg)
    modules = dict(model.named_modules())
    want = fresh.state_dict()
    new_sd: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        target = want.get(name)
        if target is None:
            raise UnsupportedModuleError(f"{name}: no such tensor in the widened model")
        t = t.detach()
        grown = [a for a in range(t.dim()) if t.shape[a] != target.shape[a]]
        mod_path, _, pname = name.rpartition(".")
        m = modules.get(mod_path)
        for a in grown:
            if (t.shape[a], target.shape[a]) != (old, d_model):
                raise UnsupportedModuleError(
                    f"{name}: axis {a} changes {t.shape[a]} -> {target.shape[a]}, not along d_model "
                    f"({old} -> {d_model}); this layout (e.g. fused q/k/v whose heads grow) is not supported"
                )
            if m is not None and (isinstance(m, nn.Linear) or is_conv1d(m)):
                role: Role = _linear_roles(m, pname)[a]
            elif m is not None and isinstance(m, nn.Embedding):
                role = "out"
            elif t.dim() == 1:
                role = "unit"
            else:
                raise UnsupportedModuleError(f"{name} ({type(m).__name__}): unknown role of axis {a}")
            t = _expand(t, a, role, u, operator, gen)
        rms = m is not None and "rmsnorm" in type(m).__name__.lower()
        if operator == "zero" and rms and pname == "weight" and grown:
            t = t * math.sqrt(old / d_model)
        new_sd[name] = t
    fresh.load_state_dict(new_sd, strict=True)
    return fresh


class WidthRamp(GrowthRamp):
    """The 0 -> 1 mask on the new FFN units of ``grow_width(..., operator="random")``.

    The FFN hidden activations of units ``old..new`` are multiplied by ``m = min(1, t / steps)``;
    :meth:`step` / :meth:`attach` / :meth:`remove` as for :class:`~modulart.stacking.GrowthRamp`.
    """

    def __init__(self, model: nn.Module, sites: list[tuple[str, int]], steps: int) -> None:
        self.model, self.block_paths, self.steps, self.t = model, [p for p, _ in sites], int(steps), 0
        self.registry = HookRegistry(model, name="stacking-width-ramp")
        for path, old in sites:
            self.registry.forward_pre(path, self._hook(old), priority=Priority.INTERVENE)

    def _hook(self, old: int) -> Any:
        def pre(m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            h = args[0]
            scale = torch.ones(h.shape[-1], dtype=h.dtype, device=h.device)
            scale[old:] = self.value
            return (h * scale, *args[1:])

        return pre


def grow_width(
    model: nn.Module,
    *,
    d_model: int | None = None,
    d_ff: int | None = None,
    operator: str = "direct",
    seed: int = 0,
    ramp_steps: int = 1000,
    loss_fn: Callable[[nn.Module], torch.Tensor] | None = None,
    learn_steps: int = 100,
    learn_lr: float = 1e-2,
) -> nn.Module:
    """A new, wider model (the source is not changed).

    Args:
        model: the source model.
        d_model: new residual width (Hugging Face models; ``direct`` and ``zero``).
        d_ff: new FFN width of every FFN block.
        operator: ``"direct"`` (split neurons), ``"zero"`` (zero padding), ``"random"`` (d_ff only,
            new units behind a :class:`WidthRamp` found with :func:`~modulart.stacking.get_ramp`) or
            ``"learn"`` (d_ff only, LiGO expansions fitted on ``loss_fn``, see
            :mod:`modulart.stacking.width_learn`).
        seed: seed of the unit copies (direct) and random units.
        ramp_steps: random: steps of the 0 -> 1 ramp.
        loss_fn: learn: ``loss_fn(model) -> scalar`` on a training batch.
        learn_steps / learn_lr: learn: Adam steps and learning rate of the expansions.

    Raises:
        ConfigError: nothing to grow, a width below the current one, or an unsupported combination
            (``random`` and ``learn`` are d_ff-only; ``learn`` needs ``loss_fn``).
        CompositionError: the source carries live modulart hooks (as :func:`~modulart.stacking.grow`).
    """
    if operator not in ("direct", "zero", "random", "learn"):
        raise ConfigError(f"operator = {operator!r}: must be one of 'direct', 'zero', 'random', 'learn'")
    if d_model is None and d_ff is None:
        raise ConfigError("grow_width needs d_model and/or d_ff")
    if operator in ("random", "learn") and d_model is not None:
        raise ConfigError(f"operator {operator!r} grows d_ff only (it acts on the new FFN units)")
    if operator == "learn" and loss_fn is None:
        raise ConfigError("operator 'learn' needs loss_fn(model) -> loss to fit the expansion matrices")
    for name, v in (("d_model", d_model), ("d_ff", d_ff)):
        if v is not None and not (isinstance(v, int) and v > 0):
            raise ConfigError(f"{name} = {v!r}: must be a positive int")
    gen = torch.Generator().manual_seed(seed)
    if d_ff is not None:  # check before building
        for f in find_ffns(model):
            if d_ff < f.d_ff:
                raise ConfigError(f"d_ff = {d_ff}: smaller than {f.path!r}'s current {f.d_ff}; growth cannot shrink")
    refuse_live_hooks(model, "grow_width()")
    out = copy.deepcopy(model)
    drop_copied_hooks(out, "grow_width()")
    sites: list[tuple[str, int]] = []
    if d_ff is not None:
        sites = _grow_ffns(out, d_ff, "zero" if operator == "learn" else operator, gen)
        if operator == "learn":
            from modulart.stacking.width_learn import learn_ffn_width

            assert loss_fn is not None
            learn_ffn_width(model, out, d_ff, loss_fn, steps=learn_steps, lr=learn_lr, generator=gen)
        cfg = getattr(out, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            for k in D_FF_KEYS:
                if k in cfg.to_dict():
                    setattr(cfg, k, d_ff)
                    break
    if d_model is not None:
        out = _grow_d_model(out, d_model, operator, gen)
    if operator == "random":
        object.__setattr__(out, "_modulart_growth_ramp", WidthRamp(out, sites, ramp_steps))
    out.train(model.training)
    return out
