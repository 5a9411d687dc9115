"""Public API hygiene: what ``dir()`` shows, name clashes, shadowed submodules, typed errors, lazy imports."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import modulart as mt
from families import tiny_llama as _tiny_llama
from modulart.core.errors import ModulartError

SRC = Path(mt.__file__).resolve().parent
PACKAGES = ["modulart", *(f"modulart.{p}" for p in mt._SUBPACKAGES)]

# Different objects sharing a name on purpose: every operator package has its own `apply` (and
# `load`) sugar next to the generic `mt.apply` / `mt.load`, and its own `demo`-style tour step.
# The name says "this package's entry point"; the package qualifies it. Nothing else may clash.
DELIBERATE_SHARED_NAMES = frozenset({"apply", "load", "demo"})

BARE_BUILTINS = frozenset({"ValueError", "TypeError", "KeyError", "IndexError", "RuntimeError", "NotImplementedError"})


def _public(module: types.ModuleType) -> dict[str, object]:
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    return {n: getattr(module, n) for n in names}


def test_dir_lists_exactly_the_public_names() -> None:
    assert set(dir(mt)) == {*mt.__all__, *mt._SUBPACKAGES}
    for leaked in ("Any", "TYPE_CHECKING", "annotations", "importlib"):
        assert leaked not in dir(mt)
    assert "__version__" in dir(mt)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_public_attribute_shadows_a_submodule(package: str) -> None:
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name == "__main__":  # `python -m modulart`: a script, importing it runs the CLI
            continue
        sub = importlib.import_module(f"{package}.{info.name}")
        attr = getattr(pkg, info.name)
        assert attr is sub, f"{package}.{info.name} is {attr!r}, not the submodule {sub.__name__}"
        # and `import a.b.c` binds the module, not a function of the same name
        assert sys.modules[f"{package}.{info.name}"] is sub


def test_introspect_and_stacking_functions_keep_their_names() -> None:
    assert callable(mt.introspect.routing) and callable(mt.introspect.report) and callable(mt.introspect.weights)
    assert callable(mt.stacking.grow)
    import modulart.introspect.routing_analysis as ra

    assert ra.routing is mt.introspect.routing


def test_no_two_public_names_differ_across_packages() -> None:
    seen: dict[str, list[tuple[str, object]]] = {}
    for package in PACKAGES:
        for name, obj in _public(importlib.import_module(package)).items():
            if callable(obj):
                seen.setdefault(name, []).append((package, obj))
    clashes = {
        name: [p for p, _ in owners]
        for name, owners in seen.items()
        if len({id(o) for _, o in owners}) > 1 and name not in DELIBERATE_SHARED_NAMES
    }
    assert not clashes, f"public names bound to different objects: {clashes}"
    assert not hasattr(mt.stacking, "get_operator")
    assert mt.stacking.get_growth_operator("zero").preserves_function


def _bare_raises() -> Iterator[tuple[str, int, str]]:
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            func = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(func, ast.Name) and func.id in BARE_BUILTINS:
                yield rel, node.lineno, func.id


def test_every_raised_error_is_a_modulart_error() -> None:
    found = list(_bare_raises())
    bad = [f"{f}:{ln}: {name}" for f, ln, name in found]
    assert not bad, "raise a modulart.core.errors class instead of a bare built-in:\n" + "\n".join(bad)


def test_new_error_classes_keep_their_builtin_bases() -> None:
    from modulart.core import errors

    pairs = {
        errors.InvalidArgumentError: TypeError,
        errors.OutOfRangeError: IndexError,
        errors.KeyNotFoundError: KeyError,
        errors.InvalidStateError: RuntimeError,
        errors.ConvergenceError: RuntimeError,
    }
    for cls, base in pairs.items():
        assert issubclass(cls, ModulartError) and issubclass(cls, base)
    assert str(errors.KeyNotFoundError("no patch 'x'")) == "no patch 'x'"


def test_unwrap_optimizer_raises_a_type_error() -> None:
    from modulart.core.errors import InvalidArgumentError
    from modulart.core.unwrap import unwrap_optimizer

    with pytest.raises(InvalidArgumentError) as info:
        unwrap_optimizer(object())
    assert isinstance(info.value, TypeError)


def test_migu_callback_is_exposed_lazily() -> None:
    code = (
        "import sys, modulart.migu as m; assert 'transformers' not in sys.modules, 'eager'; "
        "cb = m.MIGUCallback(keep_ratio=0.3); assert cb.config.keep_ratio == 0.3; "
        "from modulart.migu.hf import MIGUCallback; assert m.MIGUCallback is MIGUCallback"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert "MIGUCallback" in mt.migu.__all__


def test_kv_peft_target_modules_plans_without_changing_the_model() -> None:
    model = _tiny_llama()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    mlp = [f"model.layers.{i}.mlp" for i in range(2)]
    assert mt.kv.peft_target_modules(model) == [f"{m}.gate_proj" for m in mlp]
    assert mt.kv.peft_target_modules(model, target="values") == [f"{m}.down_proj" for m in mlp]
    assert mt.kv.peft_target_modules(model, {"target": "both", "keys": "both"}, layers=[1]) == [
        f"{mlp[1]}.{p}" for p in ("gate_proj", "up_proj", "down_proj")
    ]
    assert mt.kv.peft_target_modules(model, mt.kv.KVConfig(target="keys", keys="up")) == [f"{m}.up_proj" for m in mlp]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    # the same paths as a live handle reports
    handle = mt.kv.apply(model, target="both")
    try:
        assert mt.kv.peft_target_modules(model, target="both") == handle.peft_target_modules()
    finally:
        handle.remove()


def test_kv_peft_target_modules_refuses_fused_experts() -> None:
    pytest.importorskip("transformers")
    from introspect_models import tiny_mixtral

    model = tiny_mixtral(layers=1)  # transformers v5: experts fused in 3-D parameters
    with pytest.raises(mt.UnsupportedOperationError, match="fused expert storage"):
        mt.kv.peft_target_modules(model)


class _Split:
    """An EMoE-like object: splits one FFN into neuron-group experts, through the core protocol only."""

    def __init__(self, labels: torch.Tensor, top_k: int) -> None:
        from modulart.core.neuron_groups import ExpertGroups

        self.groups = ExpertGroups(labels, int(labels.max()) + 1)
        self.top_k = top_k

    def expert_groups(self) -> dict[str, object]:
        from modulart.core.neuron_groups import NeuronExpertSplit

        return {"": NeuronExpertSplit(self.groups, top_k=self.top_k)}


def test_introspect_reads_experts_through_the_protocol() -> None:
    from modulart.core.neuron_groups import ExpertGroups, NeuronExperts

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    split = _Split(torch.arange(32) % 4, top_k=2)
    assert isinstance(split, NeuronExperts)
    w_protocol = mt.introspect.weights(model, experts=split, progress=False)  # type: ignore[arg-type]
    w_mapping = mt.introspect.weights(model, experts={"": ExpertGroups(torch.arange(32) % 4, 4)}, progress=False)
    a = w_protocol.expert_similarity(matrix="act", level="neuron_mean").values
    b = w_mapping.expert_similarity(matrix="act", level="neuron_mean").values
    assert tuple(a.shape) == (1, 4, 4) and torch.allclose(a, b)
    r = mt.introspect.routing(model, torch.randn(2, 5, 8), experts=split)  # type: ignore[arg-type]
    assert r.layers == [0] and r.records[0].top_k == 2
    # the avg-k rule from live keys: the top-2 groups by x . mean key row
    with pytest.raises(mt.ConfigError, match="routing rule"):
        mt.introspect.routing(model, torch.randn(2, 5, 8), experts={"": split.groups})


def test_introspect_reads_an_emoe_handle_through_the_protocol() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    handle = mt.emoe.apply(model, num_experts=4, top_k=2, layers="all")
    try:
        from modulart.introspect.neuron_experts import neuron_splits

        splits = neuron_splits(handle)  # type: ignore[arg-type]
        assert list(splits) == [""] and splits[""].top_k == 2
        assert torch.equal(splits[""].groups.labels, handle.layers[""].groups.labels)
        r = mt.introspect.routing(model, torch.randn(2, 5, 8), experts=handle)  # type: ignore[arg-type]
        assert r.layers == [0]
    finally:
        handle.remove()


def test_no_operator_package_imports_another() -> None:
    operators = {"emoe", "kv", "migu", "patcher", "stacking", "introspect"}
    bad = []
    for pkg in [*operators, "core"]:
        for path in sorted((SRC / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "modulart" and len(parts) > 1 and parts[1] in operators and parts[1] != pkg:
                        bad.append(f"{path.relative_to(SRC)}:{node.lineno}: {name}")
    assert not bad, bad


def test_shared_core_types_are_reexported() -> None:
    from modulart.core.neuron_groups import ExpertGroups, select_topk
    from modulart.emoe import routing

    assert routing.ExpertGroups is ExpertGroups and routing.select_topk is select_topk
    assert mt.emoe.ExpertGroups is ExpertGroups


def test_from_pretrained_is_gone_and_resolve_artifact_says_it_returns_a_path() -> None:
    """``mt.from_pretrained`` returned a Path, not a model or a handle: the name now says what it does."""
    assert not hasattr(mt, "from_pretrained")
    assert callable(mt.resolve_artifact) and callable(mt.load)
