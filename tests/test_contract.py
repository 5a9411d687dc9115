"""The operator contract, checked on every registered operator (plug-ins included) x several families.

For each operator in ``mt.available_operators()`` (a plug-in, ``scale_operator.Gain``, is
registered here) and each family:

- apply -> remove leaves the state dict, every hook dict, the module classes, ``requires_grad``
  flags and outputs bitwise as before (an operator that cannot act on a family refuses with a
  typed ``ModulartError`` and changes nothing);
- ``disabled()`` runs the base model; outputs come back after the block;
- ``merge_()`` preserves the outputs and leaves no modulart hook, or raises
  ``UnsupportedOperationError`` and changes nothing;
- save -> ``mt.load`` in a fresh process reproduces the outputs;
- every ordered pair of operators on one model composes or the second refuses typed, and removal
  in every order restores the base bitwise;
- config JSON round trip with unknown keys, a too-new version, and name registration.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import modulart as mt
import scale_operator
from families import Family, build
from model_state import assert_restored, snapshot
from modulart.core.sharing import live_hooks
from zoo import main_output as _main

FAMILIES = ["plain", "gpt2", "llama", "opt", "bert", "t5", "mixtral"]
PAIR_FAMILIES = ["plain", "llama"]
OPERATORS = mt.available_operators()
assert scale_operator.Gain.name in OPERATORS  # the plug-in is part of the suite

Exercise = Callable[[mt.Handle[Any], Family], None]


# --- what each operator is asked to do ------------------------------------------------------------
def _config(op: str) -> mt.OperatorConfig:
    """A config that makes the operator change something observable (defaults for plug-ins)."""
    if op == "emoe":
        return mt.emoe.EMoEConfig(num_experts=4, top_k=1, layers="all")
    if op == "kv":
        return mt.kv.KVConfig(target="both", mode="lora", rank=2, layers="all")
    if op == "patcher":
        return mt.patcher.PatcherConfig(task="generation", memory_weight=0.0, max_steps=3, keep_failed=True)
    if op == "test-gain":
        return scale_operator.GainConfig(init=1.5)
    return mt.get_operator(op).config_class()


def _perturb_state(handle: mt.Handle[Any]) -> None:
    """Give every floating tensor of the handle's state other values, through load_state_dict."""
    g = torch.Generator().manual_seed(0)
    state = handle.state_dict()
    new = {
        k: (v + 0.3 * torch.randn(v.shape, generator=g).to(v.dtype))
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()
        else v
        for k, v in state.items()
    }
    handle.load_state_dict(new)


def _exercise(handle: mt.Handle[Any], fam: Family) -> None:
    """Make the handle's effect non-trivial without training the model's weights."""
    if handle.operator.name == "patcher" and "input_ids" in fam.inputs and fam.name not in ("bert", "t5"):
        ids = fam.inputs["input_ids"][:1]
        with torch.no_grad():
            target = fam.model(input_ids=ids).logits.argmax(-1)
        handle.edit(ids, (target + 1) % 100)  # type: ignore[attr-defined]
    elif handle.operator.name == "migu":
        opt = torch.optim.SGD(handle.model.parameters(), lr=0.0)
        handle.attach(opt)
        _main(handle.model(**fam.inputs)).float().pow(2).mean().backward()
        handle.model.zero_grad(set_to_none=True)
    _perturb_state(handle)


# --- snapshots --------------------------------------------------------------------------------------
def _output(fam: Family) -> torch.Tensor:
    return _main(fam.run()).detach().clone()


def _apply(op: str, fam: Family) -> mt.Handle[Any] | None:
    """Apply ``op`` (exercised); None when the operator refuses the family, typed and without a trace."""
    before = snapshot(fam.model)
    try:
        handle = mt.apply(fam.model, _config(op))
    except mt.ModulartError:
        assert_restored(fam.model, before)
        return None
    _exercise(handle, fam)
    return handle


