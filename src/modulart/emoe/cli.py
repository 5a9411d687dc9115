"""``modulart emoe SRC DST``: convert a Hugging Face checkpoint's FFNs into emergent experts, save the artefact.

SRC is a model folder (``config.json`` + safetensors weights) or a Hugging Face Hub repo id in the
local cache (nothing is downloaded). The model is built with transformers from local files only, as
the class ``config.json`` names in ``architectures`` (``AutoModel`` when it names none that
transformers has); EMoE is applied with the flags given (:class:`~modulart.emoe.EMoEConfig`) and the
artefact (config, cluster labels, the model's fingerprint: not the weights) is written to DST
atomically, with the rules of every modulart output (a new or empty folder or an earlier artefact;
another folder only with ``--overwrite``, keeping its other files; never inside SRC).

Attach the artefact to the same checkpoint later with :func:`modulart.load`::

    model = transformers.AutoModelForCausalLM.from_pretrained(SRC)
    handle = modulart.load(model, DST)

Example:
    $ modulart emoe ./llama-ckpt ./llama-emoe --experts 64 --top-k 16 --layers last_half
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modulart.cli import UsageError, check_output_path, nonnegative_int, positive_int, resolve_input
from modulart.core.errors import ConfigError, IncompatibleArtifactError, OutOfRangeError, SelectorError

__all__ = ["EMOE_FLAGS", "add_emoe_parser", "load_checkpoint", "run_emoe"]

EMOE_FLAGS: dict[str, str] = {
    "num_experts": "--experts",
    "top_k": "--top-k",
    "layers": "--layers",
    "split": "--split",
    "router": "--router",
    "executor": "--executor",
    "seed": "--seed",
    "every": "--every",
    "directory": "DST",
}
"""Field of :class:`~modulart.emoe.EMoEConfig` (or argument) -> the ``emoe`` flag it comes from."""

_DTYPES = ("float32", "bfloat16", "float16", "auto")


def add_emoe_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``emoe`` sub-command to a ``modulart`` sub-parser set.

    Example:
        >>> p = argparse.ArgumentParser(prog="modulart")
        >>> add_emoe_parser(p.add_subparsers(dest="command"))
        >>> a = p.parse_args(["emoe", "ckpt", "out", "--experts", "8", "--top-k", "2"])
        >>> a.src, a.dst, a.experts, a.top_k, a.layers
        ('ckpt', 'out', 8, 2, None)
    """
    p = sub.add_parser(
        "emoe",
        help="convert a checkpoint's FFNs into emergent experts (EMoE) and save the artefact",
        description="Load a Hugging Face model folder (config.json + safetensors; or a Hub repo id in the local "
        "cache, nothing is downloaded), split the chosen FFNs' neurons into balanced experts by clustering their "
        "keys, and save the EMoE artefact (config + labels + the model's fingerprint, not the weights) to DST. "
        "Attach it later with modulart.load(model, DST).",
    )
    p.add_argument("src", help="Hugging Face model folder (config.json + *.safetensors) or a cached Hub repo id")
    p.add_argument("dst", help="output folder for the artefact (written atomically)")
    p.add_argument(
        "--experts", type=positive_int, default=None, metavar="N", help="experts per converted FFN (default 64)"
    )
    p.add_argument(
        "--top-k", type=positive_int, default=None, metavar="K", help="experts per token, 1 <= K <= N (default 16)"
    )
    p.add_argument(
        "--layers",
        default=None,
        help="which FFNs: 'default' (every 2nd layer of the last quarter), 'all', 'last_half', '0-3,-1', ...",
    )
    p.add_argument("--every", type=positive_int, default=None, metavar="N", help="keep every N-th selected layer")
    p.add_argument("--split", default=None, choices=["kmeans", "random"], help="how neurons are grouped (kmeans)")
    p.add_argument("--router", default=None, help="router name (default 'avgk'; see modulart.emoe.available_routers)")
    p.add_argument("--executor", default=None, choices=["masked", "sparse"], help="expert execution (masked)")
    p.add_argument("--seed", type=nonnegative_int, default=None, help="seed of the clustering (default 0)")
    p.add_argument(
        "--preset",
        default=None,
        choices=["bert", "gpt2", "llama"],
        help="start from the reference code's conversion for this family (EMoEConfig.reference); flags win",
    )
    p.add_argument("--dtype", default="float32", choices=_DTYPES, help="dtype the model is loaded in (float32)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a DST folder that holds other files (only the artefact's own files are replaced)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.set_defaults(flags=EMOE_FLAGS)


def _config(args: argparse.Namespace) -> Any:
    from modulart.emoe import EMoEConfig

    fields: dict[str, Any] = {}
    for flag, field in (
        ("experts", "num_experts"),
        ("top_k", "top_k"),
        ("every", "every"),
        ("split", "split"),
        ("router", "router"),
        ("executor", "executor"),
        ("seed", "seed"),
    ):
        if getattr(args, flag) is not None:
            fields[field] = getattr(args, flag)
    if args.layers is not None:
        try:
            fields["layers"] = int(args.layers)
        except ValueError:
            fields["layers"] = args.layers
    if args.preset is not None:
        return EMoEConfig.reference(args.preset, **fields)
    return EMoEConfig(**fields)


def load_checkpoint(src: str | Path, *, dtype: str = "float32", progress: bool = False) -> Any:
    """Build the model of a Hugging Face model folder with transformers, from local files only.

    The class is the first of ``config.json``'s ``architectures`` that transformers has, else
    ``AutoModel``.

    Args:
        src: a folder with ``config.json`` and the weights.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"`` (the checkpoint's own).
        progress: let transformers show its loading bar (only on a terminal).

    Returns:
        The model, in eval mode.

    Raises:
        UsageError: ``src`` has no ``config.json`` (exit status 2).
        IncompatibleArtifactError: transformers cannot build or load it, or is not installed (1).

    Example:
        >>> import tempfile, transformers
        >>> cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16)
        >>> d = tempfile.mkdtemp()
        >>> transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
        >>> type(load_checkpoint(d)).__name__
        'GPT2LMHeadModel'
    """
    import json

    root = Path(src)
    if not (root / "config.json").is_file():
        raise UsageError(f"SRC {str(src)!r} has no config.json: not a Hugging Face model folder")
    try:
        import torch
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is in the test extras
        raise IncompatibleArtifactError(
            f"modulart emoe builds the model with transformers, which is not installed ({e}): "
            "pip install 'modulart[hf]'"
        ) from None
    try:
        names = json.loads((root / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError) as e:
        raise IncompatibleArtifactError(f"{root / 'config.json'}: not a readable JSON config ({e})") from None
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), transformers.AutoModel)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not (progress and sys.stderr.isatty()):
        hf_logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(str(root), local_files_only=True, dtype=torch_dtype)
    except Exception as e:  # a bad config / weights file: transformers raises many kinds
        raise IncompatibleArtifactError(
            f"SRC {str(src)!r}: transformers cannot load it as {cls.__name__}: {type(e).__name__}: {e}"
        ) from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval()


