"""The ``modulart`` command line: every command's ``--help``, one exit status per kind of failure
across commands, Hub repo ids resolved offline from a (fake) local cache, ``emoe`` and ``bench``."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import modulart as mt
from families import tiny_llama
from introspect_models import per_expert_keys, save_sharded, tiny_mixtral
from modulart.cli import EXIT_CODES, main

COMMANDS = ["tour", "inspect", "grow", "emoe", "bench", "operators", "version"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A dense HF checkpoint (a tiny Llama), a MoE checkpoint, and a fake Hub cache holding both."""
    root = tmp_path_factory.mktemp("cli")
    llama = root / "llama"
    tiny_llama().save_pretrained(llama)
    moe = save_sharded(per_expert_keys(tiny_mixtral(), "qwen"), root / "moe")
    cache = root / "hub"
    _cache(cache, "org/tiny-llama", llama, "1111aaaa" * 5)
    _cache(cache, "org/tiny-moe", moe, "2222bbbb" * 5)
    user = root / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine\n")
    return {"llama": llama, "moe": moe, "cache": cache, "user": user, "root": root}


def _cache(cache: Path, repo: str, src: Path, revision: str) -> Path:
    """Lay ``src`` out as the Hugging Face cache does: blobs by hash, snapshot symlinks, refs/main."""
    base = cache / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / revision
    for d in (base / "blobs", base / "refs", snap):
        d.mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(revision)
    for f in sorted(src.iterdir()):
        blob = base / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return snap


def _err_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("modulart: error: "), err
    assert "Traceback" not in err
    return lines[0]


# --- --help, version, operators -----------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: modulart {command}")
    assert "-h, --help" in out


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = re.search(r"\{([a-z,]+)\}", out)
    assert listed is not None and sorted(listed.group(1).split(",")) == sorted(COMMANDS)


