"""The operator lifecycle: config validation, apply/remove, disabled, save/load, merge, registry."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import modulart as mt
from families import build
from modulart.core.operator import Plan, option
from scale_operator import Gain, GainConfig, GainHandle, GainPlan


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _hook_dicts(model: nn.Module) -> list[list[int]]:
    return [list(m._forward_hooks) + list(m._forward_pre_hooks) for m in model.modules()]


def test_config_validation_names_the_field() -> None:
    with pytest.raises(mt.ConfigError, match=r"GainConfig.init = -1.0: must be positive"):
        GainConfig(init=-1.0)
    with pytest.raises(mt.ConfigError, match="version"):
        GainConfig(version=0)


def test_config_json_round_trip_and_unknown_keys_warn() -> None:
    cfg = GainConfig(init=0.5, layers="last_half")
    assert GainConfig.from_json(cfg.to_json()) == cfg
    with pytest.warns(UserWarning, match="unknown config keys"):
        again = GainConfig.from_dict({**cfg.to_dict(), "from_the_future": 3})
    assert again == cfg
    assert "initial gain" in GainConfig.field_help()["init"]


def test_replace_rejects_unknown_fields_and_validates() -> None:
    cfg = GainConfig()
    with pytest.raises(mt.ConfigError, match="no field"):
        cfg.replace(nope=1)
    with pytest.raises(mt.ConfigError, match="init"):
        cfg.replace(init=0.0)


@pytest.mark.parametrize("family", ["plain", "gpt2", "llama"])
def test_apply_changes_outputs_and_remove_restores_bitwise(family: str) -> None:
    fam = build(family)
    before_out, before_state, before_hooks = fam.run(), _snapshot(fam.model), _hook_dicts(fam.model)
    handle = Gain.apply(fam.model, init=2.0)
    out = fam.run()
    first = out if isinstance(out, torch.Tensor) else out.logits
    ref = before_out if isinstance(before_out, torch.Tensor) else before_out.logits
    assert not torch.allclose(first, ref)
    handle.remove()
    after = fam.run()
    assert torch.equal(after if isinstance(after, torch.Tensor) else after.logits, ref)
    assert _hook_dicts(fam.model) == before_hooks
    assert all(torch.equal(v, before_state[k]) for k, v in fam.model.state_dict().items())
    handle.remove()  # idempotent


def test_disabled_runs_the_base_model() -> None:
    fam = build("plain")
    base = fam.run()
    handle = Gain.apply(fam.model, init=3.0)
    with handle.disabled():
        assert torch.equal(fam.run(), base)
    assert not torch.allclose(fam.run(), base)
    handle.remove()


def test_bad_plan_leaves_model_untouched() -> None:
    fam = build("plain")
    hooks = _hook_dicts(fam.model)
    with pytest.raises(mt.SelectorError, match="depth 3"):
        Gain.apply(fam.model, layers="7")
    assert _hook_dicts(fam.model) == hooks


def test_failing_install_rolls_back() -> None:
    class Broken(Gain):
        name = "test-broken"

        @classmethod
        def install(cls, handle: GainHandle, plan: GainPlan) -> None:
            super().install(handle, plan)
            raise RuntimeError("boom halfway")

    fam = build("plain")
    hooks, base = _hook_dicts(fam.model), fam.run()
    with pytest.raises(RuntimeError, match="boom"):
        Broken.apply(fam.model)
    assert _hook_dicts(fam.model) == hooks
    assert torch.equal(fam.run(), base)


def test_save_load_round_trip(tmp_path: Path) -> None:
    fam = build("plain")
    handle = Gain.apply(fam.model, layers="last_half")
    with torch.no_grad():
        for g in handle.gains.values():
            g.uniform_(0.5, 1.5)
    out = fam.run()
    handle.save(tmp_path / "art")
    meta = json.loads((tmp_path / "art" / "modulart_config.json").read_text())
    assert meta["operator"] == "test-gain" and meta["library_version"] == mt.__version__
    assert meta["selector"] == {"written": "last_half", "resolved": ["blocks.1.mlp", "blocks.2.mlp"]}
    assert meta["config"]["layers"] == "last_half"
    handle.remove()
    loaded = mt.Handle.load(fam.model, tmp_path / "art")
    assert isinstance(loaded, GainHandle)
    assert torch.equal(fam.run(), out)
    loaded.remove()


def test_load_refuses_another_base_model(tmp_path: Path) -> None:
    fam = build("plain")
    Gain.apply(fam.model).save(tmp_path / "art")
    other = build("plain", seed=1)
    hooks = _hook_dicts(other.model)
    with pytest.raises(mt.IncompatibleArtifactError, match=r"different model[\s\S]*values differ"):
        GainHandle.load(other.model, tmp_path / "art")
    assert _hook_dicts(other.model) == hooks
    GainHandle.load(other.model, tmp_path / "art", check_fingerprint=False).remove()


def test_load_with_wrong_handle_class_is_refused(tmp_path: Path) -> None:
    class OtherHandle(mt.Handle[GainConfig]):
        pass

    fam = build("plain")
    Gain.apply(fam.model).save(tmp_path / "art")
    with pytest.raises(mt.IncompatibleArtifactError, match="test-gain"):
        OtherHandle.load(fam.model, tmp_path / "art")


def test_merge_bakes_into_weights_and_leaves_no_hooks() -> None:
    fam = build("plain")
    handle = Gain.apply(fam.model)
    with torch.no_grad():
        for g in handle.gains.values():
            g.uniform_(0.5, 1.5)
    out = fam.run()
    handle.merge_()
    assert handle.removed and all(not h for h in _hook_dicts(fam.model))
    assert torch.allclose(fam.run(), out, atol=1e-5)


def test_merge_unsupported_by_default() -> None:
    class NoMerge(mt.Operator[mt.OperatorConfig, Plan, mt.Handle[mt.OperatorConfig]]):
        name = "test-nomerge"

        @classmethod
        def plan(cls, model: nn.Module, config: mt.OperatorConfig) -> Plan:
            return Plan()

    with pytest.raises(mt.UnsupportedOperationError, match="test-nomerge"):
        NoMerge.apply(nn.Linear(2, 2)).merge_()


def test_operators_compose_and_remove_in_any_order() -> None:
    fam = build("plain")
    base = fam.run()
    a = Gain.apply(fam.model, init=2.0)
    b = Gain.apply(fam.model, init=0.5)
    assert torch.allclose(fam.run(), base, atol=1e-5)  # 2 * 0.5 = identity
    a.remove()
    assert not torch.allclose(fam.run(), base)
    b.remove()
    assert torch.equal(fam.run(), base)


def test_registry_and_mro_handlers() -> None:
    assert mt.get_operator("test-gain") is Gain
    assert "test-gain" in mt.available_operators()
    with pytest.raises(mt.OperatorNotFoundError, match="available"):
        mt.get_operator("no-such-operator")

    class SubGain(Gain):
        name = "test-subgain"

    class MyLinear(nn.Linear):
        pass

    Gain.register_handler(nn.Linear, "linear-handler")
    SubGain.register_handler("MyLinear", "sub-mylinear")
    assert Gain.handler_for(MyLinear(2, 2)) == "linear-handler"  # module MRO
    assert SubGain.handler_for(nn.Linear(2, 2)) == "linear-handler"  # operator MRO
    assert SubGain.handler_for(MyLinear) == "sub-mylinear"  # the subclass overrides
    assert Gain.handler_for(nn.ReLU()) is None


def test_entry_point_operators(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import EntryPoint

    import modulart.core.operator as op_mod

    ep = EntryPoint(name="plugin-gain", value="scale_operator:Gain", group=op_mod.ENTRY_POINT_GROUP)
    bad = EntryPoint(name="plugin-bad", value="no_such_module_xyz:Op", group=op_mod.ENTRY_POINT_GROUP)
    monkeypatch.setattr(op_mod, "entry_points", lambda group: [ep, bad] if group == op_mod.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(op_mod, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.setattr(op_mod, "_OPERATORS", dict(op_mod._OPERATORS))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert mt.get_operator("plugin-gain") is Gain
    assert any("plugin-bad" in str(w.message) for w in caught)


def test_apply_rejects_foreign_config_type() -> None:
    @dataclasses.dataclass
    class OtherConfig(mt.OperatorConfig):
        x: int = option(1, "x")

    with pytest.raises(mt.ConfigError, match="expects a GainConfig"):
        Gain.apply(build("plain").model, OtherConfig())


def test_an_operator_name_from_a_file_never_selects_what_is_imported(tmp_path: Path) -> None:
    """``"operator": "__main__"`` used to import (and run) ``modulart.__main__`` inside the loader."""
    import subprocess
    import sys

    from modulart.core import io

    for name in ("__main__", "cli", "tour", "core.io", "os"):
        io.save_artifact(tmp_path / name, operator=name, config={}, tensors={})
    code = (
        "import sys, modulart as mt, torch\n"
        f"for name in ('__main__', 'cli', 'tour', 'core.io', 'os'):\n"
        f"    try:\n"
        f"        mt.load(torch.nn.Linear(2, 2), {str(tmp_path)!r} + '/' + name)\n"
        f"    except mt.OperatorNotFoundError:\n"
        f"        pass\n"
        f"    else:\n"
        f"        raise SystemExit('loaded ' + name)\n"
        "bad = [m for m in ('modulart.__main__', 'modulart.cli', 'modulart.tour') if m in sys.modules]\n"
        "print('IMPORTED', bad)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "IMPORTED []" in proc.stdout
