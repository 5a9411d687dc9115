"""Per-family architecture knowledge, as data.

Nothing in modulart branches on model names. What a family's feed-forward and MoE blocks look like
lives here, in two tables keyed by module class (looked up along the MRO, so subclasses inherit
their parent's layout; classes may be given by name, so transformers is never imported):

- :data:`FFN_LAYOUTS`: module class -> :class:`FFNLayout` (where the key / up / value projections
  and the activation live, relative to the block);
- :data:`~modulart.core.moe_layouts.MOE_LAYOUTS` (in :mod:`modulart.core.moe_layouts`): module class ->
  :class:`~modulart.core.moe_layouts.MoELayout` (router, expert storage, scoring rule, shared experts).

Models that are not in the tables are handled by generic discovery (:func:`infer_ffn_layout`,
:func:`infer_moe_layout`) or by a user adapter, a few lines:

Example:
    >>> import torch
    >>> from torch import nn
    >>> import modulart as mt
    >>> class MyMLP(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.inp, self.out = nn.Linear(8, 32), nn.Linear(32, 8)
    ...     def forward(self, x):
    ...         return self.out(torch.nn.functional.gelu(self.inp(x)))
    >>> mt.register_ffn_layout(MyMLP, mt.FFNLayout(key="inp", value="out", activation=torch.nn.functional.gelu))
    >>> [f.path for f in mt.find_ffns(nn.Sequential(MyMLP(), MyMLP()))]
    ['0', '1']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeAlias, TypeVar

import torch
from torch import nn

from modulart.core.errors import ConfigError
from modulart.core.linear import LinearRef, is_linear_map

__all__ = [
    "BLOCK_GROWTH",
    "BLOCK_GROWTH_GENERIC",
    "FFN_LAYOUTS",
    "BlockGrowthInfo",
    "FFNLayout",
    "TypeTable",
    "block_position",
    "get_attr",
    "infer_ffn_layout",
    "register_ffn_layout",
]

V = TypeVar("V")
Activation: TypeAlias = Callable[[torch.Tensor], torch.Tensor]


class TypeTable(Generic[V]):
    """A mapping from module classes to values whose lookups walk the class's MRO.

    Keys are classes or class names (``"LlamaMLP"``); a name matches any class of that
    ``__name__`` (or fully qualified name) in the MRO. Later registrations win.

    Example:
        >>> from torch import nn
        >>> t: TypeTable[str] = TypeTable()
        >>> t.register(nn.Linear, "linear")
        >>> class MyLinear(nn.Linear): ...
        >>> t.lookup(MyLinear)
        'linear'
    """

    def __init__(self) -> None:
        self._by_type: dict[type, V] = {}
        self._by_name: dict[str, V] = {}

    def register(self, cls: type | str, value: V) -> None:
        """Map ``cls`` (a class or a class name) to ``value``."""
        if isinstance(cls, str):
            self._by_name[cls] = value
        else:
            self._by_type[cls] = value

    def unregister(self, cls: type | str) -> None:
        """Remove a registration (no error when absent)."""
        if isinstance(cls, str):
            self._by_name.pop(cls, None)
        else:
            self._by_type.pop(cls, None)

    def lookup(self, cls: type) -> V | None:
        """The value of the nearest class in ``cls.__mro__`` that has one, else None."""
        for c in cls.__mro__:
            if c in self._by_type:
                return self._by_type[c]
            for name in (c.__name__, f"{c.__module__}.{c.__qualname__}"):
                if name in self._by_name:
                    return self._by_name[name]
        return None

    def keys(self) -> list[str]:
        """Registered classes, as names."""
        return sorted([c.__name__ for c in self._by_type] + list(self._by_name))


def get_attr(root: Any, path: str) -> Any:
    """``root.a.b.c`` for ``path="a.b.c"`` (``""`` gives ``root``); raises AttributeError naming the path."""
    obj = root
    for part in filter(None, path.split(".")):
        if not hasattr(obj, part):
            raise AttributeError(f"{type(root).__name__} has no attribute path {path!r} (missing {part!r})")
        obj = getattr(obj, part)
    return obj


# --- FFN layouts --------------------------------------------------------------------------------
@dataclass(frozen=True)
class FFNLayout:
    """Where a feed-forward block keeps its parts, as attribute paths relative to the block.

    Attributes:
        key: first layer (the *gate* projection for gated FFNs): ``[d_ff, d_model]``.
        value: second layer: ``[d_model, d_ff]``.
        activation: attribute path of the activation (a module or function), or the callable.
        up: the up projection of a gated FFN (``h = σ(gate·x) ⊙ (up·x)``), else None.
        input: attribute path of the module whose forward's first argument is the FFN input
            (default: the block itself when gated, the key projection otherwise).
        fused_gate_up: ``key`` is one layer ``[2·d_ff, d_model]`` holding both the gate and the up
            projection: ``"gate_first"`` (rows ``[:d_ff]`` are the gate, Phi-3 / GLM-4),
            ``"up_first"`` (timm's ``GluMlp``: ``x1 * act(x2)``), or None (``up`` is separate).

    Example:
        >>> FFNLayout(key="gate_up_proj", value="down_proj", activation="act", fused_gate_up="gate_first").gated
        True
    """

    key: str
    value: str
    activation: str | Activation
    up: str | None = None
    input: str | None = None
    fused_gate_up: Literal["gate_first", "up_first"] | None = None

    def __post_init__(self) -> None:
        if self.fused_gate_up is not None and self.up is not None:
            raise ConfigError("FFNLayout: give either up= (a separate up projection) or fused_gate_up=, not both")
        if self.fused_gate_up not in (None, "gate_first", "up_first"):
            raise ConfigError(
                f"FFNLayout.fused_gate_up must be 'gate_first', 'up_first' or None, got {self.fused_gate_up!r}"
            )

    @property
    def gated(self) -> bool:
        """Whether the layout describes a gated FFN (separate or fused up projection)."""
        return self.up is not None or self.fused_gate_up is not None


_GATED = FFNLayout(key="gate_proj", up="up_proj", value="down_proj", activation="act_fn")
FFN_LAYOUTS: TypeTable[FFNLayout] = TypeTable()
for _name, _layout in {
    # plain two-layer FFNs
    "GPT2MLP": FFNLayout(key="c_fc", value="c_proj", activation="act"),
    "GPTNeoXMLP": FFNLayout(key="dense_h_to_4h", value="dense_4h_to_h", activation="act"),
    "T5DenseActDense": FFNLayout(key="wi", value="wo", activation="act"),
    "ViTMLP": FFNLayout(key="fc1", value="fc2", activation="activation_fn"),
    "OPTDecoderLayer": FFNLayout(key="fc1", value="fc2", activation="activation_fn"),
    "BertLayer": FFNLayout(
        key="intermediate.dense", value="output.dense", activation="intermediate.intermediate_act_fn"
    ),
    # gated FFNs
    "T5DenseGatedActDense": FFNLayout(key="wi_0", up="wi_1", value="wo", activation="act"),
    "LlamaMLP": _GATED,
    "MistralMLP": _GATED,
    "Qwen2MLP": _GATED,
    "Qwen2MoeMLP": _GATED,
    "MixtralMLP": _GATED,
    "OlmoeMLP": _GATED,
    "DeepseekV3MLP": _GATED,
}.items():
    FFN_LAYOUTS.register(_name, _layout)


def register_ffn_layout(cls: type[nn.Module] | str, layout: FFNLayout) -> None:
    """Teach modulart where the FFN parts of ``cls`` (and its subclasses) are.

    Example:
        >>> import modulart as mt
        >>> mt.register_ffn_layout("MyMLP", mt.FFNLayout(key="w_in", value="w_out", activation="act"))
    """
    FFN_LAYOUTS.register(cls, layout)


_GATE_NAMES = ("gate_proj", "w1", "wi_0", "gate", "w_gate", "fc_gate", "gate_up")
_UP_NAMES = ("up_proj", "w3", "wi_1", "up", "w_up", "fc_up")


def _is_activation(m: nn.Module) -> bool:
    if any(True for _ in m.parameters(recurse=False)) or list(m.children()):
        return False
    cls = type(m)
    return cls.__module__ == "torch.nn.modules.activation" or cls.__name__.endswith(("Activation", "GELU", "SiLU"))


def infer_ffn_layout(module: nn.Module) -> FFNLayout | None:
    """Guess the layout of an FFN block from its direct children, or None.

    Recognised: exactly one activation module child and either two linear children
    ``d -> f``, ``f -> d`` (plain), or three, ``d -> f`` twice and ``f -> d`` (gated, the gate and up
    told apart by their names: ``gate_proj``/``w1``/``wi_0``... vs ``up_proj``/``w3``/``wi_1``...).
    """
    children = dict(module.named_children())
    linears = {n: m for n, m in children.items() if is_linear_map(m)}
    acts = [n for n, m in children.items() if _is_activation(m)]
    if len(acts) != 1 or len(linears) not in (2, 3):
        return None
    shapes = {n: _in_out(m) for n, m in linears.items()}
    if len(linears) == 2:
        (a, (ai, ao)), (b, (bi, bo)) = shapes.items()
        if ai == bo and ao == bi:
            return FFNLayout(key=a, value=b, activation=acts[0])
        return None
    downs = [n for n, (i, o) in shapes.items() if sum(1 for (i2, o2) in shapes.values() if (i2, o2) == (o, i)) == 2]
    if len(downs) != 1:
        return None
    ups = [n for n in shapes if n != downs[0]]
    gate = [n for n in ups if n in _GATE_NAMES]
    up = [n for n in ups if n in _UP_NAMES]
    if len(gate) != 1 or len(up) != 1:
        return None
    return FFNLayout(key=gate[0], up=up[0], value=downs[0], activation=acts[0])


def _in_out(m: nn.Module) -> tuple[int, int]:
    ref = LinearRef(m, "")
    return ref.in_features, ref.out_features


# --- where a block sits -------------------------------------------------------------------------
def block_position(model: nn.Module, path: str) -> tuple[str | None, int | None]:
    """The block list (outermost ``ModuleList`` on the path) and the index within it.

    Example:
        >>> from torch import nn
        >>> m = nn.Module(); m.layers = nn.ModuleList([nn.Sequential(nn.Linear(2, 2)) for _ in range(3)])
        >>> block_position(m, "layers.2.0")
        ('layers', 2)
    """
    parts = path.split(".")
    obj: Any = model
    for i, part in enumerate(parts):
        if isinstance(obj, nn.ModuleList) and part.isdigit():
            return ".".join(parts[:i]), int(part)
        obj = getattr(obj, part, None)
        if obj is None:
            break
    return None, None


# --- growth (modulart.stacking): what a transformer block writes into the residual stream ---------
@dataclass(frozen=True)
class BlockGrowthInfo:
    """What depth growth needs to know about a block class, beyond its FFN / MoE view.

    Attributes:
        residual_outputs: attribute paths (relative to the block) of the modules whose outputs are
            added to the residual stream besides the FFN / MoE (attention output projections).
            Zeroing them and the FFN values turns a pre-norm block into the identity (G_zero).
        index_attrs: names of integer attributes of the block's submodules that store the block's
            own position (``layer_idx`` addresses the KV cache in Hugging Face models).
        first_block_only: submodules (paths relative to the block) that the model class builds
            only into the first block of its stack, whose result the stack hands to the later blocks
            (T5's relative attention bias: later blocks receive ``position_bias`` and never use
            their own). A copy of block 0 placed later drops them, which leaves the function as it
            is and makes the grown model what ``from_pretrained`` builds from the grown config.
        first_block_flags: boolean attributes (paths relative to the block) that are True only in
            the first block; set False in such copies.
    """

    residual_outputs: tuple[str, ...]
    index_attrs: tuple[str, ...] = ("layer_idx", "layer_id", "layer_index", "layer_number")
    first_block_only: tuple[str, ...] = ()
    first_block_flags: tuple[str, ...] = ()


BLOCK_GROWTH: TypeTable[BlockGrowthInfo] = TypeTable()
for _name, _info in {
    "LlamaDecoderLayer": ("self_attn.o_proj",),
    "MistralDecoderLayer": ("self_attn.o_proj",),
    "Qwen2DecoderLayer": ("self_attn.o_proj",),
    "Qwen2MoeDecoderLayer": ("self_attn.o_proj",),
    "MixtralDecoderLayer": ("self_attn.o_proj",),
    "OlmoeDecoderLayer": ("self_attn.o_proj",),
    "DeepseekV3DecoderLayer": ("self_attn.o_proj",),
    "GptOssDecoderLayer": ("self_attn.o_proj",),
    "GPT2Block": ("attn.c_proj", "crossattention.c_proj"),
    "GPTNeoXLayer": ("attention.dense",),
    "OPTDecoderLayer": ("self_attn.out_proj",),
    "BertLayer": ("attention.output.dense", "crossattention.output.dense"),
    "ViTLayer": ("attention.o_proj", "attention.output.dense"),
}.items():
    BLOCK_GROWTH.register(_name, BlockGrowthInfo(residual_outputs=_info))
for _name in ("T5Block", "MT5Block", "SwitchTransformersBlock"):  # relative position bias in block 0 only
    BLOCK_GROWTH.register(
        _name,
        BlockGrowthInfo(
            residual_outputs=("layer.0.SelfAttention.o", "layer.1.EncDecAttention.o"),
            first_block_only=("layer.0.SelfAttention.relative_attention_bias",),
            first_block_flags=("layer.0.SelfAttention.has_relative_attention_bias",),
        ),
    )
# generic fallback: attention output projections under these names (relative paths, suffix match)
BLOCK_GROWTH_GENERIC = BlockGrowthInfo(residual_outputs=("o_proj", "out_proj", "attn.c_proj", "attention.dense"))
