"""modulart.emoe on the operator contract: merge_ / to_dense, state, the sparse executor's claim, the protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import modulart as mt
from families import Family, build
from modulart.core.neuron_groups import NeuronExperts, NeuronExpertSplit

N, K = 8, 2


def _out(fam: Family) -> torch.Tensor:
    out: Any = fam.run()
    return out if isinstance(out, torch.Tensor) else out.logits


def _hooks(model: nn.Module) -> list[list[int]]:
    return [list(m._forward_hooks) + list(m._forward_pre_hooks) for m in model.modules()]


def _patcher(model: nn.Module) -> mt.Handle[Any]:
    import modulart.patcher

    return modulart.patcher.apply(model)


# --- merge_ / to_dense ------------------------------------------------------------------------------
@pytest.mark.parametrize("executor", ["masked", "sparse"])
def test_merge_refuses_when_routing_changes_the_function(executor: str) -> None:
    fam = build("plain")
    dense = _out(fam)
    handle = mt.emoe.apply(fam.model, num_experts=N, top_k=K, layers="all", executor=executor)
    routed = _out(fam)
    assert not torch.allclose(routed, dense, atol=1e-4)
    with pytest.raises(mt.UnsupportedOperationError, match=r"top_k = 2 < num_experts = 8.*to_dense\(\)"):
        handle.merge_()
    assert not handle.removed and torch.equal(_out(fam), routed)  # nothing changed
    handle.remove()


@pytest.mark.parametrize("executor", ["masked", "sparse"])
def test_merge_with_k_equal_n_preserves_outputs_and_leaves_no_hooks(executor: str) -> None:
    fam = build("llama")
    hooks = _hooks(fam.model)
    handle = mt.emoe.apply(fam.model, num_experts=N, top_k=N, layers="all", executor=executor)
    routed = _out(fam)
    merged = handle.merge_()
    assert merged is fam.model and handle.removed and _hooks(fam.model) == hooks
    torch.testing.assert_close(_out(fam), routed, atol=1e-5, rtol=1e-5)
    if executor == "masked":  # a mask of ones: the same numbers
        assert torch.equal(_out(fam), routed)


@pytest.mark.parametrize("executor", ["masked", "sparse"])
def test_to_dense_restores_the_dense_outputs_bitwise(executor: str) -> None:
    fam = build("gpt2")
    dense, hooks = _out(fam), _hooks(fam.model)
    handle = mt.emoe.apply(fam.model, num_experts=N, top_k=K, layers="all", executor=executor)
    assert not torch.allclose(_out(fam), dense, atol=1e-4)
    assert handle.to_dense() is fam.model
    assert handle.removed and _hooks(fam.model) == hooks and torch.equal(_out(fam), dense)
    with pytest.raises(mt.UnsupportedOperationError, match="removed"):
        handle.to_dense()


# --- the sparse executor has its FFNs to itself -----------------------------------------------------
def test_sparse_emoe_then_patcher_is_refused_naming_emoe() -> None:
    fam = build("plain")
    hooks = _hooks(fam.model)
    emoe = mt.emoe.apply(fam.model, num_experts=N, top_k=K, layers="all", executor="sparse")
    routed = _out(fam)
    with pytest.raises(mt.CompositionError, match="'emoe'"):
        _patcher(fam.model)
    torch.testing.assert_close(_out(fam), routed)  # EMoE untouched by the refused apply
    emoe.remove()
    assert _hooks(fam.model) == hooks
    patcher = _patcher(fam.model)  # the claim went with remove()
    patcher.remove()


def test_patcher_then_sparse_emoe_is_refused_and_leaves_the_patcher() -> None:
    fam = build("plain")
    patcher = _patcher(fam.model)
    before = _hooks(fam.model)
    with pytest.raises(mt.CompositionError, match="patcher"):
        mt.emoe.apply(fam.model, num_experts=N, top_k=K, layers="all", executor="sparse")
    assert _hooks(fam.model) == before
    patcher.remove()
    emoe = mt.emoe.apply(fam.model, num_experts=N, top_k=K, layers="all", executor="sparse")
    emoe.remove()


def test_sparse_emoe_refuses_capture_and_raw_hooks_inside_and_on_the_ffn() -> None:
    fam = build("plain")
    ffns = mt.find_ffns(fam.model)
    emoe = mt.emoe.apply(fam.model, num_experts=N, top_k=K, layers=[-1], executor="sparse")
    ffn = ffns[-1]
    with pytest.raises(mt.CompositionError, match="'emoe'"):  # it used to return [B, 0, d]
        mt.capture(fam.model, {"h": ffn.hidden_site}, fam.run)
    reg = mt.HookRegistry(fam.model, name="someone")
    for site in (ffn.input_site, ffn.output_site):
        with pytest.raises(mt.CompositionError, match="'emoe'"):
            reg.at(site, lambda t: None)
    with pytest.raises(mt.CompositionError, match="'emoe'"):  # the FFN module itself
        reg.forward(ffn.path, lambda m, a, o: None)
    got = mt.capture(fam.model, {"h": ffns[0].hidden_site}, fam.run)  # an FFN EMoE does not convert
    assert got["h"].shape[-2] == fam.inputs["ids"].shape[-1]
    reg.remove()
    emoe.remove()
    got = mt.capture(fam.model, {"h": ffn.hidden_site}, fam.run)
    assert got["h"].shape[-2] == fam.inputs["ids"].shape[-1]


def test_hooks_first_then_sparse_emoe_is_refused() -> None:
    fam = build("plain")
    ffn = mt.find_ffns(fam.model)[-1]
    reg = mt.HookRegistry(fam.model, name="recorder")
    reg.at(ffn.hidden_site, lambda h: None)
    with pytest.raises(mt.CompositionError, match="'recorder' already hooks"):
        mt.emoe.apply(fam.model, num_experts=N, top_k=K, layers=[-1], executor="sparse")
    reg.remove()
    mt.emoe.apply(fam.model, num_experts=N, top_k=K, layers=[-1], executor="sparse").remove()


def test_masked_emoe_composes_with_capture() -> None:
    fam = build("plain")
    emoe = mt.emoe.apply(fam.model, num_experts=N, top_k=K, layers="all")
    ffn = mt.find_ffns(fam.model)[-1]
    got = mt.capture(fam.model, {"y": ffn.output_site}, fam.run)
    assert got["y"].shape[-2] == fam.inputs["ids"].shape[-1]
    emoe.remove()


# --- state --------------------------------------------------------------------------------------------
def test_state_dict_round_trips_into_a_live_handle() -> None:
    fam = build("plain")
    first = mt.emoe.apply(fam.model, num_experts=N, top_k=K, layers="all", router="frozen")
    want, state = _out(fam), first.state_dict()
    first.remove()
    other = mt.emoe.apply(fam.model, num_experts=N, top_k=K, layers="all", router="frozen", split="random")
    assert not torch.equal(_out(fam), want)
    other.load_state_dict(state)
    assert torch.equal(_out(fam), want)
    again = other.state_dict()
    assert again.keys() == state.keys()
    assert all(torch.equal(torch.as_tensor(again[k]), torch.as_tensor(v)) for k, v in state.items())
    bad = dict(state)
    key = next(k for k in bad if k.endswith(".labels"))
    bad[key] = torch.zeros(3, dtype=torch.long)
    with pytest.raises(mt.IncompatibleArtifactError, match="labels"):
        other.load_state_dict(bad)
    assert torch.equal(_out(fam), want)  # a bad state changes nothing
    other.remove()


def test_save_load_after_a_fine_tuning_step(tmp_path: Path) -> None:
    fam = build("llama")
    handle = mt.emoe.apply(fam.model, num_experts=N, top_k=K, layers="all", router="frozen")
    fam.model.train()
    opt = torch.optim.SGD(fam.model.parameters(), lr=0.1)
    fam.model(**fam.inputs).logits.logsumexp(-1).mean().backward()
    opt.step()
    fam.model.eval()
    want = _out(fam)
    path = handle.save(tmp_path / "emoe")  # the fingerprint is the fine-tuned model's
    handle.to_dense()
    loaded = mt.load(fam.model, path)
    assert isinstance(loaded, mt.emoe.EMoEHandle)
    assert torch.equal(_out(fam), want)
    for layer in loaded.layers.values():  # the conversion-time centroids, not the tuned keys'
        assert not torch.allclose(layer.frozen, layer.groups.centroids(layer.ffn.keys.detach()))
    loaded.remove()


# --- the NeuronExperts protocol -----------------------------------------------------------------------
@pytest.mark.parametrize("router", ["avgk", "frozen"])
def test_expert_groups_implements_the_protocol(router: str) -> None:
    fam = build("plain")
    handle = mt.emoe.apply(fam.model, num_experts=N, top_k=K, layers="all", router=router)
    assert isinstance(handle, NeuronExperts)
    splits = handle.expert_groups()
    assert list(splits) == list(handle.layers)
    for path, split in splits.items():
        layer = handle.layers[path]
        assert isinstance(split, NeuronExpertSplit) and split.groups is layer.groups and split.top_k == K
        assert (split.centroids is layer.frozen) if router == "frozen" else split.centroids is None
        assert split.scores is not None and not split.needs_hidden
    handle.remove()
