"""modulart.stacking.grow_checkpoint: streaming growth of checkpoints on disk."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import modulart.stacking as st
from families import build
from modulart.core.errors import ConfigError, IncompatibleArtifactError
from modulart.stacking import sfio


def _load_dir(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = build("llama").model
    model.config.layer_types = ["full_attention", "full_attention"]
    d = tmp_path_factory.mktemp("small")
    model.save_pretrained(d, max_shard_size="20KB")
    (d / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (d / "generation_config.json").write_text('{"do_sample": false}')
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("*.safetensors"))) > 2
    return model, d


@pytest.mark.parametrize("operator", ["direct", "zero"])
def test_checkpoint_growth_equals_in_memory_growth(
    llama_ckpt: tuple[torch.nn.Module, Path], tmp_path: Path, operator: str
) -> None:
    model, src = llama_ckpt
    plan = st.LayerPlan.stack(2, 3)
    out = st.grow_checkpoint(src, tmp_path / "big", plan, operator=operator, max_shard_size="30KB", progress=False)
    got = _load_dir(out)
    want = st.grow(model, plan, operator=operator).state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    # shards are capped, the index maps every tensor to the shard holding it
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for name, fname in index["weight_map"].items():
        assert name in load_file(str(out / fname))
    largest_tensor = max(v.numel() * v.element_size() for v in want.values())
    for f in out.glob("*.safetensors"):
        data = sum(e.nbytes for e in sfio.SafetensorsFile(f).entries.values())
        assert data <= max(30_000, largest_tensor)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in want.values())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6 and cfg["layer_types"] == ["full_attention"] * 6
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
    assert (out / "generation_config.json").is_file()
    manifest = json.loads((out / st.MANIFEST_NAME).read_text())
    assert manifest["plan"]["indices"] == list(plan) and manifest["operator"] == operator
    assert manifest["blocks"] == "model.layers" and len(manifest["source_hash"]) == 32
    # the grown checkpoint loads with transformers and computes what the in-memory grown model does
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.randint(1, 100, (1, 6))
    with torch.no_grad():
        a = loaded(input_ids=ids).logits
        b = st.grow(model, plan, operator=operator).eval()(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-6)


def test_source_hash_tracks_content(llama_ckpt: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    model, src = llama_ckpt
    a = st.grow_checkpoint(src, tmp_path / "a", 2, progress=False)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "same.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"][0, 0] += 1
    save_file(sd, str(tmp_path / "changed.safetensors"))
    b = st.grow_checkpoint(tmp_path / "same.safetensors", tmp_path / "b", 2, progress=False)
    c = st.grow_checkpoint(tmp_path / "changed.safetensors", tmp_path / "c", 2, progress=False)
    h = [json.loads((d / st.MANIFEST_NAME).read_text())["source_hash"] for d in (a, b, c)]
    assert h[0] == h[1] != h[2]


def test_plain_safetensors_and_litgpt_pth(tmp_path: Path) -> None:
    model = build("plain").model
    sd = model.state_dict()
    plan = st.LayerPlan.interleave(3, 2)
    want = st.grow(model, plan).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "plain.safetensors"))
    torch.save({"model": sd, "optimizer": {}}, tmp_path / "lit.pth")
    for name in ("plain.safetensors", "lit.pth"):
        out = st.grow_checkpoint(tmp_path / name, tmp_path / f"out-{name}", plan, progress=False)
        got = load_file(str(out / "model.safetensors"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert not (out / "model.safetensors.index.json").exists()


def test_interrupted_growth_leaves_no_output(
    llama_ckpt: tuple[torch.nn.Module, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, src = llama_ckpt
    calls = {"n": 0}
    real = sfio.SafetensorsFile.copy_to

    def flaky(self: sfio.SafetensorsFile, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sfio.SafetensorsFile, "copy_to", flaky)
    with pytest.raises(KeyboardInterrupt):
        st.grow_checkpoint(src, tmp_path / "big", 2, progress=False)
    assert calls["n"] == 5
    assert list(tmp_path.iterdir()) == []


def _write(tmp: Path, tensors: dict[str, torch.Tensor]) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "model.safetensors"))
    return tmp


def test_bad_inputs_raise_before_writing(llama_ckpt: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    _, src = llama_ckpt
    dst = tmp_path / "out"
    with pytest.raises(ConfigError, match="written for a 4-layer source but the checkpoint"):
        st.grow_checkpoint(src, dst, st.LayerPlan.stack(4, 2), progress=False)
    with pytest.raises(ConfigError, match="checkpoint growth supports 'direct' and 'zero'"):
        st.grow_checkpoint(src, dst, 2, operator="random", progress=False)
    # a missing tensor in one layer
    ok = {"emb": torch.ones(2), "layers.0.a": torch.ones(2), "layers.0.b": torch.ones(2), "layers.1.a": torch.ones(2)}
    with pytest.raises(ConfigError, match=r"tensor layers\.1\.b is missing"):
        st.grow_checkpoint(_write(tmp_path / "m", ok), dst, 2, progress=False)
    # an index naming a tensor its shard does not hold
    d = _write(tmp_path / "idx", {"layers.0.a": torch.ones(2)})
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"layers.0.a": "model.safetensors", "layers.0.z": "model.safetensors"}})
    )
    with pytest.raises(IncompatibleArtifactError, match=r"missing tensors listed in the index: \['layers.0.z'\]"):
        st.grow_checkpoint(d, dst, 2, progress=False)
    # a truncated shard
    t = _write(tmp_path / "trunc", {"layers.0.a": torch.ones(100), "layers.1.a": torch.ones(100)})
    raw = (t / "model.safetensors").read_bytes()
    (t / "model.safetensors").write_bytes(raw[:-40])
    with pytest.raises(IncompatibleArtifactError, match=r"truncated: tensor 'layers\.1\.a'"):
        st.grow_checkpoint(t, dst, 2, progress=False)
    # existing output
    dst.mkdir()
    with pytest.raises(ConfigError, match="exists; pass overwrite=True"):
        st.grow_checkpoint(src, dst, 2, progress=False)
    assert list(dst.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "m", "out", "trunc"]


def test_header_layout_is_valid_safetensors(tmp_path: Path) -> None:
    raw = sfio.header_bytes([("a", "F32", (2,), 8), ("b", "BF16", (3,), 6)], {"format": "pt"})
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and len(raw) == 8 + n
    f = tmp_path / "x.safetensors"
    f.write_bytes(
        raw
        + torch.tensor([1.0, 2.0]).numpy().tobytes()
        + torch.ones(3, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    )
    got = load_file(str(f))
    assert got["a"].tolist() == [1.0, 2.0] and got["b"].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match="max_shard_size = '2 parsecs'"):
        sfio.parse_size("2 parsecs")