def test_version_and_operators(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"modulart {mt.__version__}"
    assert main(["operators"]) == 0
    names = capsys.readouterr().out.split()
    assert {"emoe", "kv", "migu", "patcher"} <= set(names)


def test_exit_codes_are_the_documented_three() -> None:
    assert sorted(EXIT_CODES) == [0, 1, 2, 130]


# --- one status per kind of failure, whatever the command -----------------------------------------
def _truncated(files: dict[str, Path], which: str, tmp: Path) -> Path:
    d = tmp / f"bad-{which}"
    shutil.copytree(files[which], d)
    shard = sorted(d.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    return d


KINDS = {
    # kind of failure: (status, {command: argv})
    "missing input": (
        2,
        {
            "grow": ["grow", "{tmp}/nope", "{tmp}/out", "--factor", "2"],
            "inspect": ["inspect", "{tmp}/nope", "--out", "{tmp}/out"],
            "emoe": ["emoe", "{tmp}/nope", "{tmp}/out"],
        },
    ),
    "Hub repo id not cached": (
        2,
        {
            "grow": ["grow", "org/not-cached", "{tmp}/out", "--factor", "2"],
            "inspect": ["inspect", "org/not-cached", "--out", "{tmp}/out"],
            "emoe": ["emoe", "org/not-cached", "{tmp}/out"],
        },
    ),
    "bad flag value": (
        2,
        {
            "grow": ["grow", "{llama}", "{tmp}/out", "--factor", "0"],
            "inspect": ["inspect", "{moe}", "--budget-mb", "0"],
            "emoe": ["emoe", "{llama}", "{tmp}/out", "--experts", "0"],
            "bench": ["bench", "--timeout", "0"],
        },
    ),
    "unknown flag": (
        2,
        {
            "grow": ["grow", "{llama}", "{tmp}/out", "--factor", "2", "--frobnicate"],
            "inspect": ["inspect", "{moe}", "--frobnicate"],
            "emoe": ["emoe", "{llama}", "{tmp}/out", "--frobnicate"],
            "bench": ["bench", "--frobnicate"],
            "tour": ["tour", "--frobnicate"],
        },
    ),
    "output holds the user's files": (
        2,
        {
            "grow": ["grow", "{llama}", "{user}", "--factor", "2", "--overwrite"],
            "inspect": ["inspect", "{moe}", "--out", "{user}", "--no-plots"],
            "emoe": ["emoe", "{llama}", "{user}"],
        },
    ),
    "output inside the input": (
        2,
        {
            "grow": ["grow", "{llama}", "{llama}/big", "--factor", "2"],
            "inspect": ["inspect", "{moe}", "--out", "{moe}/report"],
            "emoe": ["emoe", "{llama}", "{llama}/emoe"],
        },
    ),
    "input folder without a checkpoint": (
        2,
        {
            "grow": ["grow", "{empty}", "{tmp}/out", "--factor", "2"],
            "inspect": ["inspect", "{empty}", "--out", "{tmp}/out"],
            "emoe": ["emoe", "{empty}", "{tmp}/out"],
        },
    ),
    "model without the structure the command needs": (
        1,
        {
            "grow": ["grow", "{flat}", "{tmp}/out", "--factor", "2"],  # no block list
            "inspect": ["inspect", "{llama}", "--out", "{tmp}/out"],  # no MoE layers
        },
    ),
    "corrupt input file": (
        1,
        {
            "grow": ["grow", "{bad_llama}", "{tmp}/out", "--factor", "2"],
            "inspect": ["inspect", "{bad_moe}", "--out", "{tmp}/out"],
            "emoe": ["emoe", "{bad_llama}", "{tmp}/out"],
        },
    ),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_same_kind_of_failure_same_status(
    kind: str, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, argvs = KINDS[kind]
    slots = {k: str(v) for k, v in files.items()} | {"tmp": str(tmp_path), "empty": str(tmp_path / "empty")}
    (tmp_path / "empty").mkdir()
    from safetensors.torch import save_file

    save_file({"embed.weight": torch.zeros(4, 2)}, str(tmp_path / "flat.safetensors"))
    slots["flat"] = str(tmp_path / "flat.safetensors")
    if kind == "corrupt input file":
        slots |= {"bad_llama": str(_truncated(files, "llama", tmp_path))}
        slots |= {"bad_moe": str(_truncated(files, "moe", tmp_path))}
    got = {}
    for command, argv in argvs.items():
        code = main([a.format(**slots) for a in argv])
        err = capsys.readouterr().err
        line = _err_line(err) if command != "tour" or code != 0 else ""
        got[command] = code
        assert "=True" not in line and "EMoEConfig." not in line and "LayerPlan." not in line, line
    assert got == dict.fromkeys(argvs, status), got
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in files["user"].iterdir()) == ["notes.txt"]


# --- Hub repo ids, resolved from the local cache ----------------------------------------------------
def test_hub_repo_ids_resolve_from_the_local_cache(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(files["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    # grow: the same bytes as from the folder
    assert main(["grow", "org/tiny-llama", str(tmp_path / "hub-big"), "--factor", "2", "--no-progress"]) == 0
    assert main(["grow", str(files["llama"]), str(tmp_path / "dir-big"), "--factor", "2", "--no-progress"]) == 0
    a, b = (
        load_file(str(tmp_path / "hub-big" / "model.safetensors")),
        load_file(str(tmp_path / "dir-big" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # inspect: the default output folder is named after the repo, not the snapshot's hash
    assert main(["inspect", "org/tiny-moe@main", "--no-plots", "--no-progress"]) == 0
    assert (tmp_path / "tiny-moe-introspect" / "report.json").is_file()
    # a revision by commit hash; an unknown revision is a usage error naming it
    assert main(["inspect", "org/tiny-moe@" + "2222bbbb" * 5, "--out", str(tmp_path / "r"), "--no-plots"]) == 0
    capsys.readouterr()
    assert main(["inspect", "org/tiny-moe@v9", "--out", str(tmp_path / "r2")]) == 2
    line = _err_line(capsys.readouterr().err)
    assert "at revision 'v9'" in line and str(files["cache"]) in line and "never downloads" in line
    # emoe
    assert main(["emoe", "org/tiny-llama", str(tmp_path / "art"), "--experts", "4", "--top-k", "2"]) == 0
    assert (tmp_path / "art" / "modulart_config.json").is_file()


# --- emoe -------------------------------------------------------------------------------------------
def test_emoe_converts_and_the_artefact_reloads(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    dst = tmp_path / "emoe"
    argv = ["emoe", str(files["llama"]), str(dst), "--experts", "4", "--top-k", "2", "--layers", "all", "--seed", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "emoe: converted 2 FFNs" in out and "layers: model.layers.0.mlp, model.layers.1.mlp" in out
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    cli_model = AutoModelForCausalLM.from_pretrained(files["llama"]).eval()
    handle = mt.load(cli_model, dst)
    assert isinstance(handle, mt.emoe.EMoEHandle)
    assert handle.config.num_experts == 4 and handle.config.top_k == 2 and handle.config.seed == 3
    ref_model = AutoModelForCausalLM.from_pretrained(files["llama"]).eval()
    mt.emoe.apply(ref_model, num_experts=4, top_k=2, layers="all", seed=3)
    with torch.no_grad():
        assert torch.equal(cli_model(input_ids=ids).logits, ref_model(input_ids=ids).logits)
    # the same DST again is replaced (it is an artefact); a user's folder needs --overwrite and keeps its files
    assert main(argv) == 0
    capsys.readouterr()
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep\n")
    assert main(["emoe", str(files["llama"]), str(user), "--experts", "4", "--top-k", "2"]) == 2
    assert "pass --overwrite" in _err_line(capsys.readouterr().err)
    assert main(["emoe", str(files["llama"]), str(user), "--experts", "4", "--top-k", "2", "--overwrite"]) == 0
    assert (user / "notes.txt").read_text() == "keep\n" and (user / "modulart_config.json").is_file()


def test_emoe_preset_and_flag_names_in_errors(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["emoe", str(files["llama"]), str(tmp_path / "p"), "--preset", "llama", "--experts", "4", "--top-k", "2"]
    assert main(argv) == 2  # the preset's layers (every 2nd from the 4th-last) do not exist in 2 layers
    line = _err_line(capsys.readouterr().err)
    assert "--preset 'llama' (its layers): layer index -4 is out of range" in line and "pass --layers" in line
    argv += ["--layers", "last"]
    assert main([*argv, "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("layers: ")  # --no-progress: no progress lines
    handle = mt.load(tiny_llama(), tmp_path / "p")
    assert isinstance(handle, mt.emoe.EMoEHandle)
    assert (handle.config.num_experts, handle.config.top_k) == (4, 2)
    assert handle.plan.targets == ["model.layers.1.mlp"]
    assert main(["emoe", str(files["llama"]), str(tmp_path / "q"), "--experts", "4", "--top-k", "5"]) == 2
    line = _err_line(capsys.readouterr().err)
    assert "--top-k 5: must satisfy 1 <= --top-k <= --experts (4)" in line and "top_k" not in line


# --- grow / inspect progress --------------------------------------------------------------------------
def test_progress_lines_off_a_terminal(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["grow", str(files["llama"]), str(tmp_path / "g"), "--factor", "2"]) == 0
    out = capsys.readouterr()
    assert "grow: writing 4 blocks" in out.out and re.search(r"wrote .* \(1 shard\) in \d+\.\d s", out.out)
    assert "\r" not in out.err  # no tqdm bar off a terminal
    assert main(["grow", str(files["llama"]), str(tmp_path / "h"), "--factor", "2", "--no-progress"]) == 0
    assert "grow: writing" not in capsys.readouterr().out
    assert main(["inspect", str(files["moe"]), "--out", str(tmp_path / "i"), "--no-plots"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("inspect: streaming") and "\r" not in out.err


# --- bench ------------------------------------------------------------------------------------------------
WRITER = """import json, pathlib, sys
if __name__ == "__main__":
    quick = "--quick" in sys.argv
    r = pathlib.Path(__file__).parent / "results"
    r.mkdir(exist_ok=True)
    (r / ("{name}_quick.json" if quick else "{name}.json")).write_text(json.dumps({{"quick": quick, "loss": {loss}}}))
    print("done")
"""


def _benchmarks(tmp: Path) -> Path:
    d = tmp / "repo" / "benchmarks"
    d.mkdir(parents=True)
    # a --quick-capable benchmark, one without --quick, one that fails, a helper module (no __main__)
    (d / "alpha.py").write_text(WRITER.format(name="alpha", loss=0.25) + '# argparse: "--quick"\n')
    (d / "slow.py").write_text(WRITER.format(name="slow", loss=1.5).replace('"--quick" in sys.argv', "False"))
    (d / "broken.py").write_text(
        'import sys\nif __name__ == "__main__":\n    print("boom"); sys.exit(3)  # "--quick"\n'
    )
    (d / "_common.py").write_text("X = 1\n")
    (d / "results").mkdir()
    (d / "results" / "old.json").write_text('{"untouched": true}')
    return d


def test_bench_one_benchmark_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _benchmarks(tmp_path)
    assert main(["bench", "--list", "--dir", str(d)]) == 0
    assert capsys.readouterr().out.split("\n")[:3] == ["alpha", "broken", "slow  (no --quick mode)"]
    assert main(["bench", "alpha", "--quick", "--dir", str(d)]) == 0
    out = capsys.readouterr().out
    assert "bench [1/1] alpha ..." in out and re.search(
        r"bench \[1/1\] alpha: ok in \d+\.\d s \(alpha_quick.json\)", out
    )
    summary = json.loads((d / "results" / "bench_quick.json").read_text())
    assert summary["generator"] == "modulart bench" and summary["command"] == "modulart bench alpha --quick"
    (run,) = summary["runs"]
    assert run["status"] == "ok" and run["returncode"] == 0
    assert run["results"] == {"alpha_quick.json": {"quick": True, "loss": 0.25}}  # old.json is not collected
    assert run["command"] == ["python", "benchmarks/alpha.py", "--quick"]
    md = (d / "results" / "bench_quick.md").read_text()
    assert "| alpha | ok |" in md and "| `loss` | 0.25 |" in md and "`python benchmarks/alpha.py --quick`" in md
    assert summary["machine"]["cpus"] == os.cpu_count() and summary["versions"]["python"] == sys.version.split()[0]
    # a rerun replaces bench's own files
    assert main(["bench", "alpha", "--quick", "--dir", str(d), "--no-progress"]) == 0
    assert "bench [" not in capsys.readouterr().out


def test_bench_suite_records_failures_and_skips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _benchmarks(tmp_path)
    out_dir = tmp_path / "report"
    assert main(["bench", "--quick", "--dir", str(d), "--out", str(out_dir)]) == 1
    cap = capsys.readouterr()
    line = _err_line(cap.err)
    assert "1 of 3 benchmarks did not succeed: broken (failed, exit 3)" in line
    assert "    boom" in cap.out  # the failed run's output tail
    runs = {r["name"]: r for r in json.loads((out_dir / "bench_quick.json").read_text())["runs"]}
    assert (runs["alpha"]["status"], runs["broken"]["status"], runs["slow"]["status"]) == ("ok", "failed", "skipped")
    assert runs["slow"]["note"] == "no --quick mode" and runs["broken"]["returncode"] == 3
    md = (out_dir / "bench_quick.md").read_text()
    assert "| broken | failed |" in md and "| slow | skipped (no --quick mode) |" in md
    # the full suite without --quick runs slow too (and writes bench.json, not bench_quick.json)
    assert main(["bench", "alpha", "slow", "--dir", str(d), "--out", str(out_dir)]) == 0
    full = json.loads((out_dir / "bench.json").read_text())
    assert [r["results"] for r in full["runs"]] == [
        {"alpha.json": {"quick": False, "loss": 0.25}},
        {"slow.json": {"quick": False, "loss": 1.5}},
    ]


def test_bench_timeout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "benchmarks"
    d.mkdir()
    (d / "sleepy.py").write_text('import time\nif __name__ == "__main__":\n    time.sleep(30)\n')
    assert main(["bench", "--dir", str(d), "--timeout", "0.5", "--no-progress"]) == 1
    assert "sleepy (timeout)" in _err_line(capsys.readouterr().err)
    (run,) = json.loads((d / "results" / "bench.json").read_text())["runs"]
    assert run["status"] == "timeout" and run["seconds"] < 20


def test_bench_without_a_benchmarks_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # as after a wheel install: no ./benchmarks
    assert main(["bench"]) == 2
    line = _err_line(capsys.readouterr().err)
    assert "--dir 'benchmarks': no such folder" in line and "not in the wheel" in line
    assert list(tmp_path.iterdir()) == []
