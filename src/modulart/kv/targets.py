"""Which stored tensors are "keys" and "values", block by block, whatever the storage.

A :class:`Part` is one stored parameter (or a slice of a fused one) that KV tuning trains, with the
axis along which the FFN's neurons lie in the *stored* orientation, so neuron masks can be built:

=======================================  ===================  ==========================
storage                                  keys (neuron axis)   values (neuron axis)
=======================================  ===================  ==========================
``nn.Linear``                            ``[d_ff, d]`` → 0    ``[d, d_ff]`` → 1
HF ``Conv1D`` (GPT-2)                    ``[d, d_ff]`` → 1    ``[d_ff, d]`` → 0
fused experts ``gate_up_proj``           ``[E, 2I, d]`` → 1   ``down_proj [E, d, I]`` → 2
GPT-OSS ``gate_up_proj`` (interleaved)   ``[E, d, 2I]`` → 2   ``down_proj [E, I, d]`` → 1
=======================================  ===================  ==========================

Fused storage keeps gate and up in one parameter (gate first half, or even columns when
interleaved): a part then covers only its slice of that axis (``expand``).

Example:
    >>> import torch
    >>> from modulart.kv.config import KVConfig
    >>> from modulart.kv.targets import resolve_parts
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    >>> [(p.name, p.role, p.axis) for p in resolve_parts(model, KVConfig(target="both"))]
    [('0.weight', 'key', 0), ('2.weight', 'value', 1)]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from modulart.core.errors import ConfigError, SelectorError, UnsupportedModuleError
from modulart.core.ffn import FFN, find_ffns
from modulart.core.linear import LinearRef, is_linear_like
from modulart.core.moe import MoE, find_moes
from modulart.core.select import as_selector, select_views
from modulart.kv.config import KVConfig

__all__ = ["Expand", "Part", "choose_blocks", "find_blocks", "neuron_keep", "resolve_parts"]

Expand = Literal["all", "first_half", "second_half", "even", "odd"]


@dataclass(eq=False)
class Part:
    """One trained tensor.

    Attributes:
        block: path of the FFN / MoE block it belongs to.
        role: ``key`` (plain first layer), ``gate``, ``up``, ``value``, or one of those + ``_bias``;
            ``extra``: a linear map of ``KVConfig.extra_lora`` (``block`` is its path, ``d_ff`` its outputs).
        name: the stored parameter's name in the model.
        param: the stored parameter.
        axis: the neuron axis in stored orientation (None: not indexed by neurons, e.g. value bias).
        expand: which entries of that axis belong to this part (fused gate/up halves).
        d_ff: neurons of the block (per expert).
        ref: the linear map in canonical orientation (None for fused experts).
    """

    block: str
    role: str
    name: str
    param: torch.Tensor
    axis: int | None
    d_ff: int
    expand: Expand = "all"
    ref: LinearRef | None = field(default=None, repr=False)

    @property
    def is_bias(self) -> bool:
        return self.role.endswith("_bias")

    @property
    def module(self) -> str | None:
        """The linear module's path (what PEFT targets), or None for fused experts."""
        return self.ref.path if self.ref is not None else None

    def keep(self, neurons: torch.Tensor) -> torch.Tensor:
        """``neurons [d_ff]`` bool -> bool vector over ``param.shape[axis]`` (this part's slice only)."""
        assert self.axis is not None
        n = int(self.param.shape[self.axis])
        out = torch.zeros(n, dtype=torch.bool, device=neurons.device)
        if self.expand == "all":
            out |= neurons
        elif self.expand == "first_half":
            out[: n // 2] = neurons
        elif self.expand == "second_half":
            out[n // 2 :] = neurons
        elif self.expand == "even":
            out[0::2] = neurons
        else:
            out[1::2] = neurons
        return out


Block = FFN | MoE


def find_blocks(model: nn.Module) -> list[Block]:
    """Dense FFNs and MoE blocks in module-definition (depth) order.

    Raises:
        UnsupportedModuleError: the model has neither (the message lists candidates).
    """
    ffns: list[Block] = list(find_ffns(model, strict=False))
    moes: list[Block] = list(find_moes(model, strict=False))
    if not ffns and not moes:
        find_ffns(model)  # raises with the candidates and the adapter how-to
    order = {p: i for i, (p, _) in enumerate(model.named_modules())}
    return sorted(ffns + moes, key=lambda b: order[b.path])


def choose_blocks(model: nn.Module, config: KVConfig) -> list[Block]:
    """The blocks ``config.layers`` selects (a ``select_layers`` spec or a list of block paths)."""
    return select_views(find_blocks(model), config.layers, field="KVConfig.layers", what="FFN/MoE block")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _ffn_parts(ffn: FFN, block: str, prefix: str, config: KVConfig, names: dict[int, str]) -> list[Part]:
    """Parts of one dense FFN (``prefix``: where the view's paths are relative to, "" for the model)."""
    refs: list[tuple[str, LinearRef, bool]] = []  # role, ref, key side
    if config.target in ("keys", "both"):
        if ffn.up_proj is None:
            refs.append(("key", ffn.key_proj, True))
        else:
            if config.keys in ("gate", "both"):
                refs.append(("gate", ffn.key_proj, True))
            if config.keys in ("up", "both"):
                refs.append(("up", ffn.up_proj, True))
    if config.target in ("values", "both"):
        refs.append(("value", ffn.value_proj, False))
    out: list[Part] = []
    for role, ref, key_side in refs:
        full = LinearRef(ref.module, _join(prefix, ref.path), rows=ref.rows)
        axis = int(key_side) ^ 1 ^ int(ref.transposed)  # canonical keys: rows (0); values: columns (1)
        # a fused gate/up layer holds two parts: its first and second half of rows
        expand: Expand = "all" if ref.rows is None else "first_half" if ref.rows.start == 0 else "second_half"
        out.append(Part(block, role, names[id(ref.param)], ref.param, axis, ffn.d_ff, expand, ref=full))
        bias = getattr(ref.module, "bias", None)
        if config.train_biases and isinstance(bias, torch.Tensor):
            b_axis = 0 if key_side else None
            out.append(
                Part(block, f"{role}_bias", names[id(bias)], bias, b_axis, ffn.d_ff, expand if key_side else "all")
            )
    return out


def _fused_parts(moe: MoE, config: KVConfig, names: dict[int, str]) -> list[Part]:
    """Parts of fused 3-D expert tensors, following the view's description of their storage."""
    spec = moe.fused_storage
    if spec is None or spec.flat:
        raise UnsupportedModuleError(
            f"{moe.path!r}: KV tuning of flattened expert storage ([E·I, d] tensors) is not supported"
        )
    gu, down = spec.gate_up, spec.down
    d_ff = moe.d_expert
    axis = 2 if spec.transposed else 1  # the neuron axis of gate/up
    if spec.up is not None:  # gate and up are separate tensors
        halves: dict[str, tuple[torch.Tensor, Expand]] = {"gate": (gu, "all"), "up": (spec.up, "all")}
    elif spec.interleaved:
        halves = {"gate": (gu, "odd" if spec.up_first else "even"), "up": (gu, "even" if spec.up_first else "odd")}
    else:
        halves = {
            "gate": (gu, "second_half" if spec.up_first else "first_half"),
            "up": (gu, "first_half" if spec.up_first else "second_half"),
        }
    out: list[Part] = []
    if config.target in ("keys", "both"):
        roles = [r for r in ("gate", "up") if config.keys in (r, "both")]
        for role in roles:
            tensor, expand = halves[role]
            out.append(Part(moe.path, role, names[id(tensor)], tensor, axis, d_ff, expand))
            bias = spec.gate_up_bias
            if config.train_biases and isinstance(bias, torch.Tensor) and spec.up is None:
                out.append(Part(moe.path, f"{role}_bias", names[id(bias)], bias, 1, d_ff, expand))
    if config.target in ("values", "both"):
        out.append(Part(moe.path, "value", names[id(down)], down, 1 if spec.down_transposed else 2, d_ff))
        if config.train_biases and isinstance(spec.down_bias, torch.Tensor):
            out.append(Part(moe.path, "value_bias", names[id(spec.down_bias)], spec.down_bias, None, d_ff))
    return out


def resolve_parts(model: nn.Module, config: KVConfig, blocks: list[Block] | None = None) -> list[Part]:
    """Every tensor KV tuning trains under ``config`` (changes nothing).

    The FFN / MoE parts come in depth order, then the linear maps of ``config.extra_lora`` in model
    order (each once; one that is already an FFN part is not repeated).
    """
    names = _names(model)
    out: list[Part] = []
    for b in choose_blocks(model, config) if blocks is None else blocks:
        if isinstance(b, FFN):
            out += _ffn_parts(b, b.path, "", config, names)
        elif b.layout.storage == "module_list":
            experts_path = _join(b.path, b.layout.experts)
            for f in find_ffns(b.experts_module, strict=False):
                out += _ffn_parts(f, b.path, experts_path, config, names)
        else:
            out += _fused_parts(b, config, names)
    return out + _extra_parts(model, config, names, {id(p.param) for p in out})


def _extra_parts(model: nn.Module, config: KVConfig, names: dict[int, str], taken: set[int]) -> list[Part]:
    """``extra_lora``: further linear maps with a LoRA delta (role ``extra``, ``block`` = their path).

    Raises:
        UnsupportedModuleError: a selected module is not an ``nn.Linear`` / HF ``Conv1D``.
        SelectorError: a pattern matches nothing.
    """
    if not config.extra_lora:
        return []
    out: list[Part] = []
    try:
        selected = as_selector(list(config.extra_lora)).select(model)
    except SelectorError as e:
        raise SelectorError(f"KVConfig.extra_lora = {list(config.extra_lora)!r}: {e}") from None
    for path, m in selected:
        if not is_linear_like(m):
            raise UnsupportedModuleError(
                f"KVConfig.extra_lora selects {path!r}, a {type(m).__name__}; expected nn.Linear or a HF Conv1D"
            )
        ref = LinearRef(m, path)
        if id(ref.param) in taken:
            continue
        taken.add(id(ref.param))
        out.append(Part(path, "extra", names[id(ref.param)], ref.param, None, ref.out_features, ref=ref))
    return out


def neuron_keep(blocks: list[Block], config: KVConfig) -> dict[str, torch.Tensor]:
    """Per block path, the ``[d_ff]`` bool vector of neurons that mode ``mask`` keeps trainable.

    A fraction picks ``max(1, round(f * d_ff))`` neurons per block at random (seeded by ``seed`` and
    the block's position); a dict gives the indices (blocks left out keep every neuron). The experts
    of an MoE block share one choice.

    Raises:
        ConfigError: a dict names a block that is not selected or an index outside ``[0, d_ff)``.
    """
    out: dict[str, torch.Tensor] = {}
    spec = config.neurons
    sizes = {b.path: (b.d_ff if isinstance(b, FFN) else b.d_expert) for b in blocks}
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(sizes))
        if unknown:
            raise ConfigError(
                f"KVConfig.neurons names blocks that are not selected: {unknown}; selected: {list(sizes)}"
            )
    for i, (path, d_ff) in enumerate(sizes.items()):
        keep = torch.zeros(d_ff, dtype=torch.bool)
        if isinstance(spec, dict):
            idx = spec.get(path)
            if idx is None:
                keep[:] = True
            else:
                bad = [j for j in idx if not 0 <= j < d_ff]
                if bad:
                    raise ConfigError(f"KVConfig.neurons[{path!r}]: indices {bad[:5]} outside [0, {d_ff})")
                keep[list(idx)] = True
        else:
            k = max(1, round(float(spec) * d_ff))
            g = torch.Generator().manual_seed(int(config.seed) * 100_003 + i)
            keep[torch.randperm(d_ff, generator=g)[:k]] = True
        out[path] = keep
    return out
