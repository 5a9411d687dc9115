"""The family zoo: tiny random models of many architectures, each with ground truth written down by
reading the family's own modeling code (transformers v5.24), never by asking modulart.

Every entry builds a seed-deterministic model (hidden 32, 2-3 layers, vocabulary 128, few experts)
from its config (``AutoConfig.for_model`` + ``from_config``, eager attention) in well under a
second. Weights are random and non-zero everywhere except norms — Hugging Face initialises routers
to zero, which would make every routing decision a tie and hide routing bugs — and the
zero-initialised selection-bias buffers (``e_score_correction_bias``, ``expert_bias``) get random
values comparable to the scores they are added to, so selection and weighting really differ.

Ground truth per entry (:class:`Entry`): the kind of model and its inputs; the dense FFN blocks
(:class:`FFNFacts`: block class, count, d_ff, gated or not, fused gate/up, activation, sibling
layout) and the MoE blocks (:class:`MoEFacts`: scoring rule, renormalisation, selection bias,
groups, scaling, expert storage orientation, router and container names, shared experts); and what
the library is expected to do (``"exact"``: views that recompute the block; ``"refuse"``: a typed
:class:`~modulart.core.errors.UnsupportedModuleError`, because the block's semantics lie outside
what a view can express; ``"either"``: outside the documented contract but expressible, so an exact
view or a typed refusal are both acceptable — a wrong view never is).

Families that do not build tiny on CPU are listed in :data:`SKIPPED` with the reason.
Non-HF blocks (``torch.nn.Transformer*Layer``, timm-style ``Mlp`` / ``GluMlp`` / ``SwiGLU``, a
nanoGPT block, a plain ``Sequential`` MLP and negative cases) are faithful replicas written here:
timm needs torchvision, which may pull a CUDA build of torch, so timm itself is not installed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

import modulart as mt
from families import PlainTransformer

Kind = Literal["causal", "encoder", "seq2seq", "vision", "non_hf"]
Support = Literal["exact", "refuse", "either"]
Storage = Literal[
    "fused",  # gate_up_proj [E, 2I, d] (gate rows first, chunk(2)), down_proj [E, d, I]
    "fused_t",  # gate_up_proj [E, d, 2I] (gate columns first, chunk(2)), down_proj [E, I, d]
    "fused_interleaved_t",  # GPT-OSS: gate_up_proj [E, d, 2I], gate = columns 0::2, up = 1::2, + biases
    "flat",  # DBRX: w1 / v1 / w2 each [E*I, d]; expert e's down is w2[e]^T
    "parallel",  # JetMoE: input_linear.weight [E, 2I, d] (gate first), output_linear.weight [E, d, I]
    "module_dict",  # one FFN module per expert in a ModuleDict
]
Scoring = Literal[
    "softmax_topk",  # softmax over all experts, top-k of the probabilities (renorm optional)
    "topk_softmax",  # top-k of the logits, softmax over those k
    "sigmoid_topk",  # sigmoid scores, selection (+ bias, groups), weights = unbiased scores
    "topk_sigmoid_input",  # Llama 4: top-k logits, sigmoid, the weight scales the expert INPUT
    "softmax_group_greedy",  # DeepSeek-V2: softmax, groups ranked by their max, masked to 0, top-k
    "sparsemixer",  # PhiMoE: iterative masked-softmax top-2 (eval mode)
    "top1_capacity",  # Switch: argmax of softmax, weight = max prob, tokens over capacity dropped
]

D, VOCAB = 32, 128


class Maker(Protocol):
    """``make(seed, random_weights=True) -> (model, inputs)``."""

    def __call__(self, seed: int, random_weights: bool = True) -> tuple[nn.Module, dict[str, torch.Tensor]]: ...


@dataclass(frozen=True)
class FFNFacts:
    """Dense feed-forward blocks of a model.

    Attributes:
        block: class name(s) of the module a view should sit on (the smallest module holding both
            the key and the value projection: the MLP, or the layer for sibling layouts).
        n: number of dense FFN blocks (shared experts of MoE blocks are not counted).
        d_ff: hidden width.
        gated: ``h = σ(gate·x) ⊙ (up·x)``.
        activation: what the model computes as σ (class, or function for function activations).
        fused_gate_up: gate and up rows in one Linear, split with ``chunk(2)``.
        gate_last: with ``fused_gate_up``: the gate is the SECOND half (timm ``GluMlp``).
        sibling: key and value projections live in different child modules of the layer
            (BERT's ``intermediate.dense`` / ``output.dense``, OPT's ``fc1`` / ``fc2`` on the layer).
        transposed: weights stored ``[in, out]`` (HF ``Conv1D``).
        note: anything else a view must get right.
    """

    block: tuple[str, ...]
    n: int
    d_ff: int
    gated: bool
    activation: str
    fused_gate_up: bool = False
    gate_last: bool = False
    sibling: bool = False
    transposed: bool = False
    note: str = ""


@dataclass(frozen=True)
class MoEFacts:
    """MoE blocks of a model.

    Attributes:
        block: class name of the MoE block (the module whose output is the routed sum).
        n: number of MoE blocks.
        num_experts / top_k / d_expert: as configured.
        scoring: the routing rule (see :data:`Scoring`).
        renorm: top-k weights renormalised to sum to one.
        selection_bias: attribute path (relative to the block) of a bias added for selection only.
        grouped: group-limited selection (n_group / topk_group).
        scaling: routed scaling factor applied to the weights.
        storage: expert storage (see :data:`Storage`).
        router: attribute path of the module holding the router weight ``[E, d]``.
        container: attribute path of the experts container.
        shared: attribute paths of shared (always-on) experts, relative to the block.
        shared_gated: shared experts scaled by ``sigmoid(Linear(d, 1))``.
        shared_outside: the shared expert is a sibling of the block in the decoder layer.
        activation: expert activation.
        note: anything else.
    """

    block: str
    n: int
    num_experts: int
    top_k: int
    d_expert: int
    scoring: Scoring
    renorm: bool
    storage: Storage
    router: str
    container: str = "experts"
    selection_bias: str | None = None
    grouped: bool = False
    scaling: float = 1.0
    shared: tuple[str, ...] = ()
    shared_gated: bool = False
    shared_outside: bool = False
    activation: str = "SiLUActivation"
    note: str = ""


@dataclass(frozen=True)
class Entry:
    """One family of the zoo: how to build it and what is true about it."""

    name: str
    kind: Kind
    make: Maker
    ffn: FFNFacts | None = None
    moe: MoEFacts | None = None
    ffn_support: Support = "exact"
    moe_support: Support = "exact"
    why: str = ""  # for refuse / either: why a view may not be able to be exact
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def n_ffn(self) -> int:
        return self.ffn.n if self.ffn is not None else 0

    @property
    def n_moe(self) -> int:
        return self.moe.n if self.moe is not None else 0

    @property
    def is_hf(self) -> bool:
        return self.kind != "non_hf"


@dataclass
class Built:
    """A built zoo model with its inputs."""

    entry: Entry
    model: nn.Module
    inputs: dict[str, torch.Tensor]
    seconds: float

    def run(self) -> Any:
        with torch.no_grad():
            return self.model(**self.inputs)

    def output(self) -> torch.Tensor:
        """The main output tensor (logits, or the last hidden state)."""
        return main_output(self.run())


def main_output(out: Any) -> torch.Tensor:
    """Logits, else the last hidden state, else the tensor itself."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"no main output in {type(out).__name__}")


