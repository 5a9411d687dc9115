"""The bad-input catalogue: every bad input tried against modulart, as data.

Each :class:`Row` names an input (``what``), a callable that performs it (``call(ctx, state)``,
after an optional ``setup(ctx) -> state``), the typed error it must raise and a fragment of the
message. ``tests/test_error_catalogue.py`` runs every row and checks that the failed call changed
nothing (state dicts bitwise, ``requires_grad`` flags, hook dicts, files); ``scripts/gen_errors_doc.py``
turns the rows into ``docs/errors.md``.

Rows never mutate the shared models of :class:`Ctx`: a row that needs a model in some state
(an operator applied, a NaN weight, a removed handle) builds it on ``ctx.fresh(name)`` in ``setup``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import modulart as mt
from modulart.core import errors as E

Call = Callable[["Ctx", Any], object]
Setup = Callable[["Ctx"], Any]

NAN = float("nan")
INF = float("inf")


@dataclass(frozen=True)
class Row:
    """One bad input: ``call(ctx, setup(ctx))`` must raise ``error`` with ``match`` in its message."""

    id: str
    area: str
    what: str
    call: Call
    error: type[BaseException]
    match: str | None = None
    setup: Setup | None = None


@dataclass(frozen=True)
class CliRow:
    """One bad command line: ``modulart *argv`` must exit with ``code`` and print one error line."""

    id: str
    what: str
    argv: Callable[[Ctx], list[str]]
    code: int
    match: str


# --- the shared context -------------------------------------------------------------------------


class Ctx:
    """Tiny models and files shared by every row (built once per test session)."""

    def __init__(self, root: Path) -> None:
        from families import PlainTransformer, tiny_llama
        from introspect_models import per_expert_keys, save_sharded, tiny_mixtral

        self.root = root
        self.models: dict[str, nn.Module] = {
            "plain": PlainTransformer(seed=0).eval(),
            "moe": PlainTransformer(seed=1, moe=True).eval(),
            "llama": tiny_llama(),
            "noffn": nn.Sequential(nn.Linear(8, 8), nn.Tanh()),
        }
        self.ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
        self.art: dict[str, Path] = {}
        for name, cfg in {
            "emoe": mt.emoe.EMoEConfig(num_experts=4, top_k=2, layers="all"),
            "kv": mt.kv.KVConfig(mode="lora", rank=2),
            "migu": mt.migu.MIGUConfig(),
            "patcher": mt.patcher.PatcherConfig(task="generation"),
        }.items():
            model = self.fresh("plain")
            mt.apply(model, cfg).save(root / "art" / name)
            self.art[name] = root / "art" / name
        # a dense HF checkpoint (growth) and a MoE checkpoint (introspection)
        self.ckpt = root / "ckpt"
        self.ckpt.mkdir()
        self.models["llama"].save_pretrained(self.ckpt, safe_serialization=True)
        self.moe_ckpt = save_sharded(per_expert_keys(tiny_mixtral(), "qwen"), root / "moe_ckpt")
        self.scratch = root / "scratch"
        self.scratch.mkdir()
        self.user = root / "user"  # a folder of the user's own files
        self.user.mkdir()
        (self.user / "notes.txt").write_text("mine\n")
        self._n = 0

    def fresh(self, name: str) -> nn.Module:
        """A private deep copy of a shared model (rows may change it in ``setup``)."""
        return copy.deepcopy(self.models[name])

    def dir(self, stem: str) -> Path:
        """A new, empty scratch folder."""
        self._n += 1
        d = self.scratch / f"{stem}-{self._n}"
        d.mkdir()
        return d

    def copy_artifact(self, name: str) -> Path:
        """A private copy of a saved artefact, to corrupt."""
        d = self.dir(f"art-{name}")
        shutil.copytree(self.art[name], d, dirs_exist_ok=True)
        return d

    def copy_ckpt(self, which: str = "ckpt") -> Path:
        d = self.dir(which)
        shutil.copytree(getattr(self, which), d, dirs_exist_ok=True)
        return d


# --- the invariance check ---------------------------------------------------------------------------

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_SHARED: dict[str, Ctx] = {}
_HASHES: dict[tuple[str, int, int, int, int], str] = {}


def shared_ctx(mktemp: Callable[[str], Path]) -> Ctx:
    """The one :class:`Ctx` of a test session (built on first use; both catalogue tests share it)."""
    if "ctx" not in _SHARED:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _SHARED["ctx"] = Ctx(mktemp("catalogue"))
    return _SHARED["ctx"]


def _bits(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor (so NaN equals NaN, and -0.0 differs from 0.0)."""
    t = t.detach().cpu().contiguous()
    return bytes(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""


def _modules_of(state: Any) -> list[nn.Module]:
    items = state if isinstance(state, (tuple, list)) else [state]
    out = []
    for s in items:
        if isinstance(s, nn.Module):
            out.append(s)
        elif isinstance(getattr(s, "model", None), nn.Module):
            out.append(s.model)
    return out


def snapshot(ctx: Ctx, state: Any) -> dict[str, Any]:
    """Everything a failed call must leave as it was: models (tensors, flags, hooks) and files."""
    snap: dict[str, Any] = {}
    models = {f"shared:{k}": m for k, m in ctx.models.items()}
    models |= {f"row:{i}": m for i, m in enumerate(_modules_of(state))}
    for key, model in models.items():
        snap[f"{key}:state"] = {n: (t.dtype, tuple(t.shape), _bits(t)) for n, t in model.state_dict().items()}
        snap[f"{key}:flags"] = {n: p.requires_grad for n, p in model.named_parameters()}
        hooks = {}
        for name, mod in model.named_modules():
            hooks[name] = tuple(tuple(getattr(mod, d, {}).keys()) for d in _HOOK_DICTS)
        for name, p in model.named_parameters():
            grad_hooks = getattr(p, "_post_accumulate_grad_hooks", None) or {}
            hooks[f"param:{name}"] = (tuple(grad_hooks), tuple((p._backward_hooks or {}).keys()))
        snap[f"{key}:hooks"] = hooks
    files = {}
    for f in sorted(ctx.root.rglob("*")):
        rel = str(f.relative_to(ctx.root))
        if f.is_symlink():
            files[rel] = ("link", str(f.readlink()))
        elif f.is_file():
            st = f.stat()
            key = (str(f), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            if key not in _HASHES:  # a file whose stat is unchanged is not read again
                _HASHES[key] = hashlib.sha256(f.read_bytes()).hexdigest()
            files[rel] = ("file", st.st_mode, _HASHES[key])
        else:
            files[rel] = ("dir", f.stat().st_mode)
    snap["files"] = files
    return snap


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for key in before:
        if before[key] != after[key]:
            b, a = before[key], after[key]
            changed = sorted(k for k in set(b) | set(a) if b.get(k) != a.get(k))
            raise AssertionError(f"the failed call changed {key}: {changed[:6]}")


# --- helpers used by rows ------------------------------------------------------------------------


def _emoe(ctx: Ctx, model: str = "plain", **kw: Any) -> object:
    return mt.emoe.apply(ctx.models[model], **({"num_experts": 4, "top_k": 2} | kw))


def _kv(ctx: Ctx, model: str = "plain", **kw: Any) -> object:
    return mt.kv.apply(ctx.models[model], **kw)


def _migu(ctx: Ctx, model: str = "plain", **kw: Any) -> object:
    return mt.migu.apply(ctx.models[model], **kw)


def _patcher(ctx: Ctx, model: str = "plain", **kw: Any) -> object:
    return mt.patcher.apply(ctx.models[model], **({"task": "generation"} | kw))


def _poison(model: nn.Module, value: float, name: str = "blocks.2.mlp.fc_in.weight") -> nn.Module:
    with torch.no_grad():
        dict(model.named_parameters())[name][0, 0] = value
    return model


def _fresh_poisoned(name: str, value: float, param: str = "blocks.2.mlp.fc_in.weight") -> Setup:
    return lambda ctx: _poison(ctx.fresh(name), value, param)


def _applied(fn: Callable[[nn.Module], Any], model: str = "plain", remove: bool = False) -> Setup:
    def setup(ctx: Ctx) -> Any:
        h = fn(ctx.fresh(model))
        if remove:
            h.remove()
        return h

    return setup


def _emoe_h(m: nn.Module) -> Any:
    return mt.emoe.apply(m, num_experts=4, top_k=2, layers="all")


def _emoe_sparse(m: nn.Module) -> Any:
    return mt.emoe.apply(m, num_experts=4, top_k=2, layers="all", executor="sparse")


def _kv_h(m: nn.Module, **kw: Any) -> Any:
    return mt.kv.apply(m, **kw)


def _migu_h(m: nn.Module) -> Any:
    return mt.migu.apply(m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1))


def _patch_h(m: nn.Module) -> Any:
    return mt.patcher.apply(m, task="generation")


def _with_memory(h: Any, ctx: Ctx) -> Any:
    h.set_memory(ctx.ids)
    return h


def _migu_nan_step(ctx: Ctx, state: Any, scale: float) -> None:
    h = state
    x = ctx.ids
    loss = h.model(x).float().mean() * scale
    loss.backward()
    h.optimizer.step()


def _flip_byte(path: Path, offset_from_end: int = 8) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        cur = data
        *head, last = k.split("__")
        for h in head:
            cur = cur[h]
        cur[last] = v
    path.write_text(json.dumps(data))


def _art_with(name: str, fn: Callable[[Path], None]) -> Setup:
    def setup(ctx: Ctx) -> Path:
        d = ctx.copy_artifact(name)
        fn(d)
        return d

    return setup


def _state_file(d: Path) -> Path:
    return d / "modulart_state.safetensors"


def _config_file(d: Path) -> Path:
    return d / "modulart_config.json"


def _reshape_state(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(str(_state_file(d)))
    k = sorted(t)[0]
    t[k] = torch.zeros(*(s + 1 for s in t[k].shape), dtype=t[k].dtype)
    save_file(t, str(_state_file(d)))


def _drop_state_key(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(str(_state_file(d)))
    t.pop(sorted(t)[0])
    save_file(t, str(_state_file(d)))


def _retype_state(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(str(_state_file(d)))
    k = next(k for k in sorted(t) if t[k].is_floating_point())
    t[k] = t[k].to(torch.float16)
    save_file(t, str(_state_file(d)))


def _ckpt_with(fn: Callable[[Path], None], which: str = "ckpt") -> Setup:
    def setup(ctx: Ctx) -> Path:
        d = ctx.copy_ckpt(which)
        fn(d)
        return d

    return setup


def _moe_shard(d: Path) -> Path:
    return sorted(d.glob("*.safetensors"))[0]


def _traversal_index(d: Path) -> None:
    idx = d / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "../outside.safetensors"
    idx.write_text(json.dumps(data))


def _shard_ckpt(d: Path) -> None:
    """Turn a one-file checkpoint into a two-shard one with an index."""
    from safetensors.torch import load_file, save_file

    t = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    keys = sorted(t)
    wm = {}
    for s in range(2):
        name = f"model-{s + 1:05d}-of-00002.safetensors"
        save_file({k: t[k] for k in keys[s::2]}, str(d / name))
        wm |= dict.fromkeys(keys[s::2], name)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def _traversal_ckpt(d: Path) -> None:
    _shard_ckpt(d)
    _traversal_index(d)


def _grow(ctx: Ctx, src: Path, **kw: Any) -> object:
    import modulart.stacking as st

    return st.grow_checkpoint(
        src, kw.pop("dst", ctx.scratch / "never-written"), kw.pop("plan", 2), progress=False, **kw
    )


def _st() -> Any:
    import modulart.stacking as st

    return st


def _mi() -> Any:
    import modulart.introspect as mi

    return mi


_IDS = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))


def _nan_loss(m: nn.Module) -> torch.Tensor:
    return m(_IDS).float().mean() * NAN


# --- the rows --------------------------------------------------------------------------------------


def _cfg_rows(area: str, cls_name: str, fn: Callable[..., object], cases: list[tuple[str, Any, str]]) -> list[Row]:
    rows = []
    for fieldname, value, frag in cases:
        rid = f"{area}-cfg-{fieldname}-{_slug(value)}"
        rows.append(
            Row(
                rid,
                area,
                f"`{cls_name}({fieldname}={value!r})`",
                (lambda ctx, _s, f=fieldname, v=value: fn(ctx, **{f: v})),
                E.ConfigError,
                f"{cls_name}.{fieldname}" + (f" = {frag}" if frag else ""),
            )
        )
    return rows


def _slug(v: Any) -> str:
    s = repr(v).strip("'\"").replace(" ", "").replace(".", "_").replace("-", "m")
    return "".join(c if c.isalnum() or c == "_" else "" for c in s)[:12] or "x"


EMOE_CFG = [
    ("num_experts", 0, ""),
    ("num_experts", -4, ""),
    ("num_experts", 2.5, ""),
    ("num_experts", "4", ""),
    ("top_k", 0, ""),
    ("top_k", 5, ""),
    ("split", "spectral", ""),
    ("router", "learned", ""),
    ("executor", "dense", ""),
    ("every", 0, ""),
    ("max_iter", 0, ""),
    ("gate_noise", -1.0, ""),
    ("gate_noise", NAN, ""),
    ("gate_noise", INF, ""),
    ("balance_loss_weight", NAN, ""),
    ("balance_loss_weight", -0.1, ""),
    ("seed", "zero", ""),
    ("start", 1.5, ""),
    ("balance_loss", "l2", ""),
    ("capacity_factor", 0.0, ""),
    ("capacity_factor", NAN, ""),
    ("per_expert_bias", "yes", ""),
    ("dropout", 1.0, ""),
    ("dropout", NAN, ""),
]

KV_CFG = [
    ("target", "queries", ""),
    ("keys", "down", ""),
    ("mode", "prefix", ""),
    ("rank", 0, ""),
    ("rank", 1.5, ""),
    ("rank", True, ""),
    ("alpha", 0.0, ""),
    ("alpha", INF, ""),
    ("alpha", NAN, ""),
    ("alpha", -INF, ""),
    ("lora_dropout", 1.0, ""),
    ("lora_dropout", NAN, ""),
    ("train_biases", "yes", ""),
    ("seed", 1.5, ""),
    ("extra_lora", [""], ""),
    ("extra_lora", "q_proj", ""),
]

MIGU_CFG = [
    ("keep_ratio", 0.0, ""),
    ("keep_ratio", 1.5, ""),
    ("keep_ratio", NAN, ""),
    ("keep_ratio", INF, ""),
    ("keep_ratio", True, ""),
    ("stat", "l2", ""),
    ("select", "bottomk", ""),
    ("control", "none", ""),
    ("moe", "yes", ""),
    ("seed", "0", ""),
    ("targets", 5, ""),
]

PATCHER_CFG = [
    ("positions", "first", ""),
    ("init", "xavier", ""),
    ("views", 0, ""),
    ("max_steps", -1, ""),
    ("lr", 0.0, ""),
    ("lr", NAN, ""),
    ("lr", INF, ""),
    ("min_lr", 1.0, ""),
    ("value_scale", NAN, ""),
    ("value_scale", INF, ""),
    ("memory_weight", -1.0, ""),
    ("memory_weight", NAN, ""),
    ("silence_margin", NAN, ""),
    ("edit_margin", INF, ""),
    ("fire_threshold", NAN, ""),
    ("weight_decay", NAN, ""),
    ("grad_clip", INF, ""),
    ("label_smoothing", 1.0, ""),
    ("progress", "yes", ""),
    ("layer", "", ""),
    ("memory_loss", "views", ""),
    ("pool_neurons", 1, ""),
    ("entropy_weight", -0.1, ""),
    ("lr_schedule", "cosine", ""),
    ("stop_rule", "never", ""),
    ("check_every", 0, ""),
    ("check_start", -1, ""),
    ("memory_update", "all", ""),
]


def _rows() -> list[Row]:
    st, mi = _st, _mi
    rows: list[Row] = []
    rows += _cfg_rows("emoe", "EMoEConfig", _emoe, EMOE_CFG)
    rows += _cfg_rows("kv", "KVConfig", lambda ctx, **kw: _kv(ctx, **({"mode": "lora"} | kw)), KV_CFG)
    rows += _cfg_rows("migu", "MIGUConfig", _migu, MIGU_CFG)
    rows += _cfg_rows("patcher", "PatcherConfig", _patcher, PATCHER_CFG)
    R = Row
    rows += [
        # --- EMoE ---------------------------------------------------------------------------------
        R(
            "emoe-unknown-field",
            "emoe",
            "`mt.emoe.apply(model, experts=4)` (unknown field)",
            lambda c, s: _emoe(c, experts=4),
            E.ConfigError,
            "experts",
        ),
        R(
            "emoe-oracle-sparse",
            "emoe",
            "`router='oracle'` with `executor='sparse'`",
            lambda c, s: _emoe(c, router="oracle", executor="sparse"),
            E.ConfigError,
            "EMoEConfig.router",
        ),
        R(
            "emoe-layer-out-of-range",
            "emoe",
            "`layers=[7]` on a 3-FFN model",
            lambda c, s: _emoe(c, layers=[7]),
            E.SelectorError,
            "layer index 7 is out of range",
        ),
        R(
            "emoe-layer-bad-spec",
            "emoe",
            "`layers='every_other_one'`",
            lambda c, s: _emoe(c, layers="every_other_one"),
            E.SelectorError,
            "every_other_one",
        ),
        R(
            "emoe-layer-bad-path",
            "emoe",
            "`layers=['blocks.9.mlp']` (no such FFN path)",
            lambda c, s: _emoe(c, layers=["blocks.9.mlp"]),
            E.SelectorError,
            "blocks.9.mlp",
        ),
        R(
            "emoe-more-experts-than-neurons",
            "emoe",
            "`num_experts=128` on FFNs with 64 neurons",
            lambda c, s: _emoe(c, num_experts=128, top_k=2, layers="all"),
            E.ConfigError,
            "num_experts",
        ),
        R(
            "emoe-no-ffn",
            "emoe",
            "a model without any FFN (`Sequential(Linear, Tanh)`)",
            lambda c, s: _emoe(c, "noffn"),
            E.UnsupportedModuleError,
            "no feed-forward block",
        ),
        R(
            "emoe-nan-weight",
            "emoe",
            "a NaN in the FFN keys before `apply`",
            lambda c, s: mt.emoe.apply(s, num_experts=4, top_k=2, layers="all"),
            E.NonFiniteError,
            "NaN or inf",
            _fresh_poisoned("plain", NAN),
        ),
        R(
            "emoe-inf-weight",
            "emoe",
            "an inf in the FFN keys before `apply`",
            lambda c, s: mt.emoe.apply(s, num_experts=4, top_k=2, layers="all"),
            E.NonFiniteError,
            "NaN or inf",
            _fresh_poisoned("plain", INF),
        ),
        R(
            "emoe-after-sparse-emoe",
            "emoe",
            "EMoE applied on FFNs that a sparse EMoE already claims",
            lambda c, s: _emoe_h(s.model),
            E.CompositionError,
            "emoe",
            _applied(_emoe_sparse),
        ),
        R(
            "emoe-start-text",
            "emoe",
            "`EMoEConfig(every=2, start='first')`",
            lambda c, s: _emoe(c, every=2, start="first"),
            E.ConfigError,
            "EMoEConfig.start",
        ),
        R(
            "emoe-enable-after-remove",
            "emoe",
            "`handle.enable()` after `remove()`",
            lambda c, s: s.enable(),
            E.UnsupportedOperationError,
            "was removed",
            _applied(_emoe_h, remove=True),
        ),
        R(
            "emoe-save-after-remove",
            "emoe",
            "`handle.save(dir)` after `remove()`",
            lambda c, s: s.save(c.scratch / "emoe-after-remove"),
            E.UnsupportedOperationError,
            "was removed",
            _applied(_emoe_h, remove=True),
        ),
        R(
            "emoe-merge-topk",
            "emoe",
            "`merge_()` with `top_k < num_experts` (not function-preserving)",
            lambda c, s: s.merge_(),
            E.UnsupportedOperationError,
            "top_k = 2 < num_experts = 4",
            _applied(_emoe_h),
        ),
        R(
            "emoe-load-state-wrong-shape",
            "emoe",
            "`load_state_dict` with a wrongly shaped tensor",
            lambda c, s: s.load_state_dict(
                {k: (torch.zeros(3, 3) if isinstance(v, torch.Tensor) else v) for k, v in s.state_dict().items()}
            ),
            E.IncompatibleArtifactError,
            "expected int64 [64]",
            _applied(_emoe_h),
        ),
        # --- KV -----------------------------------------------------------------------------------
        R(
            "kv-neurons-zero",
            "kv",
            "`KVConfig(mode='mask', neurons=0.0)`",
            lambda c, s: _kv(c, mode="mask", neurons=0.0),
            E.ConfigError,
            "KVConfig.neurons",
        ),
        R(
            "kv-neurons-nan",
            "kv",
            "`KVConfig(mode='mask', neurons=nan)`",
            lambda c, s: _kv(c, mode="mask", neurons=NAN),
            E.ConfigError,
            "KVConfig.neurons",
        ),
        R(
            "kv-neurons-negative-index",
            "kv",
            "`neurons={'blocks.0.mlp': [-1]}`",
            lambda c, s: _kv(c, mode="mask", neurons={"blocks.0.mlp": [-1]}),
            E.ConfigError,
            "KVConfig.neurons",
        ),
        R(
            "kv-neurons-index-out-of-range",
            "kv",
            "`neurons={<block>: [999]}` with d_ff = 64",
            lambda c, s: _kv(c, mode="mask", neurons={"blocks.0.mlp": [999]}),
            E.ConfigError,
            "indices [999] outside [0, 64)",
        ),
        R(
            "kv-neurons-unknown-block",
            "kv",
            "`neurons={'nowhere': [0]}` (no such block)",
            lambda c, s: _kv(c, mode="mask", neurons={"nowhere": [0]}),
            E.ConfigError,
            "['nowhere']",
        ),
        R(
            "kv-neurons-full-mode",
            "kv",
            "`neurons=0.5` with `mode='full'`",
            lambda c, s: _kv(c, mode="full", neurons=0.5),
            E.ConfigError,
            "mode='mask'",
        ),
        R(
            "kv-layers-out-of-range",
            "kv",
            "`layers=[5]` on a 3-block model",
            lambda c, s: _kv(c, layers=[5]),
            E.SelectorError,
            "layer index 5 is out of range",
        ),
        R(
            "kv-layers-bad-path",
            "kv",
            "`layers=['blocks.0.attn']` (not an FFN block)",
            lambda c, s: _kv(c, layers=["blocks.0.attn"]),
            E.SelectorError,
            "blocks.0.attn",
        ),
        R(
            "kv-no-ffn",
            "kv",
            "a model without any FFN",
            lambda c, s: _kv(c, "noffn"),
            E.UnsupportedModuleError,
            "no feed-forward block",
        ),
        R(
            "kv-nan-weight",
            "kv",
            "a NaN in the tuned FFN keys before `apply`",
            lambda c, s: mt.kv.apply(s, mode="lora"),
            E.NonFiniteError,
            "NaN or inf",
            _fresh_poisoned("plain", NAN),
        ),
        R(
            "kv-inf-weight",
            "kv",
            "an inf in the tuned FFN values before `apply`",
            lambda c, s: mt.kv.apply(s, target="values"),
            E.NonFiniteError,
            "NaN or inf",
            _fresh_poisoned("plain", INF, "blocks.1.mlp.fc_out.weight"),
        ),
        R(
            "kv-attach-not-optimizer",
            "kv",
            "`handle.attach('adam')`",
            lambda c, s: s.attach("adam"),
            E.InvalidArgumentError,
            "expected a torch.optim.Optimizer",
            _applied(lambda m: _kv_h(m, mode="mask", neurons=0.5)),
        ),
        R(
            "kv-attach-after-remove",
            "kv",
            "`handle.attach(opt)` after `remove()`",
            lambda c, s: s.attach(torch.optim.SGD(s.model.parameters(), lr=0.1)),
            E.UnsupportedOperationError,
            "was removed",
            _applied(lambda m: _kv_h(m, mode="mask", neurons=0.5), remove=True),
        ),
        R(
            "kv-merge-after-remove",
            "kv",
            "`merge_()` after `remove()`",
            lambda c, s: s.merge_(),
            E.UnsupportedOperationError,
            "was removed",
            _applied(lambda m: _kv_h(m, mode="lora"), remove=True),
        ),
        R(
            "kv-load-state-missing",
            "kv",
            "`load_state_dict({})` on a LoRA handle",
            lambda c, s: s.load_state_dict({}),
            E.IncompatibleArtifactError,
            "missing",
            _applied(lambda m: _kv_h(m, mode="lora")),
        ),
        R(
            "kv-after-sparse-emoe",
            "kv",
            "KV LoRA on FFNs that a sparse EMoE already claims",
            lambda c, s: _kv_h(s.model, mode="lora"),
            E.CompositionError,
            "emoe",
            _applied(_emoe_sparse),
        ),
        # --- MIGU ---------------------------------------------------------------------------------
        R(
            "migu-targets-nothing",
            "migu",
            "`targets='nothing.matches.this'`",
            lambda c, s: _migu(c, targets="nothing.matches.this"),
            E.SelectorError,
            "matches no module",
        ),
        R(
            "migu-no-linear",
            "migu",
            "a model with no linear layer (`Sequential(Tanh)`)",
            lambda c, s: mt.migu.apply(nn.Sequential(nn.Tanh())),
            E.UnsupportedModuleError,
            "no trainable linear layer",
        ),
        R(
            "migu-optimizer-wrong-type",
            "migu",
            "`optimizer='sgd'`",
            lambda c, s: _migu(c, optimizer="sgd"),
            E.InvalidArgumentError,
            "expected a torch.optim.Optimizer",
        ),
        R(
            "migu-nan-loss-step",
            "migu",
            "an optimizer step after a NaN loss",
            lambda c, s: _migu_nan_step(c, s, NAN),
            E.NonFiniteError,
            "NaN or inf",
            _applied(_migu_h),
        ),
        R(
            "migu-inf-loss-step",
            "migu",
            "an optimizer step after an inf loss",
            lambda c, s: _migu_nan_step(c, s, INF),
            E.NonFiniteError,
            "NaN or inf",
            _applied(_migu_h),
        ),
        R(
            "migu-attach-after-remove",
            "migu",
            "`attach(opt)` after `remove()`",
            lambda c, s: s.attach(torch.optim.SGD(s.model.parameters(), lr=0.1)),
            E.UnsupportedOperationError,
            "was removed",
            _applied(_migu_h, remove=True),
        ),
        R(
            "migu-boundary-after-remove",
            "migu",
            "`task_boundary()` after `remove()`",
            lambda c, s: s.task_boundary(),
            E.UnsupportedOperationError,
            "was removed",
            _applied(_migu_h, remove=True),
        ),
        R(
            "migu-load-state-garbage",
            "migu",
            "`load_state_dict({'x': 1})`",
            lambda c, s: s.load_state_dict({"x": 1}),
            E.IncompatibleArtifactError,
            "['x']",
            _applied(_migu_h),
        ),
        # --- Patcher ------------------------------------------------------------------------------
        R(
            "patcher-layer-out-of-range",
            "patcher",
            "`layer=9` on a 3-FFN model",
            lambda c, s: _patcher(c, layer=9),
            E.SelectorError,
            "PatcherConfig.layer = 9",
        ),
        R(
            "patcher-layer-bad-path",
            "patcher",
            "`layer='blocks.0.attn'` (not an FFN)",
            lambda c, s: _patcher(c, layer="blocks.0.attn"),
            E.SelectorError,
            "PatcherConfig.layer = 'blocks.0.attn'",
        ),
        R(
            "patcher-ete-classification",
            "patcher",
            "`positions='erroneous_target_tokens'` with classification",
            lambda c, s: _patcher(c, task="classification", positions="erroneous_target_tokens"),
            E.ConfigError,
            "PatcherConfig.positions",
        ),
        R(
            "patcher-task",
            "patcher",
            "`task='regression'`",
            lambda c, s: _patcher(c, task="regression"),
            E.ConfigError,
            "PatcherConfig.task",
        ),
        R(
            "patcher-no-ffn",
            "patcher",
            "a model without any FFN",
            lambda c, s: _patcher(c, "noffn"),
            E.UnsupportedModuleError,
            "no feed-forward block",
        ),
        R(
            "patcher-nan-loss-edit",
            "patcher",
            "an edit whose loss is NaN (a NaN in the LM head)",
            lambda c, s: s.edit(c.ids[0], torch.tensor([1, 2])),
            E.NonFiniteError,
            "NaN or inf",
            lambda c: _with_memory(_patch_h(_poison(c.fresh("plain"), NAN, "head.weight")), c),
        ),
        R(
            "patcher-unknown-patch",
            "patcher",
            "`remove_patch('nope')`",
            lambda c, s: s.remove_patch("nope"),
            E.KeyNotFoundError,
            "nope",
            _applied(_patch_h),
        ),
        R(
            "patcher-enable-unknown-patch",
            "patcher",
            "`enable_patch('nope')`",
            lambda c, s: s.enable_patch("nope"),
            E.KeyNotFoundError,
            "nope",
            _applied(_patch_h),
        ),
        R(
            "patcher-edit-after-remove",
            "patcher",
            "`edit(...)` after `remove()`",
            lambda c, s: s.edit(c.ids[0], torch.tensor([1, 2])),
            E.UnsupportedOperationError,
            "was removed",
            _applied(_patch_h, remove=True),
        ),
        R(
            "patcher-unbake-unbaked",
            "patcher",
            "`unbake()` on a handle that was never baked",
            lambda c, s: s.unbake(),
            E.UnsupportedOperationError,
            "nothing is baked",
            _applied(_patch_h),
        ),
        R(
            "patcher-memory-wrong-type",
            "patcher",
            "`set_memory('some text')`",
            lambda c, s: s.set_memory("some text"),
            E.ShapeError,
            "got str",
            _applied(_patch_h),
        ),
        R(
            "patcher-edit-target-out-of-vocab",
            "patcher",
            "generation edit whose target token id is 999 (vocabulary 128)",
            lambda c, s: s.edit(c.ids[0], torch.tensor([999])),
            E.ShapeError,
            "999 is out of range",
            lambda c: _with_memory(_patch_h(c.fresh("plain")), c),
        ),
        R(
            "patcher-edit-target-negative",
            "patcher",
            "generation edit whose target token id is -1",
            lambda c, s: s.edit(c.ids[0], torch.tensor([-1])),
            E.ShapeError,
            "-1 is out of range",
            lambda c: _with_memory(_patch_h(c.fresh("plain")), c),
        ),
        R(
            "patcher-edit-target-float",
            "patcher",
            "generation edit whose target is a float tensor",
            lambda c, s: s.edit(c.ids[0], torch.tensor([1.5, 2.0])),
            E.ShapeError,
            "integer token tensor",
            lambda c: _with_memory(_patch_h(c.fresh("plain")), c),
        ),
        R(
            "patcher-edit-target-empty",
            "patcher",
            "generation edit whose target is empty",
            lambda c, s: s.edit(c.ids[0], torch.tensor([], dtype=torch.long)),
            E.ShapeError,
            "non-empty",
            lambda c: _with_memory(_patch_h(c.fresh("plain")), c),
        ),
        R(
            "patcher-edit-without-memory",
            "patcher",
            "`edit()` before `set_memory()` with a memory loss weight > 0",
            lambda c, s: s.edit(c.ids[0], torch.tensor([1, 2])),
            E.ConfigError,
            "set_memory",
            _applied(_patch_h),
        ),
        # --- growth ---------------------------------------------------------------------------
        R(
            "grow-factor-zero",
            "stacking",
            "`grow(model, 0)`",
            lambda c, s: st().grow(c.models["plain"], 0),
            E.ConfigError,
            "factor = 0",
        ),
        R(
            "grow-factor-negative",
            "stacking",
            "`grow(model, -2)`",
            lambda c, s: st().grow(c.models["plain"], -2),
            E.ConfigError,
            "factor = -2",
        ),
        R(
            "grow-plan-wrong-depth",
            "stacking",
            "a plan written for 4 layers on a 3-layer model",
            lambda c, s: st().grow(c.models["plain"], st().LayerPlan.stack(4, 2)),
            E.ConfigError,
            "4-layer",
        ),
        R(
            "grow-operator-unknown",
            "stacking",
            "`grow(model, 2, operator='magic')`",
            lambda c, s: st().grow(c.models["plain"], 2, operator="magic"),
            E.ConfigError,
            "operator",
        ),
        R(
            "grow-learn-no-loss",
            "stacking",
            "`operator='learn'` without `loss_fn`",
            lambda c, s: st().grow(c.models["plain"], 2, operator="learn"),
            E.ConfigError,
            "loss_fn",
        ),
        R(
            "grow-learn-nan-loss",
            "stacking",
            "`operator='learn'` whose loss is NaN",
            lambda c, s: st().grow(c.models["plain"], 2, operator="learn", loss_fn=_nan_loss, learn_steps=2),
            E.NonFiniteError,
            "NaN or inf",
        ),
        R(
            "grow-ramp-steps-negative",
            "stacking",
            "`GrowthConfig(ramp_steps=-1)`",
            lambda c, s: st().GrowthConfig(ramp_steps=-1),
            E.ConfigError,
            "ramp_steps",
        ),
        R(
            "grow-learn-lr-nan",
            "stacking",
            "`GrowthConfig(learn_lr=nan)`",
            lambda c, s: st().GrowthConfig(learn_lr=NAN),
            E.ConfigError,
            "learn_lr",
        ),
        R(
            "grow-learn-steps-negative",
            "stacking",
            "`GrowthConfig(learn_steps=-1)`",
            lambda c, s: st().GrowthConfig(learn_steps=-1),
            E.ConfigError,
            "learn_steps",
        ),
        R(
            "grow-init-std-inf",
            "stacking",
            "`GrowthConfig(init_std=inf)`",
            lambda c, s: st().GrowthConfig(init_std=INF),
            E.ConfigError,
            "init_std",
        ),
        R(
            "grow-blocks-missing",
            "stacking",
            "`grow(model, 2, blocks='layers')` (no such block list)",
            lambda c, s: st().grow(c.models["plain"], 2, blocks="layers"),
            E.UnsupportedModuleError,
            "blocks='layers'",
        ),
        R(
            "grow-no-blocks",
            "stacking",
            "`grow` on a model without a block list",
            lambda c, s: st().grow(c.models["noffn"], 2),
            E.UnsupportedModuleError,
            "no homogeneous block list",
        ),
        R(
            "grow-width-smaller",
            "stacking",
            "`grow_width(model, d_ff=16)` (smaller than 64)",
            lambda c, s: st().grow_width(c.models["plain"], d_ff=16),
            E.ConfigError,
            "d_ff",
        ),
        R(
            "grow-width-learn-nan-loss",
            "stacking",
            "`grow_width(operator='learn')` whose loss is NaN",
            lambda c, s: st().grow_width(
                c.models["plain"], d_ff=96, operator="learn", loss_fn=_nan_loss, learn_steps=2
            ),
            E.NonFiniteError,
            "NaN or inf",
        ),
        R(
            "plan-parse-garbage",
            "stacking",
            "`LayerPlan.parse('0-a', 3)`",
            lambda c, s: st().LayerPlan.parse("0-a", 3),
            E.ConfigError,
            "'0-a'",
        ),
        R(
            "plan-parse-out-of-range",
            "stacking",
            "`LayerPlan.parse('0-5', 3)`",
            lambda c, s: st().LayerPlan.parse("0-5", 3),
            E.ConfigError,
            "LayerPlan.indices[3] = 3",
        ),
        R(
            "plan-dus-too-deep",
            "stacking",
            "`LayerPlan.dus(3, 3)` (drop all layers)",
            lambda c, s: st().LayerPlan.dus(3, 3),
            E.ConfigError,
            "drop = 3",
        ),
        R(
            "plan-interleave-zero",
            "stacking",
            "`LayerPlan.interleave(3, 0)`",
            lambda c, s: st().LayerPlan.interleave(3, 0),
            E.ConfigError,
            "factor = 0",
        ),
        R(
            "schedule-nan",
            "stacking",
            "`gstack_schedule` with a NaN budget",
            lambda c, s: st().gstack_schedule(NAN, 1e9),
            E.ConfigError,
            "n_params = nan",
        ),
        R(
            "grow-optimizer-policy",
            "stacking",
            "`grow_optimizer(..., policy='keep')`",
            lambda c, s: st().grow_optimizer(
                torch.optim.SGD(c.fresh("plain").parameters(), lr=0.1),
                c.models["plain"],
                c.models["plain"],
                st().LayerPlan.stack(3, 1),
                policy="keep",
            ),
            E.ConfigError,
            "policy",
        ),
        # --- growth checkpoints -----------------------------------------------------------------------
        R(
            "ckpt-src-missing",
            "checkpoints",
            "`grow_checkpoint` of a folder that does not exist",
            lambda c, s: _grow(c, c.scratch / "nope"),
            E.IncompatibleArtifactError,
            "no such checkpoint file or directory",
        ),
        R(
            "ckpt-src-empty",
            "checkpoints",
            "`grow_checkpoint` of an empty folder",
            lambda c, s: _grow(c, s),
            E.IncompatibleArtifactError,
            "no *.safetensors file",
            lambda c: c.dir("empty"),
        ),
        R(
            "ckpt-dst-equals-src",
            "checkpoints",
            "output folder = source folder",
            lambda c, s: _grow(c, c.ckpt, dst=c.ckpt, overwrite=True),
            E.ConfigError,
            "must differ",
        ),
        R(
            "ckpt-dst-parent-of-src",
            "checkpoints",
            "output folder contains the source (`--overwrite`)",
            lambda c, s: _grow(c, c.ckpt, dst=c.root, overwrite=True),
            E.UnsafePathError,
            "contains it",
        ),
        R(
            "ckpt-dst-inside-src",
            "checkpoints",
            "output folder inside the source",
            lambda c, s: _grow(c, c.ckpt, dst=c.ckpt / "big"),
            E.UnsafePathError,
            "inside it",
        ),
        R(
            "ckpt-dst-user-folder",
            "checkpoints",
            "output = a non-empty folder of user files, `overwrite=True`",
            lambda c, s: _grow(c, c.ckpt, dst=c.user, overwrite=True),
            E.UnsafePathError,
            "notes.txt",
        ),
        R(
            "ckpt-dst-exists",
            "checkpoints",
            "output folder exists, no `overwrite`",
            lambda c, s: _grow(c, c.ckpt, dst=c.user),
            E.ConfigError,
            "exists",
        ),
        R(
            "ckpt-shard-size-garbage",
            "checkpoints",
            "`max_shard_size='5XB'`",
            lambda c, s: _grow(c, c.ckpt, max_shard_size="5XB"),
            E.ConfigError,
            "max_shard_size",
        ),
        R(
            "ckpt-shard-size-negative",
            "checkpoints",
            "`max_shard_size=-1`",
            lambda c, s: _grow(c, c.ckpt, max_shard_size=-1),
            E.ConfigError,
            "max_shard_size",
        ),
        R(
            "ckpt-operator-random",
            "checkpoints",
            "`operator='random'` on disk",
            lambda c, s: _grow(c, c.ckpt, operator="random"),
            E.ConfigError,
            "operator",
        ),
        R(
            "ckpt-plan-zero",
            "checkpoints",
            "`grow_checkpoint(..., plan=0)`",
            lambda c, s: _grow(c, c.ckpt, plan=0),
            E.ConfigError,
            "factor = 0",
        ),
        R(
            "ckpt-blocks-missing",
            "checkpoints",
            "`blocks='nothing.here'`",
            lambda c, s: _grow(c, c.ckpt, blocks="nothing.here"),
            E.ConfigError,
            "nothing.here",
        ),
        R(
            "ckpt-not-safetensors",
            "checkpoints",
            "a folder whose `model.safetensors` is text",
            lambda c, s: _grow(c, s),
            E.IncompatibleArtifactError,
            "model.safetensors",
            _ckpt_with(lambda d: (d / "model.safetensors").write_text("not a safetensors file")),
        ),
        R(
            "ckpt-truncated",
            "checkpoints",
            "a truncated `model.safetensors`",
            lambda c, s: _grow(c, s),
            E.IncompatibleArtifactError,
            "truncated",
            _ckpt_with(lambda d: _truncate(d / "model.safetensors")),
        ),
        R(
            "ckpt-header-flipped",
            "checkpoints",
            "a flipped byte inside the safetensors header",
            lambda c, s: _grow(c, s),
            E.IncompatibleArtifactError,
            "model.safetensors",
            _ckpt_with(lambda d: _flip_header(d / "model.safetensors")),
        ),
        R(
            "ckpt-index-missing-shard",
            "checkpoints",
            "an index naming a shard that is not there",
            lambda c, s: _grow(c, s),
            E.IncompatibleArtifactError,
            "does not exist",
            _ckpt_with(lambda d: (_shard_ckpt(d), sorted(d.glob("*.safetensors"))[0].unlink())),
        ),
        R(
            "ckpt-index-traversal",
            "checkpoints",
            "an index pointing a tensor at `../outside.safetensors`",
            lambda c, s: _grow(c, s),
            E.UnsafePathError,
            "leaves the folder",
            _ckpt_with(_traversal_ckpt),
        ),
        R(
            "ckpt-index-not-json",
            "checkpoints",
            "an index that is not JSON",
            lambda c, s: _grow(c, s),
            E.IncompatibleArtifactError,
            "model.safetensors.index.json",
            _ckpt_with(lambda d: (_shard_ckpt(d), (d / "model.safetensors.index.json").write_text("{oops"))),
        ),
        R(
            "ckpt-config-not-json",
            "checkpoints",
            "a `config.json` that is not JSON",
            lambda c, s: _grow(c, s),
            E.IncompatibleArtifactError,
            "config.json",
            _ckpt_with(lambda d: (d / "config.json").write_text("{oops")),
        ),
        # --- introspection --------------------------------------------------------------------------
        R(
            "introspect-dense-model",
            "introspect",
            "`report(model)` on a model without MoE layers",
            lambda c, s: mi().report(c.models["plain"], c.ids),
            E.UnsupportedModuleError,
            "no MoE block",
        ),
        R(
            "introspect-missing-dir",
            "introspect",
            "`report('no/such/dir')`",
            lambda c, s: mi().report(c.scratch / "nope"),
            E.ArtifactNotFoundError,
            "not a checkpoint directory",
        ),
        R(
            "introspect-empty-dir",
            "introspect",
            "`report(dir)` of a folder without safetensors",
            lambda c, s: mi().report(s),
            E.ArtifactNotFoundError,
            "no *.safetensors files",
            lambda c: c.dir("empty"),
        ),
        R(
            "introspect-budget-zero",
            "introspect",
            "`report(ckpt, budget_mb=0)`",
            lambda c, s: mi().report(c.moe_ckpt, budget_mb=0, progress=False),
            E.ConfigError,
            "budget_mb",
        ),
        R(
            "introspect-budget-nan",
            "introspect",
            "`report(ckpt, budget_mb=nan)`",
            lambda c, s: mi().report(c.moe_ckpt, budget_mb=NAN, progress=False),
            E.ConfigError,
            "budget_mb",
        ),
        R(
            "introspect-reorder-negative",
            "introspect",
            "`report(ckpt, reorder_neurons=-5)`",
            lambda c, s: mi().report(c.moe_ckpt, reorder_neurons=-5, progress=False),
            E.ConfigError,
            "reorder_neurons",
        ),
        R(
            "introspect-layers-out-of-range",
            "introspect",
            "`report(ckpt, layers=[7])` on 3 MoE layers",
            lambda c, s: mi().report(c.moe_ckpt, layers=[7], progress=False),
            E.SelectorError,
            "layer index 7 is out of range",
        ),
        R(
            "introspect-inputs-on-dir",
            "introspect",
            "`report(ckpt_dir, inputs)` (inputs need a live model)",
            lambda c, s: mi().report(c.moe_ckpt, c.ids),
            E.ConfigError,
            "live model",
        ),
        R(
            "introspect-truncated-shard",
            "introspect",
            "`report` of a checkpoint with a truncated shard",
            lambda c, s: mi().report(s, progress=False),
            E.IncompatibleArtifactError,
            "not a readable safetensors file",
            _ckpt_with(lambda d: _truncate(_moe_shard(d)), "moe_ckpt"),
        ),
        R(
            "introspect-index-traversal",
            "introspect",
            "`report` of a checkpoint whose index leaves the folder",
            lambda c, s: mi().report(s, progress=False),
            E.UnsafePathError,
            "leaves the folder",
            _ckpt_with(_traversal_index, "moe_ckpt"),
        ),
        R(
            "introspect-routing-threshold",
            "introspect",
            "`routing(model, ids, threshold=nan)`",
            lambda c, s: mi().routing(c.models["moe"], c.ids, threshold=NAN),
            E.ConfigError,
            "threshold",
        ),
        R(
            "introspect-routing-chunk",
            "introspect",
            "`routing(model, ids, chunk_tokens=0)`",
            lambda c, s: mi().routing(c.models["moe"], c.ids, chunk_tokens=0),
            E.ConfigError,
            "chunk_tokens",
        ),
        R(
            "introspect-weights-dense",
            "introspect",
            "`weights(model)` of a dense model",
            lambda c, s: mi().weights(c.models["plain"]),
            E.UnsupportedModuleError,
            "no MoE block",
        ),
        R(
            "introspect-report-save-user-dir",
            "introspect",
            "`Report.save(dir)` into a folder of user files",
            lambda c, s: s.save(c.user),
            E.UnsafePathError,
            "notes.txt",
            lambda c: mi().report(c.moe_ckpt, progress=False, reorder_neurons=None),
        ),
        R(
            "introspect-report-load-missing",
            "introspect",
            "`Report.load(dir)` of a folder without a report",
            lambda c, s: mi().Report.load(s),
            E.IncompatibleArtifactError,
            "no report.json",
            lambda c: c.dir("empty"),
        ),
        # --- artefacts ----------------------------------------------------------------------------------
        R(
            "art-missing-dir",
            "artefacts",
            "`mt.load(model, 'no/such/dir')`",
            lambda c, s: mt.load(c.models["plain"], str(c.scratch / "nope" / "dir")),
            E.IncompatibleArtifactError,
            "nope",
        ),
        R(
            "art-empty-dir",
            "artefacts",
            "`mt.load(model, dir)` of an empty folder",
            lambda c, s: mt.load(c.models["plain"], s),
            E.IncompatibleArtifactError,
            "modulart_config.json is missing",
            lambda c: c.dir("empty"),
        ),
        R(
            "art-config-not-json",
            "artefacts",
            "`modulart_config.json` that is not JSON",
            lambda c, s: mt.load(c.models["plain"], s),
            E.IncompatibleArtifactError,
            "not valid JSON",
            _art_with("emoe", lambda d: _config_file(d).write_text("{oops")),
        ),
        R(
            "art-operator-main",
            "artefacts",
            '`"operator": "__main__"` in the config',
            lambda c, s: mt.load(c.models["plain"], s),
            E.OperatorNotFoundError,
            "__main__",
            _art_with("emoe", lambda d: _edit_json(_config_file(d), operator="__main__")),
        ),
        R(
            "art-operator-module-path",
            "artefacts",
            '`"operator": "os.path"` in the config',
            lambda c, s: mt.load(c.models["plain"], s),
            E.OperatorNotFoundError,
            "os.path",
            _art_with("emoe", lambda d: _edit_json(_config_file(d), operator="os.path")),
        ),
        R(
            "art-operator-unknown",
            "artefacts",
            '`"operator": "nope"` in the config',
            lambda c, s: mt.load(c.models["plain"], s),
            E.OperatorNotFoundError,
            "nope",
            _art_with("kv", lambda d: _edit_json(_config_file(d), operator="nope")),
        ),
        R(
            "art-wrong-model",
            "artefacts",
            "an EMoE artefact loaded onto another model (fingerprint)",
            lambda c, s: mt.load(c.models["llama"], c.art["emoe"]),
            E.IncompatibleArtifactError,
            "different model",
        ),
        R(
            "art-no-ffn-model",
            "artefacts",
            "a KV artefact loaded onto a model without FFNs",
            lambda c, s: mt.load(c.models["noffn"], c.art["kv"], check_fingerprint=False),
            E.UnsupportedModuleError,
            "no feed-forward block",
        ),
        R(
            "art-state-missing",
            "artefacts",
            "`modulart_state.safetensors` deleted",
            lambda c, s: mt.load(c.models["plain"], s),
            E.IncompatibleArtifactError,
            "incomplete",
            _art_with("kv", lambda d: _state_file(d).unlink()),
        ),
        R(
            "art-state-truncated",
            "artefacts",
            "a truncated state file",
            lambda c, s: mt.load(c.models["plain"], s),
            E.IncompatibleArtifactError,
            "not a readable safetensors file",
            _art_with("kv", lambda d: _truncate(_state_file(d))),
        ),
        R(
            "art-state-not-safetensors",
            "artefacts",
            "a state file that is text",
            lambda c, s: mt.load(c.models["plain"], s),
            E.IncompatibleArtifactError,
            "not a readable safetensors file",
            _art_with("emoe", lambda d: _state_file(d).write_text("hello")),
        ),
        R(
            "art-state-header-flipped",
            "artefacts",
            "a flipped byte in the state file's header",
            lambda c, s: mt.load(c.models["plain"], s),
            E.IncompatibleArtifactError,
            "modulart_state.safetensors",
            _art_with("emoe", lambda d: _flip_header(_state_file(d))),
        ),
        R(
            "art-state-data-flipped",
            "artefacts",
            "a flipped byte inside tensor data (KV LoRA)",
            lambda c, s: mt.load(c.models["plain"], s),
            E.IncompatibleArtifactError,
            "sha256",
            _art_with("kv", lambda d: _flip_byte(_state_file(d))),
        ),
        R(
            "art-state-data-flipped-emoe",
            "artefacts",
            "a flipped byte inside tensor data (EMoE)",
            lambda c, s: mt.load(c.models["plain"], s),
            E.IncompatibleArtifactError,
            "sha256",
            _art_with("emoe", lambda d: _flip_byte(_state_file(d))),
        ),
        R(
            "art-state-wrong-shape",
            "artefacts",
            "a state tensor with the wrong shape (EMoE)",
            lambda c, s: mt.load(c.models["plain"], s),
            E.IncompatibleArtifactError,
            "modulart_config.json says",
            _art_with("emoe", _reshape_state),
        ),
        R(
            "art-state-wrong-shape-kv",
            "artefacts",
            "a state tensor with the wrong shape (KV)",
            lambda c, s: mt.load(c.models["plain"], s),
            E.IncompatibleArtifactError,
            "modulart_config.json says",
            _art_with("kv", _reshape_state),
        ),
        R(
            "art-state-missing-key",
            "artefacts",
            "a state tensor removed (KV)",
            lambda c, s: mt.load(c.models["plain"], s),
            E.IncompatibleArtifactError,
            "missing",
            _art_with("kv", _drop_state_key),
        ),
        R(
            "art-state-wrong-dtype",
            "artefacts",
            "a state tensor saved as float16 (EMoE)",
            lambda c, s: mt.load(c.models["plain"], s),
            E.IncompatibleArtifactError,
            "float16",
            _art_with("emoe", _retype_state),
        ),
        R(
            "art-config-bad-value",
            "artefacts",
            "`num_experts: 0` written into the config",
            lambda c, s: mt.load(c.models["plain"], s),
            E.ConfigError,
            "num_experts",
            _art_with("emoe", lambda d: _edit_json(_config_file(d), config__num_experts=0)),
        ),
        R(
            "art-config-newer",
            "artefacts",
            "a config schema version from the future",
            lambda c, s: mt.load(c.models["plain"], s),
            E.IncompatibleArtifactError,
            "version 99",
            _art_with("migu", lambda d: _edit_json(_config_file(d), config__version=99)),
        ),
        R(
            "art-save-user-dir",
            "artefacts",
            "`handle.save(dir)` into a folder of user files",
            lambda c, s: s.save(c.user),
            E.UnsafePathError,
            "notes.txt",
            _applied(_emoe_h),
        ),
        R(
            "art-save-onto-file",
            "artefacts",
            "`handle.save(path)` where path is a file",
            lambda c, s: s.save(c.user / "notes.txt"),
            E.UnsafePathError,
            "not a directory",
            _applied(_emoe_h),
        ),
        R(
            "art-save-over-report",
            "artefacts",
            "`handle.save(dir)` over an introspection report folder (another kind of output)",
            lambda c, s: s[0].save(s[1]),
            E.UnsafePathError,
            "holds a modulart report output",
            lambda c: (_kv_h(c.fresh("plain"), mode="lora"), _saved_report(c)),
        ),
        R(
            "introspect-report-save-over-artefact",
            "introspect",
            "`Report.save(dir)` over an operator artefact (another kind of output)",
            lambda c, s: s[0].save(s[1]),
            E.UnsafePathError,
            "holds a modulart artifact output",
            lambda c: (mi().report(c.moe_ckpt, progress=False, reorder_neurons=None), c.copy_artifact("emoe")),
        ),
        R(
            "art-load-not-module",
            "artefacts",
            "`mt.load('model', dir)` (not an nn.Module)",
            lambda c, s: mt.load("model", c.art["emoe"]),
            E.UnsupportedModuleError,
            "nn.Module",
        ),
        R(
            "art-apply-not-module",
            "artefacts",
            "`mt.apply(42, EMoEConfig())`",
            lambda c, s: mt.apply(42, mt.emoe.EMoEConfig()),
            E.UnsupportedModuleError,
            "nn.Module",
        ),
        R(
            "art-apply-not-config",
            "artefacts",
            "`mt.apply(model, {'num_experts': 4})` (a dict, no operator)",
            lambda c, s: mt.apply(c.models["plain"], {"num_experts": 4}),
            E.ConfigError,
            "OperatorConfig",
        ),
        R(
            "art-save-path-int",
            "artefacts",
            "`handle.save(123)` (not a path)",
            lambda c, s: s.save(123),
            E.InvalidArgumentError,
            "expected a folder path",
            _applied(_emoe_h),
        ),
        R(
            "art-load-path-int",
            "artefacts",
            "`mt.load(model, 123)` (not a path)",
            lambda c, s: mt.load(c.models["plain"], 123),
            E.InvalidArgumentError,
            "expected a folder path",
        ),
        R(
            "art-fingerprint-str",
            "artefacts",
            "`mt.fingerprint('model')` (neither a model nor a state dict)",
            lambda c, s: mt.fingerprint("model"),
            E.InvalidArgumentError,
            "nn.Module or a state dict",
        ),
        R(
            "art-config-from-json-garbage",
            "artefacts",
            "`EMoEConfig.from_json('{oops')`",
            lambda c, s: mt.emoe.EMoEConfig.from_json("{oops"),
            E.ConfigError,
            "not valid JSON",
        ),
        R(
            "art-config-from-dict-list",
            "artefacts",
            "`EMoEConfig.from_dict([1, 2])`",
            lambda c, s: mt.emoe.EMoEConfig.from_dict([1, 2]),
            E.ConfigError,
            "expected a mapping",
        ),
        R(
            "art-config-json-list",
            "artefacts",
            "an artefact whose `config` is a JSON list",
            lambda c, s: mt.load(c.models["plain"], s),
            E.IncompatibleArtifactError,
            "must be an object",
            _art_with("emoe", lambda d: _edit_json(_config_file(d), config=[1, 2])),
        ),
        R(
            "migu-token-mask-wrong-type",
            "migu",
            "`set_token_mask('all')`",
            lambda c, s: s.set_token_mask("all"),
            E.InvalidArgumentError,
            "set_token_mask",
            _applied(_migu_h),
        ),
        R(
            "grow-optimizer-not-optimizer",
            "stacking",
            "`grow_optimizer('adam', small, big, plan)`",
            lambda c, s: st().grow_optimizer("adam", c.models["plain"], c.models["plain"], st().LayerPlan.stack(3, 1)),
            E.InvalidArgumentError,
            "torch.optim.Optimizer",
        ),
        R(
            "emoe-to-dense-after-remove",
            "emoe",
            "`to_dense()` after `remove()`",
            lambda c, s: s.to_dense(),
            E.UnsupportedOperationError,
            "was removed",
            _applied(_emoe_h, remove=True),
        ),
        R(
            "emoe-disable-after-remove",
            "emoe",
            "`disable()` after `remove()`",
            lambda c, s: s.disable(),
            E.UnsupportedOperationError,
            "was removed",
            _applied(_emoe_h, remove=True),
        ),
        R(
            "emoe-disabled-after-remove",
            "emoe",
            "`with handle.disabled():` after `remove()`",
            lambda c, s: s.disabled().__enter__(),
            E.UnsupportedOperationError,
            "was removed",
            _applied(_emoe_h, remove=True),
        ),
        R(
            "emoe-grow-while-live",
            "stacking",
            "`grow(model, 2)` while an EMoE handle is live on the model",
            lambda c, s: st().grow(s.model, 2),
            E.CompositionError,
            "live hooks",
            _applied(_emoe_h),
        ),
        R(
            "patcher-bake-after-remove",
            "patcher",
            "`bake()` after `remove()`",
            lambda c, s: s.bake(),
            E.UnsupportedOperationError,
            "was removed",
            _applied(_patch_h, remove=True),
        ),
        R(
            "patcher-memory-after-remove",
            "patcher",
            "`set_memory(...)` after `remove()`",
            lambda c, s: s.set_memory(c.ids),
            E.UnsupportedOperationError,
            "was removed",
            _applied(_patch_h, remove=True),
        ),
        R(
            "patcher-bake-twice",
            "patcher",
            "`bake()` on a handle that is already baked",
            lambda c, s: s.bake(),
            E.UnsupportedOperationError,
            "unbake() first",
            lambda c: _baked(c),
        ),
        R(
            "patcher-edit-while-baked",
            "patcher",
            "`edit(...)` while the patches are baked",
            lambda c, s: s.edit(c.ids[0], torch.tensor([1])),
            E.UnsupportedOperationError,
            "unbake() first",
            lambda c: _baked(c),
        ),
        R(
            "kv-load-state-after-remove",
            "kv",
            "`load_state_dict(...)` after `remove()`",
            lambda c, s: s.load_state_dict({}),
            E.UnsupportedOperationError,
            "was removed",
            _applied(lambda m: _kv_h(m, mode="lora"), remove=True),
        ),
        R(
            "migu-mask-after-remove",
            "migu",
            "`mask_()` after `remove()`",
            lambda c, s: s.mask_(),
            E.UnsupportedOperationError,
            "was removed",
            _applied(_migu_h, remove=True),
        ),
        R(
            "migu-merge-after-remove",
            "migu",
            "`merge_()` after `remove()`",
            lambda c, s: s.merge_(),
            E.UnsupportedOperationError,
            "was removed",
            _applied(_migu_h, remove=True),
        ),
        R(
            "migu-attach-twice",
            "migu",
            "`attach(opt)` on a handle that already has an optimizer",
            lambda c, s: s.attach(torch.optim.SGD(s.model.parameters(), lr=0.1)),
            E.UnsupportedOperationError,
            "already has an optimizer",
            _applied(_migu_h),
        ),
        R(
            "migu-mask-without-optimizer",
            "migu",
            "`mask_()` with no optimizer attached",
            lambda c, s: s.mask_(),
            E.UnsupportedOperationError,
            "no optimizer",
            _applied(lambda m: mt.migu.apply(m)),
        ),
        R(
            "emoe-nan-weight-random-split",
            "emoe",
            "a NaN in the FFN keys before `apply(split='random')`",
            lambda c, s: mt.emoe.apply(s, num_experts=4, top_k=2, layers="all", split="random"),
            E.NonFiniteError,
            "blocks.2.mlp",
            _fresh_poisoned("plain", NAN),
        ),
    ]
    return rows


def _saved_report(ctx: Ctx) -> Path:
    d = ctx.dir("report")
    _mi().report(ctx.moe_ckpt, progress=False, reorder_neurons=None).save(d)
    return d


def _baked(ctx: Ctx) -> Any:
    h = _with_memory(_patch_h(ctx.fresh("plain")), ctx)
    h.bake()
    return h


def _flip_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    i = data.index(b'"dtype"') + 2
    data[i] ^= 0x20
    path.write_bytes(bytes(data))


ROWS: list[Row] = _rows()


def _cli(*argv: str) -> Callable[[Ctx], list[str]]:
    return lambda ctx: [a.format(ctx=ctx) for a in argv]


def _corrupt(which: str, fn: Callable[[Path], None]) -> Callable[[Ctx], str]:
    def make(ctx: Ctx) -> str:
        d = ctx.copy_ckpt(which)
        fn(d)
        return str(d)

    return make


def _cli_with(src: Callable[[Ctx], str], *rest: str) -> Callable[[Ctx], list[str]]:
    def argv(ctx: Ctx) -> list[str]:
        return [rest[0], src(ctx), *(a.format(ctx=ctx) for a in rest[1:])]

    return argv


def _empty_dir(ctx: Ctx) -> str:
    return str(ctx.dir("empty"))


NOT_CACHED = "modulart-tests/no-such-model"  # a Hub repo id that no cache holds


def _flat_safetensors(ctx: Ctx) -> str:
    """A safetensors file whose tensors form no block list (``blocks.<i>.…``)."""
    from safetensors.torch import save_file

    f = ctx.dir("flat") / "flat.safetensors"
    save_file({"embed.weight": torch.zeros(4, 2), "head.weight": torch.zeros(2, 4)}, str(f))
    return str(f)


def _bench_dir(ctx: Ctx) -> str:
    """A benchmarks folder with one script, ``one.py``, that has no ``--quick`` mode."""
    d = ctx.dir("benchmarks")
    (d / "one.py").write_text('if __name__ == "__main__":\n    print("one")\n')
    return str(d)


def _bench_with_foreign_md(ctx: Ctx) -> list[str]:
    d = _bench_dir(ctx)
    out = ctx.dir("bench-out")
    (out / "bench.md").write_text("my own notes\n")
    return ["bench", "--dir", d, "--out", str(out)]


CLI_ROWS: list[CliRow] = [
    CliRow(
        "cli-inspect-empty-dir",
        "`modulart inspect DIR` of a folder without safetensors files",
        _cli_with(_empty_dir, "inspect", "--out", "{ctx.scratch}/never"),
        2,
        "no *.safetensors files",
    ),
    CliRow(
        "cli-inspect-truncated",
        "`modulart inspect CKPT` with a truncated shard",
        _cli_with(_corrupt("moe_ckpt", lambda d: _truncate(_moe_shard(d))), "inspect", "--out", "{ctx.scratch}/never"),
        1,
        "not a readable safetensors file",
    ),
    CliRow(
        "cli-inspect-index-traversal",
        "`modulart inspect CKPT` whose index points outside the folder",
        _cli_with(_corrupt("moe_ckpt", _traversal_index), "inspect", "--out", "{ctx.scratch}/never"),
        1,
        "leaves the folder",
    ),
    CliRow(
        "cli-inspect-index-not-json",
        "`modulart inspect CKPT` whose index is not JSON",
        _cli_with(
            _corrupt("moe_ckpt", lambda d: (d / "model.safetensors.index.json").write_text("{oops")),
            "inspect",
            "--out",
            "{ctx.scratch}/never",
        ),
        1,
        "model.safetensors.index.json",
    ),
    CliRow(
        "cli-inspect-file",
        "`modulart inspect FILE` (a file, not a checkpoint directory)",
        _cli("inspect", "{ctx.user}/notes.txt"),
        2,
        "not a checkpoint directory",
    ),
    CliRow(
        "cli-grow-truncated",
        "`modulart grow CKPT OUT --factor 2` with a truncated `model.safetensors`",
        _cli_with(
            _corrupt("ckpt", lambda d: _truncate(d / "model.safetensors")),
            "grow",
            "{ctx.scratch}/never",
            "--factor",
            "2",
        ),
        1,
        "truncated",
    ),
    CliRow(
        "cli-grow-not-safetensors",
        "`modulart grow CKPT OUT --factor 2` where `model.safetensors` is text",
        _cli_with(
            _corrupt("ckpt", lambda d: (d / "model.safetensors").write_text("not a safetensors file")),
            "grow",
            "{ctx.scratch}/never",
            "--factor",
            "2",
        ),
        1,
        "model.safetensors",
    ),
    CliRow(
        "cli-grow-index-traversal",
        "`modulart grow CKPT OUT --factor 2` whose index points outside the folder",
        _cli_with(_corrupt("ckpt", _traversal_ckpt), "grow", "{ctx.scratch}/never", "--factor", "2"),
        1,
        "leaves the folder",
    ),
    CliRow(
        "cli-grow-no-blocks",
        "`modulart grow CKPT OUT --factor 2 --blocks nothing.here`",
        _cli("grow", "{ctx.ckpt}", "{ctx.scratch}/never", "--factor", "2", "--blocks", "nothing.here"),
        2,
        "--blocks 'nothing.here'",
    ),
    CliRow("cli-no-command", "`modulart` with no command", _cli(), 2, "required"),
    CliRow("cli-unknown-command", "`modulart frobnicate`", _cli("frobnicate"), 2, "invalid choice"),
    CliRow(
        "cli-inspect-missing",
        "`modulart inspect no/such/dir`",
        _cli("inspect", "{ctx.scratch}/nope"),
        2,
        "no such file or directory",
    ),
    CliRow(
        "cli-inspect-budget-negative",
        "`modulart inspect CKPT --budget-mb -1`",
        _cli("inspect", "{ctx.moe_ckpt}", "--budget-mb", "-1"),
        2,
        "--budget-mb",
    ),
    CliRow(
        "cli-inspect-budget-zero",
        "`modulart inspect CKPT --budget-mb 0`",
        _cli("inspect", "{ctx.moe_ckpt}", "--budget-mb", "0"),
        2,
        "--budget-mb",
    ),
    CliRow(
        "cli-inspect-budget-nan",
        "`modulart inspect CKPT --budget-mb nan`",
        _cli("inspect", "{ctx.moe_ckpt}", "--budget-mb", "nan"),
        2,
        "--budget-mb",
    ),
    CliRow(
        "cli-inspect-reorder-negative",
        "`modulart inspect CKPT --reorder-neurons -5`",
        _cli("inspect", "{ctx.moe_ckpt}", "--reorder-neurons", "-5"),
        2,
        "--reorder-neurons",
    ),
    CliRow(
        "cli-inspect-reorder-text",
        "`modulart inspect CKPT --reorder-neurons many`",
        _cli("inspect", "{ctx.moe_ckpt}", "--reorder-neurons", "many"),
        2,
        "--reorder-neurons",
    ),
    CliRow(
        "cli-inspect-layers",
        "`modulart inspect CKPT --layers 7` (3 MoE layers)",
        _cli("inspect", "{ctx.moe_ckpt}", "--layers", "7", "--out", "{ctx.scratch}/never"),
        2,
        "layer index 7 is out of range",
    ),
    CliRow(
        "cli-inspect-out-user-dir",
        "`modulart inspect CKPT --out DIR` with DIR holding user files",
        _cli("inspect", "{ctx.moe_ckpt}", "--out", "{ctx.user}", "--no-plots"),
        2,
        "notes.txt",
    ),
    CliRow(
        "cli-inspect-out-is-ckpt",
        "`modulart inspect CKPT --out CKPT`",
        _cli("inspect", "{ctx.moe_ckpt}", "--out", "{ctx.moe_ckpt}", "--no-plots"),
        2,
        "inside it, or contains it",
    ),
    CliRow(
        "cli-inspect-out-inside-ckpt",
        "`modulart inspect CKPT --out CKPT/sub` (the report would land inside the checkpoint)",
        _cli("inspect", "{ctx.moe_ckpt}", "--out", "{ctx.moe_ckpt}/report", "--no-plots"),
        2,
        "inside it, or contains it",
    ),
    CliRow(
        "cli-inspect-dense",
        "`modulart inspect DENSE_CKPT` (no MoE layers)",
        _cli("inspect", "{ctx.ckpt}", "--out", "{ctx.scratch}/never"),
        1,
        "no MoE block",
    ),
    CliRow(
        "cli-grow-missing",
        "`modulart grow no/such/dir OUT --factor 2`",
        _cli("grow", "{ctx.scratch}/nope", "{ctx.scratch}/never", "--factor", "2"),
        2,
        "nope",
    ),
    CliRow(
        "cli-grow-factor-zero",
        "`modulart grow CKPT OUT --factor 0`",
        _cli("grow", "{ctx.ckpt}", "{ctx.scratch}/never", "--factor", "0"),
        2,
        "--factor",
    ),
    CliRow(
        "cli-grow-factor-negative",
        "`modulart grow CKPT OUT --factor -2`",
        _cli("grow", "{ctx.ckpt}", "{ctx.scratch}/never", "--factor", "-2"),
        2,
        "--factor",
    ),
    CliRow(
        "cli-grow-interleave-zero",
        "`modulart grow CKPT OUT --interleave 0`",
        _cli("grow", "{ctx.ckpt}", "{ctx.scratch}/never", "--interleave", "0"),
        2,
        "--interleave",
    ),
    CliRow(
        "cli-grow-dus-negative",
        "`modulart grow CKPT OUT --dus -1`",
        _cli("grow", "{ctx.ckpt}", "{ctx.scratch}/never", "--dus", "-1"),
        2,
        "--dus",
    ),
    CliRow(
        "cli-grow-plan-garbage",
        "`modulart grow CKPT OUT --plan 0-x`",
        _cli("grow", "{ctx.ckpt}", "{ctx.scratch}/never", "--plan", "0-x"),
        2,
        "0-x",
    ),
    CliRow(
        "cli-grow-shard-size",
        "`modulart grow CKPT OUT --factor 2 --max-shard-size huge`",
        _cli("grow", "{ctx.ckpt}", "{ctx.scratch}/never", "--factor", "2", "--max-shard-size", "huge"),
        2,
        "--max-shard-size 'huge'",
    ),
    CliRow(
        "cli-grow-into-source",
        "`modulart grow CKPT CKPT/big --factor 2`",
        _cli("grow", "{ctx.ckpt}", "{ctx.ckpt}/big", "--factor", "2"),
        2,
        "inside it",
    ),
    CliRow(
        "cli-grow-over-user-dir",
        "`modulart grow CKPT DIR --factor 2 --overwrite`, DIR holds user files",
        _cli("grow", "{ctx.ckpt}", "{ctx.user}", "--factor", "2", "--overwrite"),
        2,
        "notes.txt",
    ),
    CliRow(
        "cli-grow-exists",
        "`modulart grow CKPT DIR --factor 2` with DIR existing",
        _cli("grow", "{ctx.ckpt}", "{ctx.user}", "--factor", "2"),
        2,
        "pass --overwrite",
    ),
    CliRow(
        "cli-grow-operator",
        "`modulart grow CKPT OUT --factor 2 --operator learn`",
        _cli("grow", "{ctx.ckpt}", "{ctx.scratch}/never", "--factor", "2", "--operator", "learn"),
        2,
        "invalid choice",
    ),
    CliRow(
        "cli-grow-empty-dir",
        "`modulart grow DIR OUT --factor 2` of a folder without safetensors files",
        _cli_with(_empty_dir, "grow", "{ctx.scratch}/never", "--factor", "2"),
        2,
        "is not a checkpoint: no model.safetensors.index.json",
    ),
    CliRow(
        "cli-grow-no-block-list",
        "`modulart grow FILE OUT --factor 2`, a safetensors file without numbered blocks",
        _cli_with(_flat_safetensors, "grow", "{ctx.scratch}/never", "--factor", "2"),
        1,
        "found no block list",
    ),
    CliRow(
        "cli-grow-plan-range",
        "`modulart grow CKPT OUT --plan 0-2` (2 layers)",
        _cli("grow", "{ctx.ckpt}", "{ctx.scratch}/never", "--plan", "0-2"),
        2,
        "--plan '0-2': position 2 names layer 2",
    ),
    CliRow(
        "cli-grow-dus-large",
        "`modulart grow CKPT OUT --dus 5` (2 layers)",
        _cli("grow", "{ctx.ckpt}", "{ctx.scratch}/never", "--dus", "5"),
        2,
        "--dus 5: must lie in [0, 2)",
    ),
    CliRow(
        "cli-grow-hub-missing",
        "`modulart grow org/name OUT --factor 2`, a Hub repo id not in the local cache",
        _cli("grow", NOT_CACHED, "{ctx.scratch}/never", "--factor", "2"),
        2,
        "in the local Hugging Face cache",
    ),
    CliRow(
        "cli-inspect-layers-garbage",
        "`modulart inspect CKPT --layers foo`",
        _cli("inspect", "{ctx.moe_ckpt}", "--layers", "foo", "--out", "{ctx.scratch}/never"),
        2,
        "--layers 'foo'",
    ),
    CliRow(
        "cli-inspect-dense-missing",
        "`modulart inspect CKPT --dense no/such/dir`",
        _cli("inspect", "{ctx.moe_ckpt}", "--dense", "{ctx.scratch}/nope", "--out", "{ctx.scratch}/never"),
        2,
        "--dense",
    ),
    CliRow(
        "cli-inspect-hub-missing",
        "`modulart inspect org/name`, a Hub repo id not in the local cache",
        _cli("inspect", NOT_CACHED, "--out", "{ctx.scratch}/never"),
        2,
        "in the local Hugging Face cache",
    ),
    CliRow(
        "cli-emoe-hub-missing",
        "`modulart emoe org/name OUT`, a Hub repo id not in the local cache",
        _cli("emoe", NOT_CACHED, "{ctx.scratch}/never"),
        2,
        "in the local Hugging Face cache",
    ),
    CliRow(
        "cli-emoe-missing",
        "`modulart emoe no/such/dir OUT`",
        _cli("emoe", "{ctx.scratch}/nope", "{ctx.scratch}/never"),
        2,
        "no such file or directory",
    ),
    CliRow(
        "cli-emoe-file",
        "`modulart emoe FILE OUT` (a file, not a model folder)",
        _cli("emoe", "{ctx.user}/notes.txt", "{ctx.scratch}/never"),
        2,
        "is not a folder",
    ),
    CliRow(
        "cli-emoe-no-config",
        "`modulart emoe DIR OUT` of a folder without `config.json`",
        _cli_with(_empty_dir, "emoe", "{ctx.scratch}/never"),
        2,
        "has no config.json",
    ),
    CliRow(
        "cli-emoe-bad-weights",
        "`modulart emoe CKPT OUT` with a truncated `model.safetensors`",
        _cli_with(_corrupt("ckpt", lambda d: _truncate(d / "model.safetensors")), "emoe", "{ctx.scratch}/never"),
        1,
        "transformers cannot load it",
    ),
    CliRow(
        "cli-emoe-experts-zero",
        "`modulart emoe CKPT OUT --experts 0`",
        _cli("emoe", "{ctx.ckpt}", "{ctx.scratch}/never", "--experts", "0"),
        2,
        "--experts: must be an integer >= 1",
    ),
    CliRow(
        "cli-emoe-top-k",
        "`modulart emoe CKPT OUT --experts 4 --top-k 8`",
        _cli("emoe", "{ctx.ckpt}", "{ctx.scratch}/never", "--experts", "4", "--top-k", "8"),
        2,
        "--top-k 8: must satisfy 1 <= --top-k <= --experts (4)",
    ),
    CliRow(
        "cli-emoe-router",
        "`modulart emoe CKPT OUT --router nope`",
        _cli("emoe", "{ctx.ckpt}", "{ctx.scratch}/never", "--router", "nope"),
        2,
        "--router 'nope'",
    ),
    CliRow(
        "cli-emoe-layers",
        "`modulart emoe CKPT OUT --layers 9` (2 layers)",
        _cli("emoe", "{ctx.ckpt}", "{ctx.scratch}/never", "--experts", "4", "--top-k", "2", "--layers", "9"),
        2,
        "--layers '9': layer index 9 is out of range",
    ),
    CliRow(
        "cli-emoe-into-source",
        "`modulart emoe CKPT CKPT/emoe`",
        _cli("emoe", "{ctx.ckpt}", "{ctx.ckpt}/emoe"),
        2,
        "inside it",
    ),
    CliRow(
        "cli-emoe-user-dir",
        "`modulart emoe CKPT DIR` with DIR holding user files",
        _cli("emoe", "{ctx.ckpt}", "{ctx.user}"),
        2,
        "pass --overwrite",
    ),
    CliRow(
        "cli-bench-no-dir",
        "`modulart bench` where there is no benchmarks folder (e.g. a wheel install)",
        _cli("bench", "--dir", "{ctx.scratch}/nope"),
        2,
        "not in the wheel",
    ),
    CliRow(
        "cli-bench-empty-dir",
        "`modulart bench --dir DIR` of a folder without benchmark scripts",
        lambda ctx: ["bench", "--dir", _empty_dir(ctx)],
        2,
        "no benchmark scripts",
    ),
    CliRow(
        "cli-bench-unknown",
        "`modulart bench nope`",
        lambda ctx: ["bench", "nope", "--dir", _bench_dir(ctx)],
        2,
        "NAME 'nope': no such benchmark; found ['one']",
    ),
    CliRow(
        "cli-bench-no-quick",
        "`modulart bench one --quick`, a benchmark without a --quick mode",
        lambda ctx: ["bench", "one", "--quick", "--dir", _bench_dir(ctx)],
        2,
        "has no --quick mode",
    ),
    CliRow(
        "cli-bench-timeout",
        "`modulart bench --timeout 0`",
        _cli("bench", "--timeout", "0"),
        2,
        "--timeout: must be a finite number > 0",
    ),
    CliRow(
        "cli-bench-foreign-output",
        "`modulart bench --out DIR` with a `bench.md` that bench did not write",
        _bench_with_foreign_md,
        2,
        "not written by modulart bench; pass --overwrite",
    ),
]

# rows that wait for other work on issue 13 (not run by the test yet); empty when all landed
PENDING: list[str] = []
CLI_PENDING: list[str] = []

__all__ = [
    "CLI_ROWS",
    "INF",
    "NAN",
    "PENDING",
    "ROWS",
    "CliRow",
    "Ctx",
    "Row",
    "assert_unchanged",
    "shared_ctx",
    "snapshot",
]