def run_emoe(args: argparse.Namespace, echo: Callable[[str], None]) -> int:
    """Run ``modulart emoe`` with parsed ``args``; print through ``echo``; returns the exit status.

    Everything is checked before the model is loaded: the source (a folder or a cached Hub repo
    id), DST (:func:`~modulart.cli.check_output_path`) and the flags (an
    :class:`~modulart.emoe.EMoEConfig`); a bad one raises a :class:`~modulart.cli.UsageError`
    (``modulart.cli.main`` prints one line naming the flag, exit status 2). Off a terminal (and
    without ``--no-progress``) each step prints a plain line.

    Example:
        >>> import tempfile, transformers
        >>> cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=32, n_positions=16)
        >>> src, dst = tempfile.mkdtemp(), tempfile.mkdtemp() + "/emoe"
        >>> transformers.GPT2LMHeadModel(cfg).save_pretrained(src)
        >>> p = argparse.ArgumentParser(prog="modulart")
        >>> add_emoe_parser(p.add_subparsers(dest="command"))
        >>> lines = []
        >>> argv = ["emoe", src, dst, "--experts", "4", "--top-k", "2", "--layers", "all"]
        >>> run_emoe(p.parse_args(argv), lines.append)
        0
        >>> lines[-1].startswith("wrote ") and (Path(dst) / "modulart_config.json").is_file()
        True
    """
    from modulart import emoe

    quiet = bool(args.no_progress)
    say: Callable[[str], None] = (lambda _line: None) if quiet else echo
    src = resolve_input(args.src, flag="SRC")
    if not src.is_dir():
        raise UsageError(f"SRC {args.src!r} is not a folder: pass a Hugging Face model folder or a cached Hub repo id")
    check_output_path(args.dst, sources=[src], kind="artifact", overwrite=args.overwrite, flag="DST")
    try:
        config = _config(args)
    except ConfigError as e:
        raise UsageError(str(e)) from e
    start = time.perf_counter()
    say(f"emoe: loading {src} ...")
    model = load_checkpoint(src, dtype=args.dtype, progress=not quiet)
    n = sum(p.numel() for p in model.parameters())
    say(f"emoe: loaded {type(model).__name__} ({n / 1e6:.1f} M parameters) in {time.perf_counter() - start:.1f} s")
    say(f"emoe: converting FFNs ({config.num_experts} experts, top {config.top_k}, split {config.split!r}) ...")
    t0 = time.perf_counter()
    try:
        handle = emoe.apply(model, config)
    except (SelectorError, OutOfRangeError) as e:
        if args.layers is not None:
            raise type(e)(f"--layers {args.layers!r}: {e}") from e
        where = f"--preset {args.preset!r} (its layers)" if args.preset else "the default --layers"
        raise type(e)(f"{where}: {e}; pass --layers") from e
    except ConfigError as e:
        raise UsageError(str(e)) from e
    converted = list(handle.plan.targets)
    say(f"emoe: converted {len(converted)} FFNs in {time.perf_counter() - t0:.1f} s")
    out = handle.save(args.dst, overwrite=args.overwrite)
    echo(f"layers: {', '.join(map(str, converted))}")
    echo(f"wrote {out} (attach with modulart.load(model, {str(out)!r}))")
    return 0