# --- weights --------------------------------------------------------------------------------------
# Zero-initialised tensors that take part in routing: DeepSeek-V3 / GLM-4-MoE / dots1 / ERNIE 4.5
# ``e_score_correction_bias``, LFM2-MoE ``expert_bias``.
SELECTION_BIASES = ("e_score_correction_bias", "expert_bias")


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random non-zero values for every parameter except norms; random selection biases; eval mode."""
    g = torch.Generator().manual_seed(seed)
    # sinusoidal position tables (Marian...) are parameters the model class recomputes on load:
    # random values there would make every save/reload comparison differ for reasons of the zoo's own
    fixed = {
        f"{p}.{n}" if p else n
        for p, m in model.named_modules()
        if "sinusoidal" in type(m).__name__.lower()
        for n, _ in m.named_parameters(recurse=False)
    }
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name in fixed:
                continue
            if leaf in SELECTION_BIASES:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.dim() >= 1 and "norm" not in name.lower():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for name, b in model.named_buffers():
            if name.rsplit(".", 1)[-1] in SELECTION_BIASES:
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)
    return model.eval()


def _ids(seed: int, shape: tuple[int, int] = (2, 7)) -> torch.Tensor:
    return torch.randint(1, 100, shape, generator=torch.Generator().manual_seed(seed))


# --- Hugging Face builders ---------------------------------------------------------------------------
_ATTN = {"num_attention_heads": 2, "num_key_value_heads": 2}
_LLAMA = {"hidden_size": D, "intermediate_size": 64, "num_hidden_layers": 2, "vocab_size": VOCAB, **_ATTN}
_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _hf(model_type: str, auto: str, kw: dict[str, Any], inputs: str = "ids") -> Maker:
    def make(seed: int, random_weights: bool = True) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        import transformers

        torch.manual_seed(seed)
        cfg = transformers.AutoConfig.for_model(model_type, **kw)
        cls = getattr(transformers, auto)
        model = cls.from_config(cfg, attn_implementation="eager")
        model = randomize(model, seed) if random_weights else model.eval()
        ids = _ids(seed)
        if inputs == "pixels":
            return model, {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))}
        if inputs == "seq2seq":
            return model, {"input_ids": ids, "decoder_input_ids": _ids(seed + 1, (2, 5))}
        return model, {"input_ids": ids}

    return make


def _causal(model_type: str, **kw: Any) -> Maker:
    return _hf(model_type, "AutoModelForCausalLM", kw)


def _encoder(model_type: str, **kw: Any) -> Maker:
    return _hf(model_type, "AutoModel", kw)


def _seq2seq(model_type: str, **kw: Any) -> Maker:
    return _hf(model_type, "AutoModelForSeq2SeqLM", kw, inputs="seq2seq")


def _vision(model_type: str, **kw: Any) -> Maker:
    return _hf(model_type, "AutoModel", kw, inputs="pixels")


_BERT = {"hidden_size": D, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
_BART = {
    "d_model": D,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    **_TOKENS,
    "decoder_start_token_id": 2,
}
_T5 = {
    "d_model": D,
    "d_ff": 64,
    "d_kv": 8,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_heads": 2,
    "vocab_size": VOCAB,
    "decoder_start_token_id": 0,
}
_VIT = {
    "hidden_size": D,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 16,
    "patch_size": 4,
}
_DSV3_ATTN = {
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
}
_GROUPED = {
    "moe_intermediate_size": 16,
    "num_hidden_layers": 3,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
}


def _gated(block: str, n: int = 2, d_ff: int = 64, act: str = "SiLUActivation", **kw: Any) -> FFNFacts:
    return FFNFacts(block=(block,), n=n, d_ff=d_ff, gated=True, activation=act, **kw)


def _plain(
    block: str | tuple[str, ...], n: int = 2, d_ff: int = 64, act: str = "GELUActivation", **kw: Any
) -> FFNFacts:
    return FFNFacts(
        block=(block,) if isinstance(block, str) else block, n=n, d_ff=d_ff, gated=False, activation=act, **kw
    )


def _bert_like(prefix: str, act: str = "GELUActivation") -> FFNFacts:
    return _plain(
        f"{prefix}Layer",
        act=act,
        sibling=True,
        note="key intermediate.dense, value output.dense; output adds the residual and LayerNorm after the value",
    )


def _bart_like(prefix: str, act: str = "GELUActivation") -> FFNFacts:
    return _plain(
        (f"{prefix}EncoderLayer", f"{prefix}DecoderLayer"),
        n=4,
        act=act,
        sibling=True,
        note="fc1 / activation_fn / fc2 directly on the encoder and decoder layers",
    )


# --- non-HF models (faithful replicas, written here) ---------------------------------------------------
class TorchEncoderLM(nn.Module):
    """Embedding, ``nn.TransformerEncoderLayer`` x 2 (post-norm, batch_first), linear head."""

    def __init__(self, activation: str = "relu", decoder: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        layer: Callable[[], nn.Module]
        if decoder:
            layer = lambda: nn.TransformerDecoderLayer(D, 2, 64, activation=activation, batch_first=True)  # noqa: E731
        else:
            layer = lambda: nn.TransformerEncoderLayer(D, 2, 64, activation=activation, batch_first=True)  # noqa: E731
        self.layers = nn.ModuleList([layer() for _ in range(2)])
        self.decoder = decoder
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        memory = x
        for layer in self.layers:
            x = layer(x, memory) if self.decoder else layer(x)
        return self.head(x)  # type: ignore[no-any-return]


class TimmMlp(nn.Module):
    """Replica of ``timm.layers.Mlp``: fc1, act, drop1, norm, fc2, drop2."""

    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, f)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(f, d)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))  # type: ignore[no-any-return]


class TimmGluMlp(nn.Module):
    """Replica of ``timm.layers.GluMlp`` (defaults: sigmoid, ``gate_last=True``): fc1 -> chunk(2),
    ``x1 * act(x2)`` — the gate is the SECOND half."""

    def __init__(self, d: int, f: int, act: type[nn.Module] = nn.Sigmoid, gate_last: bool = True) -> None:
        super().__init__()
        self.chunk_dim = -1
        self.gate_last = gate_last
        self.fc1 = nn.Linear(d, 2 * f)
        self.act = act()
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(f, d)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.fc1(x).chunk(2, dim=self.chunk_dim)
        x = x1 * self.act(x2) if self.gate_last else self.act(x1) * x2
        return self.drop2(self.fc2(self.norm(self.drop1(x))))  # type: ignore[no-any-return]


class TimmSwiGLU(nn.Module):
    """Replica of ``timm.layers.SwiGLU``: fc1_g (gate), fc1_x (up), SiLU, drop1, norm, fc2, drop2."""

    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.fc1_g = nn.Linear(d, f)
        self.fc1_x = nn.Linear(d, f)
        self.act = nn.SiLU()
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(f, d)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1_g(x)) * self.fc1_x(x)
        return self.drop2(self.fc2(self.norm(self.drop1(h))))  # type: ignore[no-any-return]


class ViTBlock(nn.Module):
    """A timm-style pre-norm block around one of the MLPs above."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(D)
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))  # type: ignore[no-any-return]


