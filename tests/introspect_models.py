"""Constructed MoE models and checkpoints with known answers, for the introspection tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import modulart as mt
from families import PlainTransformer


def tiny_mixtral(num_experts: int = 4, layers: int = 3, d: int = 32, inter: int = 48, seed: int = 0) -> nn.Module:
    """A tiny random Mixtral (transformers v5, fused experts), every weight random and independent."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        "mixtral",
        hidden_size=d,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=128,
        num_local_experts=num_experts,
        num_experts_per_tok=2,
    )
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def tiny_mistral(layers: int = 3, d: int = 32, inter: int = 48) -> nn.Module:
    """A tiny dense Mistral whose FFNs can serve as the dense reference F of :func:`tiny_mixtral`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "mistral",
        hidden_size=d,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def upcycle(model: nn.Module, noise: float, seed: int = 0, dense: nn.Module | None = None) -> nn.Module:
    """Make every expert a copy of one random FFN (per layer) plus ``noise`` × random; copy it into ``dense``."""
    g = torch.Generator().manual_seed(seed)
    dense_ffns = mt.find_ffns(dense) if dense is not None else []
    with torch.no_grad():
        for i, moe in enumerate(mt.find_moes(model)):
            e0 = moe.expert(0)
            base = {k: torch.randn(getattr(e0, k).shape, generator=g) * 0.2 for k in ("gate", "up", "down")}
            for e in moe.experts():
                e.set(**{k: v + noise * torch.randn(v.shape, generator=g) * 0.2 for k, v in base.items()})
            if dense_ffns:
                f = dense_ffns[i]
                f.keys, f.up, f.values = base["gate"], base["up"], base["down"]
    return model


def scaled_expert_moe(scales: list[float], router_bias: list[float], seed: int = 0) -> PlainTransformer:
    """A plain MoE transformer whose experts are ``scale_e`` × one FFN (output norm ∝ scale_e on every
    token) and whose router is a constant bias (scores ranked by ``router_bias`` on every token)."""
    model = PlainTransformer(seed=seed, moe=True).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            moe: Any = block.mlp
            d = moe.router.in_features
            moe.router = nn.Linear(d, len(scales), bias=True)
            moe.router.weight.zero_()
            moe.router.bias.copy_(torch.tensor(router_bias))
            base = moe.experts[0]
            w1, w3, w2 = (torch.randn(m.weight.shape, generator=g) * 0.3 for m in (base.w1, base.w3, base.w2))
            for s, ex in zip(scales, moe.experts, strict=True):
                ex.w1.weight.copy_(w1)
                ex.w3.weight.copy_(w3)
                ex.w2.weight.copy_(w2 * s)
    return model


def save_sharded(tensors: dict[str, torch.Tensor], directory: Path, shards: int = 2) -> Path:
    """Write ``tensors`` as ``shards`` safetensors files with a ``model.safetensors.index.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        part = keys[s::shards]
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, str(directory / name))
        weight_map |= dict.fromkeys(part, name)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def per_expert_keys(model: nn.Module, style: str) -> dict[str, torch.Tensor]:
    """The model's MoE weights under per-expert keys: ``mixtral`` (block_sparse_moe.experts.{e}.w1/w2/w3)
    or ``qwen`` (mlp.experts.{e}.gate_proj/up_proj/down_proj); routers as ``<block>.gate.weight``."""
    out: dict[str, torch.Tensor] = {}
    for moe in mt.find_moes(model):
        block = f"model.layers.{moe.layer}." + ("block_sparse_moe" if style == "mixtral" else "mlp")
        out[f"{block}.gate.weight"] = moe.router_weight.detach().clone()
        names = ("w1", "w3", "w2") if style == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        for e in moe.experts():
            for n, t in zip(names, (e.gate, e.up, e.down), strict=True):
                out[f"{block}.experts.{e.index}.{n}.weight"] = t.detach().clone()
    return out


def fused_keys(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's MoE weights under fused keys: ``mlp.experts.gate_up_proj [E, 2I, d]`` / ``down_proj [E, d, I]``."""
    out: dict[str, torch.Tensor] = {}
    for moe in mt.find_moes(model):
        block = f"model.layers.{moe.layer}.mlp"
        out[f"{block}.gate.weight"] = moe.router_weight.detach().clone()
        ex = moe.experts()
        out[f"{block}.experts.gate_up_proj"] = torch.stack([torch.cat([e.gate, e.up]) for e in ex]).detach().clone()
        out[f"{block}.experts.down_proj"] = torch.stack([e.down for e in ex]).detach().clone()
    return out