# --- the suite ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("op", OPERATORS)
def test_apply_remove_restores_everything(op: str, family: str) -> None:
    fam = build(family)
    base, before = _output(fam), snapshot(fam.model)
    handle = _apply(op, fam)
    if handle is None:
        pytest.skip(f"{op} refuses {family} (typed, without a trace)")
    assert isinstance(handle, mt.get_operator(op).handle_class)
    handle.remove()
    assert handle.removed and not live_hooks([fam.model], subtree=True)
    assert_restored(fam.model, before)
    assert torch.equal(_output(fam), base)
    handle.remove()  # idempotent


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("op", OPERATORS)
def test_disabled_runs_the_base_model(op: str, family: str) -> None:
    fam = build(family)
    base = _output(fam)
    handle = _apply(op, fam)
    if handle is None:
        pytest.skip(f"{op} refuses {family}")
    applied = _output(fam)
    with handle.disabled():
        assert not handle.enabled
        assert torch.equal(_output(fam), base)
    assert handle.enabled and torch.equal(_output(fam), applied)
    handle.disable()
    assert torch.equal(_output(fam), base)
    handle.enable()
    assert torch.equal(_output(fam), applied)
    handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("op", OPERATORS)
def test_merge_preserves_outputs_or_refuses(op: str, family: str) -> None:
    fam = build(family)
    handle = _apply(op, fam)
    if handle is None:
        pytest.skip(f"{op} refuses {family}")
    applied, before = _output(fam), snapshot(fam.model)
    try:
        merged = handle.merge_()
    except mt.UnsupportedOperationError:
        assert not handle.removed
        assert_restored(fam.model, before)
        assert torch.equal(_output(fam), applied)
        handle.remove()
        return
    assert merged is fam.model or merged is handle.model
    assert handle.removed and not live_hooks([fam.model], subtree=True)
    scale = float(applied.abs().max().clamp(min=1.0))  # baking adds float32 rounding relative to the outputs
    torch.testing.assert_close(_output(fam), applied, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("family", PAIR_FAMILIES)
def test_every_pair_composes_or_refuses_and_removes_in_any_order(family: str) -> None:
    for first, second in itertools.permutations(OPERATORS, 2):
        for reverse in (False, True):
            fam = build(family)
            base, before = _output(fam), snapshot(fam.model)
            a = _apply(first, fam)
            if a is None:
                continue
            after_a, snap_a = _output(fam), snapshot(fam.model)
            try:
                b = mt.apply(fam.model, _config(second))
            except mt.ModulartError:  # a typed refusal is allowed, but it must leave no trace
                assert_restored(fam.model, snap_a)
                assert torch.equal(_output(fam), after_a), f"{second} refused after {first} but left a trace"
                a.remove()
                assert_restored(fam.model, before)
                continue
            _ = _output(fam)  # both run together
            for h in (a, b) if not reverse else (b, a):
                h.remove()
            label = f"{first} then {second}, removed {'in reverse' if reverse else 'in order'}"
            assert not live_hooks([fam.model], subtree=True), label
            assert_restored(fam.model, before)
            assert torch.equal(_output(fam), base), label


_RELOAD = """
import json, sys, torch
from safetensors.torch import load_file
sys.path.insert(0, {tests!r})
import modulart as mt, scale_operator
from families import build
root = {root!r}
done = []
for entry in json.load(open(root + "/cases.json")):
    fam = build(entry["family"])
    fam.model.load_state_dict(load_file(root + "/" + entry["model"]))
    handle = mt.load(fam.model, root + "/" + entry["artifact"])
    out = fam.run()
    if not isinstance(out, torch.Tensor):
        out = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    expected = load_file(root + "/" + entry["output"])["out"]
    assert type(handle).__name__ == entry["handle"], (type(handle).__name__, entry)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=str(entry))
    done.append(entry["operator"] + "/" + entry["family"])
print("RELOADED", len(done))
"""


def test_save_then_load_in_a_fresh_process_round_trips(tmp_path: Path) -> None:
    cases = []
    for family in FAMILIES:
        for op in OPERATORS:
            fam = build(family)
            handle = _apply(op, fam)
            if handle is None:
                continue
            key = f"{op}-{family}"
            handle.save(tmp_path / key)
            save_file({"out": _output(fam)}, str(tmp_path / f"{key}.out.safetensors"))
            cases.append(
                {
                    "family": family,
                    "operator": op,
                    "artifact": key,
                    "output": f"{key}.out.safetensors",
                    "model": f"{key}.model.safetensors",
                    "handle": type(handle).__name__,
                }
            )
            handle.remove()  # the model as the fresh process rebuilds it: without what the operator registered
            state = {k: v.detach().clone().contiguous() for k, v in fam.model.state_dict().items()}
            save_file(state, str(tmp_path / f"{key}.model.safetensors"))
    assert {c["operator"] for c in cases} == set(OPERATORS), "every operator applies to some family"
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    code = _RELOAD.format(tests=str(Path(__file__).parent), root=str(tmp_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"RELOADED {len(cases)}" in proc.stdout


@pytest.mark.parametrize("op", OPERATORS)
def test_config_json_unknown_keys_and_versions(op: str, tmp_path: Path) -> None:
    cls = mt.get_operator(op).config_class
    cfg = _config(op)
    assert cls.from_json(cfg.to_json()) == cfg
    with pytest.warns(UserWarning, match="unknown config keys"):
        assert cls.from_saved({**cfg.to_dict(), "from_the_future": 1}) == cfg
    too_new = {**cfg.to_dict(), "version": cls.schema_version() + 1}
    with pytest.raises(mt.IncompatibleArtifactError, match=r"written by modulart 9\.9.*upgrade"):
        cls.from_saved(too_new, written_by="9.9")
    fam = build("plain")
    handle = _apply(op, fam)
    assert handle is not None, f"{op} applies to the plain transformer"
    handle.save(tmp_path / "art")
    handle.remove()
    meta_path = tmp_path / "art" / "modulart_config.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["version"] = cls.schema_version() + 1
    meta["library_version"] = "9.9"
    meta_path.write_text(json.dumps(meta))
    before = snapshot(fam.model)
    with pytest.raises(mt.IncompatibleArtifactError, match=r"written by modulart 9\.9"):
        mt.load(fam.model, tmp_path / "art")
    assert_restored(fam.model, before)


def test_registering_a_taken_name_raises_unless_override() -> None:
    import modulart.core.operator as op_mod

    saved = dict(op_mod._OPERATORS), dict(op_mod._BY_CONFIG)
    try:
        with pytest.raises(mt.OperatorExistsError, match="'emoe' is taken"):

            class Impostor(mt.emoe.EMoE):  # type: ignore[misc]
                name = "emoe"

        assert mt.get_operator("emoe") is mt.emoe.EMoE

        class Replacement(mt.emoe.EMoE, override=True):  # type: ignore[misc]
            name = "emoe"

        assert mt.get_operator("emoe") is Replacement
    finally:
        op_mod._OPERATORS.clear()
        op_mod._OPERATORS.update(saved[0])
        op_mod._BY_CONFIG.clear()
        op_mod._BY_CONFIG.update(saved[1])


def test_apply_dispatches_on_the_config_type_plugins_included() -> None:
    fam = build("plain")
    handle = mt.apply(fam.model, scale_operator.GainConfig(init=2.0))
    assert isinstance(handle, scale_operator.GainHandle)
    handle.remove()

    @dataclasses.dataclass
    class Orphan(mt.OperatorConfig):
        pass

    with pytest.raises(mt.OperatorNotFoundError, match="Orphan"):
        mt.apply(fam.model, Orphan())
    with pytest.raises(mt.ConfigError, match="OperatorConfig"):
        mt.apply(fam.model, {"num_experts": 4})  # type: ignore[type-var]


def test_wrapped_models_are_accepted() -> None:
    fam = build("plain")
    base = _output(fam)
    compiled = torch.compile(fam.model)
    assert [f.path for f in mt.find_ffns(compiled)] == [f.path for f in mt.find_ffns(fam.model)]
    handle = mt.apply(compiled, scale_operator.GainConfig(init=2.0))
    assert handle.model is fam.model
    assert not torch.equal(_output(fam), base)
    handle.remove()

    class DistributedDataParallel(nn.Module):  # the shape of torch's DDP: the model under .module
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    wrapped = DistributedDataParallel(fam.model)
    handle = mt.apply(wrapped, scale_operator.GainConfig(init=2.0))
    assert handle.model is fam.model and handle.plan.targets == [f.path for f in mt.find_ffns(fam.model)]
    handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(_output(fam), base)


def test_a_subclass_reusing_the_config_does_not_take_over_apply() -> None:
    import modulart.core.operator as op_mod

    saved = dict(op_mod._OPERATORS), dict(op_mod._BY_CONFIG)
    try:

        class Louder(scale_operator.Gain):
            name = "test-louder"  # same GainConfig: mt.apply(GainConfig) must still mean Gain

        assert mt.get_operator("test-louder") is Louder
        fam = build("plain")
        handle = mt.apply(fam.model, scale_operator.GainConfig())
        assert handle.operator is scale_operator.Gain
        handle.remove()
    finally:
        op_mod._OPERATORS.clear()
        op_mod._OPERATORS.update(saved[0])
        op_mod._BY_CONFIG.clear()
        op_mod._BY_CONFIG.update(saved[1])