class Blocks(nn.Module):
    """Embedding, a list of blocks, head: ``ids [B, T] -> logits [B, T, V]``."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)  # type: ignore[no-any-return]


class NanoAttention(nn.Module):
    """nanoGPT ``CausalSelfAttention``: c_attn (qkv), c_proj."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn = nn.Linear(D, 3 * D)
        self.c_proj = nn.Linear(D, D)
        self.n_head = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))  # type: ignore[no-any-return]


class NanoMLP(nn.Module):
    """nanoGPT ``MLP``: c_fc, GELU, c_proj, dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.c_fc = nn.Linear(D, 4 * D)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * D, D)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # type: ignore[no-any-return]


class NanoBlock(nn.Module):
    """nanoGPT ``Block``: ln_1, attn, ln_2, mlp."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(D)
        self.attn = NanoAttention()
        self.ln_2 = nn.LayerNorm(D)
        self.mlp = NanoMLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))  # type: ignore[no-any-return]


class ResidualInsideMLP(nn.Module):
    """NEGATIVE: a skip connection around the activation, ``fc2(act(fc1 x) + fc1 x)``: the input of
    the value projection is not σ of the key pre-activation, so no FFN view can be exact."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, 64)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(64, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(self.act(h) + h)  # type: ignore[no-any-return]


def _non_hf(factory: Callable[[], nn.Module], inputs: str = "ids") -> Maker:
    def make(seed: int, random_weights: bool = True) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        torch.manual_seed(seed)
        model = randomize(factory(), seed) if random_weights else factory().eval()
        if inputs == "x":
            return model, {"input": torch.randn(2, 7, D, generator=torch.Generator().manual_seed(seed))}
        return model, {"ids": _ids(seed)}

    return make


# --- the zoo -----------------------------------------------------------------------------------------
_GELU_TANH = "GELUTanh (gelu_pytorch_tanh)"
_NEW_GELU = "NewGELUActivation (gelu_new)"
_RELU2 = "ReLUSquaredActivation (relu2)"

ENTRIES: list[Entry] = [
    # ---- causal, plain two-layer FFNs
    Entry(
        "gpt2",
        "causal",
        _causal(
            "gpt2", n_embd=D, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
        ),
        ffn=_plain("GPT2MLP", d_ff=128, act=_NEW_GELU, transposed=True, note="c_fc / c_proj are HF Conv1D"),
    ),
    Entry(
        "gpt_neox",
        "causal",
        _causal(
            "gpt_neox",
            hidden_size=D,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=VOCAB,
            bos_token_id=0,
            eos_token_id=0,
        ),
        ffn=_plain("GPTNeoXMLP", note="dense_h_to_4h / act / dense_4h_to_h; parallel residual"),
    ),
    Entry(
        "gpt_neo",
        "causal",
        _causal(
            "gpt_neo",
            hidden_size=D,
            num_layers=2,
            num_heads=2,
            vocab_size=VOCAB,
            intermediate_size=64,
            attention_types=[[["global", "local"], 1]],
            max_position_embeddings=64,
            window_size=4,
            bos_token_id=0,
            eos_token_id=0,
        ),
        ffn=_plain("GPTNeoMLP", act=_NEW_GELU, note="c_fc / c_proj are nn.Linear (not Conv1D), then dropout"),
    ),
    Entry(
        "gpt_bigcode",
        "causal",
        _causal(
            "gpt_bigcode",
            n_embd=D,
            n_layer=2,
            n_head=2,
            vocab_size=VOCAB,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
        ffn=_plain("GPTBigCodeMLP", d_ff=128, act=_GELU_TANH, note="c_fc / c_proj nn.Linear; n_inner = 4 d"),
    ),
    Entry(
        "gptj",
        "causal",
        _causal(
            "gptj",
            n_embd=D,
            n_layer=2,
            n_head=2,
            vocab_size=VOCAB,
            n_positions=64,
            rotary_dim=8,
            bos_token_id=0,
            eos_token_id=0,
        ),
        ffn=_plain("GPTJMLP", d_ff=128, act=_NEW_GELU, note="fc_in / fc_out; attention and MLP in parallel"),
    ),
    Entry(
        "codegen",
        "causal",
        _causal(
            "codegen",
            n_embd=D,
            n_layer=2,
            n_head=2,
            vocab_size=VOCAB,
            n_positions=64,
            n_ctx=64,
            rotary_dim=8,
            bos_token_id=0,
            eos_token_id=0,
        ),
        ffn=_plain("CodeGenMLP", d_ff=128, act=_NEW_GELU, note="fc_in / fc_out; parallel attention"),
    ),
    Entry(
        "bloom",
        "causal",
        _causal("bloom", hidden_size=D, n_layer=2, n_head=2, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0),
        ffn=_plain(
            "BloomMLP",
            d_ff=128,
            act="BloomGelu (tanh approximation, custom module)",
            note="forward(hidden, residual) adds the residual INSIDE the MLP: y is dense_4h_to_h's output",
        ),
    ),
    Entry(
        "falcon",
        "causal",
        _causal(
            "falcon",
            hidden_size=D,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=VOCAB,
            bos_token_id=0,
            eos_token_id=0,
        ),
        ffn=_plain("FalconMLP", d_ff=128, note="FalconLinear (nn.Linear subclass, x @ W.T + b); parallel attention"),
    ),
    Entry(
        "mpt",
        "causal",
        _causal(
            "mpt",
            d_model=D,
            n_heads=2,
            n_layers=2,
            vocab_size=VOCAB,
            max_seq_len=64,
            expansion_ratio=4,
            bos_token_id=0,
            eos_token_id=0,
        ),
        ffn=_plain(
            "MptMLP",
            d_ff=128,
            act="nn.GELU(approximate='none')",
            note="up_proj / down_proj NOT gated; forward(hidden, residual) adds the residual inside; "
            "the width is hard-coded 4 d",
        ),
    ),
    Entry(
        "phi",
        "causal",
        _causal(
            "phi",
            hidden_size=D,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=VOCAB,
            bos_token_id=0,
            eos_token_id=0,
        ),
        ffn=_plain("PhiMLP", act=_NEW_GELU, note="fc1 / fc2; parallel attention"),
    ),
    Entry(
        "persimmon",
        "causal",
        _causal(
            "persimmon",
            hidden_size=D,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=VOCAB,
            **_TOKENS,
        ),
        ffn=_plain("PersimmonMLP", act=_RELU2, note="dense_h_to_4h / dense_4h_to_h"),
    ),
    Entry(
        "starcoder2",
        "causal",
        _causal("starcoder2", **_LLAMA, **_TOKENS),
        ffn=_plain("Starcoder2MLP", act=_GELU_TANH, note="c_fc / c_proj with biases, functional dropout after"),
    ),
    Entry(
        "nemotron",
        "causal",
        _causal("nemotron", **_LLAMA, head_dim=16, **_TOKENS),
        ffn=_plain("NemotronMLP", act=_RELU2, note="up_proj / down_proj but NOT gated (no gate_proj)"),
    ),
    Entry(
        "arcee",
        "causal",
        _causal("arcee", **_LLAMA, **_TOKENS),
        ffn=_plain("ArceeMLP", act=_RELU2, note="up_proj / down_proj, not gated"),
    ),
    Entry(
        "apertus",
        "causal",
        _causal("apertus", **_LLAMA, **_TOKENS),
        ffn=_plain(
            "ApertusMLP",
            act="XIELUActivation (has its own parameters alpha_p / alpha_n)",
            note="up_proj / down_proj, not gated; the activation module has parameters",
        ),
    ),
    Entry(
        "opt",
        "causal",
        _causal(
            "opt",
            hidden_size=D,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=VOCAB,
            word_embed_proj_dim=D,
            max_position_embeddings=64,
            **_TOKENS,
        ),
        ffn=_plain("OPTDecoderLayer", act="nn.ReLU", sibling=True, note="fc1 / activation_fn / fc2 on the layer"),
    ),
    Entry(
        "xglm",
        "causal",
        _causal(
            "xglm",
            d_model=D,
            ffn_dim=64,
            num_layers=2,
            attention_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            **_TOKENS,
        ),
        ffn=_plain("XGLMDecoderLayer", sibling=True, note="fc1 / activation_fn / fc2 on the layer"),
    ),
    Entry(
        "biogpt",
        "causal",
        _causal(
            "biogpt",
            hidden_size=D,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=VOCAB,
            **_TOKENS,
        ),
        ffn=_plain("BioGptDecoderLayer", sibling=True, note="fc1 / activation_fn / fc2 on the layer"),
    ),
    # ---- causal, gated (gate_proj / up_proj / down_proj)
    *[
        Entry(name, "causal", _causal(name, **_LLAMA, **extra, **_TOKENS), ffn=_gated(block, act=act))
        for name, block, act, extra in [
            ("llama", "LlamaMLP", "SiLUActivation", {}),
            ("mistral", "MistralMLP", "SiLUActivation", {}),
            ("qwen2", "Qwen2MLP", "SiLUActivation", {}),
            ("qwen3", "Qwen3MLP", "SiLUActivation", {"head_dim": 16}),
            ("gemma", "GemmaMLP", _GELU_TANH, {"head_dim": 16}),
            ("gemma2", "Gemma2MLP", _GELU_TANH, {"head_dim": 16, "sliding_window": 4}),
            ("gemma3_text", "Gemma3MLP", _GELU_TANH, {"head_dim": 16, "sliding_window": 4}),
            ("cohere", "CohereMLP", "SiLUActivation", {}),
            ("granite", "GraniteMLP", "SiLUActivation", {}),
            ("stablelm", "StableLmMLP", "SiLUActivation", {}),
            ("olmo", "OlmoMLP", "SiLUActivation", {}),
            ("olmo2", "Olmo2MLP", "SiLUActivation", {}),
            ("olmo3", "Olmo3MLP", "SiLUActivation", {}),
            ("helium", "HeliumMLP", "SiLUActivation", {"head_dim": 16}),
            ("smollm3", "SmolLM3MLP", "SiLUActivation", {}),
            ("exaone4", "Exaone4MLP", "SiLUActivation", {}),
            ("seed_oss", "SeedOssMLP", "SiLUActivation", {"head_dim": 16}),
            ("ernie4_5", "Ernie4_5MLP", "SiLUActivation", {"head_dim": 16}),
            ("hunyuan_v1_dense", "HunYuanDenseV1MLP", "SiLUActivation", {"head_dim": 16}),
        ]
    ],
    # ---- causal, fused gate_up (one Linear, chunk(2), gate first)
    *[
        Entry(
            name,
            "causal",
            _causal(name, **_LLAMA, **extra, **_TOKENS),
            ffn=_gated(block, fused_gate_up=True, note="gate_up_proj [2 d_ff, d]: gate rows first; up * act(gate)"),
        )
        for name, block, extra in [
            ("phi3", "Phi3MLP", {}),
            ("glm", "GlmMLP", {"head_dim": 16}),
            ("glm4", "Glm4MLP", {"head_dim": 16}),
        ]
    ],
    # ---- encoders (sibling intermediate / output)
    *[
        Entry(name, "encoder", _encoder(name, **_BERT, vocab_size=VOCAB, **extra), ffn=_bert_like(prefix))
        for name, prefix, extra in [
            ("bert", "Bert", {}),
            ("roberta", "Roberta", {"pad_token_id": 1}),
            ("xlm-roberta", "XLMRoberta", {"pad_token_id": 1}),
            ("camembert", "Camembert", {"pad_token_id": 1}),
            ("electra", "Electra", {"embedding_size": D}),
            ("ernie", "Ernie", {}),
            ("deberta-v2", "DebertaV2", {}),
        ]
    ],
    Entry(
        "distilbert",
        "encoder",
        _encoder("distilbert", dim=D, hidden_dim=64, n_layers=2, n_heads=2, vocab_size=VOCAB),
        ffn=_plain("FFN", act="nn.GELU", note="lin1 / activation / lin2 / dropout through apply_chunking_to_forward"),
    ),
    Entry(
        "albert",
        "encoder",
        _encoder("albert", **_BERT, vocab_size=VOCAB, embedding_size=D),
        ffn=_plain(
            "AlbertLayer",
            n=1,
            act=_NEW_GELU,
            sibling=True,
            note="ffn / activation / ffn_output on the layer; ONE layer module shared by all 2 layers "
            "(it runs twice per forward)",
        ),
    ),
    # ---- seq2seq
    Entry(
        "t5",
        "seq2seq",
        _seq2seq("t5", **_T5, feed_forward_proj="relu"),
        ffn=_plain("T5DenseActDense", n=4, act="nn.ReLU", note="wi / act / dropout / wo; encoder and decoder"),
    ),
    Entry(
        "t5_gated",
        "seq2seq",
        _seq2seq("t5", **_T5, feed_forward_proj="gated-gelu"),
        ffn=_gated("T5DenseGatedActDense", n=4, act=_NEW_GELU, note="wi_0 (gate) / wi_1 (up) / wo"),
    ),
    Entry(
        "mt5",
        "seq2seq",
        _seq2seq("mt5", **_T5),
        ffn=_gated("MT5DenseGatedActDense", n=4, act=_NEW_GELU, note="gated-gelu by default: wi_0 / wi_1 / wo"),
    ),
    Entry(
        "umt5",
        "seq2seq",
        _seq2seq("umt5", **_T5),
        ffn=_gated("UMT5DenseGatedActDense", n=4, act=_NEW_GELU, note="gated-gelu by default"),
    ),
    *[
        Entry(name, "seq2seq", _seq2seq(name, **_BART), ffn=_bart_like(prefix, act))
        for name, prefix, act in [
            ("bart", "Bart", "GELUActivation"),
            ("mbart", "MBart", "GELUActivation"),
            ("marian", "Marian", "GELUActivation"),
            ("pegasus", "Pegasus", "GELUActivation"),
            ("m2m_100", "M2M100", "nn.ReLU"),
            ("plbart", "PLBart", "GELUActivation"),
            ("blenderbot", "Blenderbot", "GELUActivation"),
        ]
    ],
    # ---- vision
    Entry("vit", "vision", _vision("vit", **_VIT), ffn=_plain("ViTMLP", note="fc1 / activation_fn / fc2")),
    Entry("deit", "vision", _vision("deit", **_VIT), ffn=_plain("DeiTMLP", note="fc1 / activation_fn / fc2")),
    Entry(
        "dinov2",
        "vision",
        _vision(
            "dinov2",
            hidden_size=D,
            mlp_ratio=2,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        ),
        ffn=_plain("Dinov2MLP", note="fc1 / activation / fc2; output scaled by layer_scale2 after the view"),
    ),
    Entry(
        "dinov2_swiglu",
        "vision",
        _vision(
            "dinov2",
            hidden_size=D,
            mlp_ratio=2,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
            use_swiglu_ffn=True,
        ),
        ffn=_gated(
            "Dinov2SwiGLUFFN",
            d_ff=48,
            note="gate_proj / up_proj / down_proj with biases; width (int(2 d * 2/3) + 7) // 8 * 8 = 48",
        ),
    ),
    # ---- MoE: softmax -> top-k, fused [E, 2I, d]
    Entry(
        "mixtral",
        "causal",
        _causal(
            "mixtral", **{**_LLAMA, "intermediate_size": 48}, num_local_experts=4, num_experts_per_tok=2, **_TOKENS
        ),
        moe=MoEFacts("MixtralSparseMoeBlock", 2, 4, 2, 48, "softmax_topk", True, "fused", router="gate"),
    ),
    Entry(
        "minimax",
        "causal",
        _causal(
            "minimax",
            **{**_LLAMA, "intermediate_size": 16},
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["full_attention", "full_attention"],
            **_TOKENS,
        ),
        moe=MoEFacts(
            "MiniMaxSparseMoeBlock",
            2,
            4,
            2,
            16,
            "softmax_topk",
            True,
            "fused",
            router="gate",
            note="layers forced to full attention (lightning attention is not what is tested here)",
        ),
    ),
    Entry(
        "qwen2_moe",
        "causal",
        _causal(
            "qwen2_moe",
            **_LLAMA,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=48,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            **_TOKENS,
        ),
        moe=MoEFacts(
            "Qwen2MoeSparseMoeBlock",
            2,
            4,
            2,
            16,
            "softmax_topk",
            False,
            "fused",
            router="gate",
            shared=("shared_expert",),
            shared_gated=True,
            note="shared_expert (Qwen2MoeMLP, width 48) scaled by sigmoid(shared_expert_gate: Linear(d, 1))",
        ),
    ),
    Entry(
        "qwen3_moe",
        "causal",
        _causal(
            "qwen3_moe",
            **_LLAMA,
            head_dim=16,
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            **_TOKENS,
        ),
        moe=MoEFacts("Qwen3MoeSparseMoeBlock", 2, 4, 2, 16, "softmax_topk", True, "fused", router="gate"),
    ),
    Entry(
        "qwen3_next",
        "causal",
        _causal(
            "qwen3_next",
            **_LLAMA,
            head_dim=16,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            layer_types=["full_attention", "full_attention"],
            **_TOKENS,
        ),
        moe=MoEFacts(
            "Qwen3NextSparseMoeBlock",
            2,
            4,
            2,
            16,
            "softmax_topk",
            True,
            "fused",
            router="gate",
            shared=("shared_expert",),
            shared_gated=True,
            note="linear-attention layers replaced by full attention; shared expert gated like Qwen2-MoE",
        ),
    ),
    Entry(
        "olmoe",
        "causal",
        _causal(
            "olmoe",
            **{**_LLAMA, "intermediate_size": 16},
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            **_TOKENS,
        ),
        moe=MoEFacts("OlmoeSparseMoeBlock", 2, 8, 2, 16, "softmax_topk", False, "fused", router="gate"),
    ),
    Entry(
        "flex_olmo",
        "causal",
        _causal(
            "flex_olmo",
            **{**_LLAMA, "intermediate_size": 16},
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            **_TOKENS,
        ),
        moe=MoEFacts("FlexOlmoSparseMoeBlock", 2, 4, 2, 16, "softmax_topk", False, "fused", router="gate"),
    ),
    Entry(
        "hunyuan_v1_moe",
        "causal",
        _causal(
            "hunyuan_v1_moe", **{**_LLAMA, "intermediate_size": 16}, head_dim=16, num_experts=4, moe_topk=2, **_TOKENS
        ),
        moe=MoEFacts(
            "HunYuanMoEV1Moe",
            2,
            4,
            2,
            16,
            "softmax_topk",
            True,
            "fused",
            router="gate.wg",
            shared=("shared_mlp",),
            note="router is gate.wg (nn.Linear, fp32); shared_mlp (gated MLP) added ungated; experts AND "
            "shared_mlp are intermediate_size wide (there is no moe_intermediate_size)",
        ),
    ),
    Entry(
        "jamba",
        "causal",
        _causal(
            "jamba",
            **_LLAMA,
            num_experts=4,
            num_experts_per_tok=2,
            expert_layer_period=2,
            expert_layer_offset=1,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=4,
            mamba_d_conv=2,
            mamba_expand=2,
            mamba_dt_rank=4,
            **_TOKENS,
        ),
        ffn=_gated("JambaMLP", n=1, note="layer 0 (a Mamba layer) has the dense feed_forward"),
        moe=MoEFacts(
            "JambaSparseMoeBlock",
            1,
            4,
            2,
            64,
            "softmax_topk",
            False,
            "fused",
            router="router",
            note="layer 1; weights are the top-k softmax probabilities, never renormalised",
        ),
    ),
    Entry(
        "dbrx",
        "causal",
        _causal(
            "dbrx",
            d_model=D,
            n_heads=2,
            n_layers=2,
            vocab_size=VOCAB,
            max_seq_len=64,
            attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2},
            **_TOKENS,
        ),
        moe=MoEFacts(
            "DbrxFFN",
            2,
            4,
            2,
            16,
            "softmax_topk",
            True,
            "flat",
            router="router.layer",
            container="experts.mlp",
            note="weights / ||top-k||_p with p = moe_normalize_expert_weights = 1 (L1 renorm); "
            "w1 (gate) / v1 (up) / w2 each [E*I, d], down of expert e is w2.view(E, I, d)[e]^T",
        ),
    ),
    # ---- MoE: top-k -> softmax
    Entry(
        "gpt_oss",
        "causal",
        _causal(
            "gpt_oss",
            **{**_LLAMA, "intermediate_size": 16},
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=16,
            **_TOKENS,
        ),
        moe=MoEFacts(
            "GptOssMLP",
            2,
            4,
            2,
            16,
            "topk_softmax",
            True,
            "fused_interleaved_t",
            router="router",
            activation="clamp(limit=7), gate*sigmoid(1.702 gate), (up+1) *",
            note="router has a bias; gate_up_proj [E, d, 2I] with gate = [..., ::2], up = [..., 1::2], "
            "biases; down_proj [E, I, d] + bias; block returns (out, router_scores)",
        ),
    ),
    Entry(
        "granitemoe",
        "causal",
        _causal(
            "granitemoe", **{**_LLAMA, "intermediate_size": 16}, num_local_experts=4, num_experts_per_tok=2, **_TOKENS
        ),
        moe=MoEFacts(
            "GraniteMoeMoE",
            2,
            4,
            2,
            16,
            "topk_softmax",
            True,
            "fused",
            router="router",
            note="block is block_sparse_moe",
        ),
    ),
    Entry(
        "granitemoeshared",
        "causal",
        _causal(
            "granitemoeshared",
            **{**_LLAMA, "intermediate_size": 16},
            num_local_experts=4,
            num_experts_per_tok=2,
            shared_intermediate_size=48,
            **_TOKENS,
        ),
        moe=MoEFacts(
            "GraniteMoeSharedMoE",
            2,
            4,
            2,
            16,
            "topk_softmax",
            True,
            "fused",
            router="router",
            shared=("shared_mlp",),
            shared_outside=True,
            note="shared_mlp is a SIBLING of block_sparse_moe in the decoder layer "
            "(fused input_linear [2*48, d], chunk, gate first); never the layer's dense FFN",
        ),
    ),
    Entry(
        "jetmoe",
        "causal",
        _causal(
            "jetmoe",
            hidden_size=D,
            num_hidden_layers=2,
            vocab_size=VOCAB,
            num_local_experts=4,
            num_experts_per_tok=2,
            kv_channels=8,
            intermediate_size=16,
            num_key_value_heads=2,
            **_TOKENS,
        ),
        moe=MoEFacts(
            "JetMoeMoE",
            2,
            4,
            2,
            16,
            "topk_softmax",
            True,
            "parallel",
            router="router.layer",
            container="input_linear",
            note="no experts child: input_linear.weight [E, 2I, d] (gate first) / output_linear.weight "
            "[E, d, I]; the block adds its own output bias; attention is a mixture too (MoA)",
        ),
        moe_support="either",
        why="the block adds an output bias after the routed sum, and the experts are two JetMoeParallelExperts",
    ),
    # ---- MoE: sigmoid + selection bias, group-limited, scaled (+ ungated shared experts)
    *[
        Entry(
            name,
            "causal",
            _causal(name, **{**_LLAMA, **_GROUPED}, **extra, **_TOKENS),
            ffn=_gated(dense, n=1, note="first_k_dense_replace = 1: layer 0 is dense"),
            moe=MoEFacts(
                block,
                2,
                8,
                2,
                16,
                "sigmoid_topk",
                True,
                "fused",
                router="gate",
                selection_bias="gate.e_score_correction_bias",
                grouped=True,
                scaling=2.5,
                shared=("shared_experts",),
                note="group score = sum of the top-2 biased scores; weights are unbiased sigmoid "
                "scores, renormalised (+1e-20), times routed_scaling_factor",
            ),
        )
        for name, dense, block, extra in [
            ("deepseek_v3", "DeepseekV3MLP", "DeepseekV3MoE", _DSV3_ATTN),
            ("glm4_moe", "Glm4MoeMLP", "Glm4MoeMoE", {"head_dim": 16}),
            ("dots1", "Dots1MLP", "Dots1MoE", {"head_dim": 16}),
        ]
    ],
    Entry(
        "deepseek_v2",
        "causal",
        _causal(
            "deepseek_v2",
            **{**_LLAMA, **_GROUPED, "norm_topk_prob": False},
            topk_method="group_limited_greedy",
            **_DSV3_ATTN,
            **_TOKENS,
        ),
        ffn=_gated("DeepseekV2MLP", n=1, note="layer 0 is dense"),
        moe=MoEFacts(
            "DeepseekV2Moe",
            2,
            8,
            2,
            16,
            "softmax_group_greedy",
            False,
            "fused",
            router="gate",
            grouped=True,
            scaling=2.5,
            shared=("shared_experts",),
            note="softmax; group score = max prob in the group; other groups masked to 0; top-k; "
            "no renorm; times routed_scaling_factor",
        ),
        moe_support="either",
        why="group-limited greedy top-k over softmax probabilities (groups ranked by their max)",
    ),
    Entry(
        "ernie4_5_moe",
        "causal",
        _causal(
            "ernie4_5_moe",
            **_LLAMA,
            head_dim=16,
            moe_intermediate_size=16,
            moe_num_experts=4,
            moe_k=2,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
            **_TOKENS,
        ),
        ffn=_gated("Ernie4_5_MoeMLP", n=1, note="moe_layer_start_index = 1: layer 0 is dense"),
        moe=MoEFacts(
            "Ernie4_5_MoeSparseMoeBlock",
            1,
            4,
            2,
            16,
            "softmax_topk",
            True,
            "fused",
            router="gate",
            selection_bias="gate.moe_statics.e_score_correction_bias",
            shared=("shared_experts",),
            note="selection on softmax + e_score_correction_bias ([1, E] parameter); weights are the "
            "unbiased probabilities / clamp(sum, min=moe_norm_min)",
        ),
    ),
    Entry(
        "lfm2_moe",
        "causal",
        _causal(
            "lfm2_moe",
            **{**_LLAMA, "num_hidden_layers": 3},
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            num_dense_layers=1,
            routed_scaling_factor=2.0,
            norm_topk_prob=True,
            layer_types=["full_attention", "conv", "full_attention"],
            **_TOKENS,
        ),
        ffn=_gated(
            "Lfm2MoeMLP", n=1, act="F.silu (a function, no activation module)", note="w1 (gate) / w3 (up) / w2 (down)"
        ),
        moe=MoEFacts(
            "Lfm2MoeSparseMoeBlock",
            2,
            4,
            2,
            16,
            "sigmoid_topk",
            True,
            "fused",
            router="gate",
            selection_bias="expert_bias",
            scaling=2.0,
            activation="F.silu (function)",
            note="selection bias is a buffer of the BLOCK, passed to the router; renorm adds 1e-6",
        ),
    ),
    # ---- MoE outside the view's formula
    Entry(
        "llama4_text",
        "causal",
        _causal(
            "llama4_text",
            **{**_LLAMA, "intermediate_size": 16},
            head_dim=16,
            intermediate_size_mlp=64,
            num_local_experts=4,
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,
            **_TOKENS,
        ),
        ffn=_gated("Llama4TextMLP", n=1, act="SiLUActivation", note="layer 0 dense (intermediate_size_mlp)"),
        moe=MoEFacts(
            "Llama4TextMoe",
            1,
            4,
            1,
            16,
            "topk_sigmoid_input",
            False,
            "fused_t",
            router="router",
            shared=("shared_expert",),
            note="weights sigmoid(top-k logits) multiply the expert INPUT (every expert runs on "
            "w_e * x); gate_up_proj [E, d, 2I] transposed, not interleaved (chunk, gate first); "
            "down_proj [E, I, d]; block returns (out, router_logits)",
        ),
        moe_support="either",
        why="the routing weight scales the expert input, not its output",
    ),
    Entry(
        "phimoe",
        "causal",
        _causal("phimoe", **{**_LLAMA, "intermediate_size": 16}, num_local_experts=4, num_experts_per_tok=2, **_TOKENS),
        moe=MoEFacts(
            "PhimoeSparseMoeBlock",
            2,
            4,
            2,
            16,
            "sparsemixer",
            False,
            "fused",
            router="router",
            note="sparsemixer: top-1 by max, weight = softmax over logits within a jitter_eps band of "
            "the max, then the same after masking the first expert",
        ),
        moe_support="either",
        why="sparsemixer routing is none of the scoring rules a view recomputes",
    ),
    Entry(
        "switch_transformers",
        "seq2seq",
        _seq2seq(
            "switch_transformers", **_T5, num_experts=4, encoder_sparse_step=2, decoder_sparse_step=2, expert_capacity=1
        ),
        ffn=_plain("SwitchTransformersDenseActDense", n=2, act="nn.ReLU", note="blocks 0 of encoder and decoder"),
        moe=MoEFacts(
            "SwitchTransformersSparseMLP",
            2,
            4,
            1,
            64,
            "top1_capacity",
            False,
            "module_dict",
            router="router.classifier",
            activation="nn.ReLU",
            note="experts are a ModuleDict expert_{i} of NON-gated DenseActDense; top-1 by softmax, "
            "weight = max prob; expert_capacity = 1 per sequence (7 tokens, 4 experts: some always "
            "overflow), overflowing tokens get zero output",
        ),
        moe_support="either",
        why="capacity-limited routing drops tokens depending on their position in their sequence: a view "
        "must model the capacity (with capacity 1, most probe tokens are dropped, so an exact view does)",
    ),
    # ---- non-HF
    Entry(
        "torch_encoder_relu",
        "non_hf",
        _non_hf(lambda: TorchEncoderLM("relu")),
        ffn=_plain(
            "TransformerEncoderLayer",
            act="F.relu (function attribute)",
            sibling=True,
            note="linear1 / dropout / linear2 on the layer; eval+no_grad takes the fused fast path "
            "unless a hook is attached",
        ),
    ),
    Entry(
        "torch_encoder_gelu",
        "non_hf",
        _non_hf(lambda: TorchEncoderLM("gelu")),
        ffn=_plain("TransformerEncoderLayer", act="F.gelu (function attribute)", sibling=True),
    ),
    Entry(
        "torch_decoder",
        "non_hf",
        _non_hf(lambda: TorchEncoderLM("relu", decoder=True)),
        ffn=_plain("TransformerDecoderLayer", act="F.relu (function attribute)", sibling=True),
    ),
    Entry(
        "timm_mlp",
        "non_hf",
        _non_hf(lambda: Blocks([ViTBlock(TimmMlp(D, 64)) for _ in range(2)])),
        ffn=_plain("TimmMlp", act="nn.GELU", note="fc1, act, drop1, norm (Identity), fc2, drop2"),
    ),
    Entry(
        "timm_glu_mlp",
        "non_hf",
        _non_hf(lambda: Blocks([ViTBlock(TimmGluMlp(D, 32)) for _ in range(2)])),
        ffn=_gated(
            "TimmGluMlp",
            d_ff=32,
            act="nn.Sigmoid",
            fused_gate_up=True,
            gate_last=True,
            note="fc1 [2 d_ff, d], chunk(2): x1 * act(x2) — the gate is the SECOND half",
        ),
    ),
    Entry(
        "timm_swiglu",
        "non_hf",
        _non_hf(lambda: Blocks([ViTBlock(TimmSwiGLU(D, 48)) for _ in range(2)])),
        ffn=_gated("TimmSwiGLU", d_ff=48, note="fc1_g (gate) / fc1_x (up) / fc2: names outside the usual lists"),
    ),
    Entry(
        "nanogpt",
        "non_hf",
        _non_hf(lambda: Blocks([NanoBlock() for _ in range(2)])),
        ffn=_plain("NanoMLP", d_ff=128, act="nn.GELU", note="c_fc / gelu / c_proj / dropout (nn.Linear)"),
    ),
    # the hand-written transformer the older tests use (tests/families.py): PlainMLP / a softmax-top-k MoE
    Entry(
        "plain",
        "non_hf",
        _non_hf(lambda: PlainTransformer()),
        ffn=_plain("PlainMLP", n=3, act="nn.GELU", note="fc_in / GELU / fc_out in a pre-norm block"),
    ),
    Entry(
        "plain_moe",
        "non_hf",
        _non_hf(lambda: PlainTransformer(moe=True)),
        moe=MoEFacts(
            "PlainMoE",
            3,
            4,
            2,
            64,
            "softmax_topk",
            True,
            "module_list",
            router="router",
            note="per-expert ModuleList of SwiGLU (w1, w3, w2), nn.Linear router",
        ),
    ),
    Entry(
        "sequential_mlp",
        "non_hf",
        _non_hf(lambda: nn.Sequential(nn.Linear(D, 64), nn.GELU(), nn.Linear(64, D)), inputs="x"),
        ffn=_plain("Sequential", n=1, act="nn.GELU", note="the model itself is the FFN (path '')"),
    ),
    Entry(
        "neg_act_after",
        "non_hf",
        _non_hf(lambda: nn.Sequential(nn.Linear(D, 64), nn.Linear(64, D), nn.ReLU()), inputs="x"),
        ffn=None,
        ffn_support="refuse",
        why="the activation comes after both linears: a linear map followed by ReLU is no FFN",
    ),
    Entry(
        "neg_residual_inside",
        "non_hf",
        _non_hf(lambda: Blocks([ViTBlock(ResidualInsideMLP()) for _ in range(2)])),
        ffn=None,
        ffn_support="refuse",
        why="a skip connection around the activation inside the MLP",
    ),
]

ZOO: dict[str, Entry] = {e.name: e for e in ENTRIES}
assert len(ZOO) == len(ENTRIES), "duplicate zoo names"
NAMES = list(ZOO)
MOE_NAMES = [n for n, e in ZOO.items() if e.moe is not None]
CAUSAL_NAMES = [n for n, e in ZOO.items() if e.kind == "causal"]

SKIPPED: dict[str, str] = {
    "longcat_flash": "the tiny config still needs MLA, zero-computation experts and two MLPs per layer; "
    "not buildable below 1 s without re-deriving a dozen sizes",
    "mobilebert": "bottleneck blocks with num_feedforward_networks FFNs per layer: left for a later zoo",
}


def build(name: str, seed: int = 0, random_weights: bool = True) -> Built:
    """Build zoo family ``name`` (deterministic in ``seed``).

    ``random_weights=False`` keeps the library's own initialisation (the patcher check: the large
    random weights collapse tiny GPT-2 hidden states, so no neuron can tell an edit from memory).
    """
    entry = ZOO[name]
    t0 = time.perf_counter()
    model, inputs = entry.make(seed, random_weights)
    if entry.kind == "non_hf":  # what the docs tell users of such models to do once
        mt.set_probe_inputs(model, inputs)
    return Built(entry, model, inputs, time.perf_counter() - t0)


def modules_of_class(model: nn.Module, names: tuple[str, ...] | str) -> list[str]:
    """Paths of the modules whose class name is one of ``names`` (in definition order)."""
    wanted = (names,) if isinstance(names, str) else names
    return [p for p, m in model.named_modules() if type(m).__name__ in wanted]
