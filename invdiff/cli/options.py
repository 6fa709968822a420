"""What every ``invdiff`` command shares: ``--device``, ``--seed``, ``-v/-q``, the
``KEY=VALUE`` options (:mod:`invdiff.specs`), the device check and the command line that
provenance records. Light at import time (no torch) so that ``invdiff --help`` stays fast."""

from __future__ import annotations

import argparse
import shlex

from ..specs import parse_key_values, parse_spec

__all__ = ["add_device", "add_seed", "seed", "add_progress", "add_params", "add_runtime", "runtime_options", "device",
           "command_line", "progress", "parse_key_values", "parse_spec", "config_arg"]


def add_device(p: argparse.ArgumentParser, from_config: bool = False) -> None:
    """``--device``, ``cpu`` by default (``from_config``: unset, so a ``--config`` file's value holds)."""
    p.add_argument("--device", default=None if from_config else "cpu",
                   help="cpu (default" + (", or the --config file's" if from_config else "") + "), cuda, cuda:1")


def seed(text: str) -> int:
    """A ``--seed`` value: a non-negative integer (a negative one would reach a sentinel)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def add_seed(p: argparse.ArgumentParser, help: str = "seed of every random draw (default 0)") -> None:
    p.add_argument("--seed", type=seed, default=0, help=help)


def add_progress(p: argparse.ArgumentParser, verbose: str = "also show each sampler's progress bar") -> None:
    """``-v/--verbose`` (more progress bars) and ``-q/--quiet`` (none), the same on every command."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help=verbose)
    group.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def add_runtime(p: argparse.ArgumentParser) -> None:
    """``--dtype`` and ``--compile``: how the prior's network runs
    (:func:`invdiff.priors.runtime.accelerate`; the sampler stays in float32)."""
    p.add_argument("--dtype", choices=("float32", "bf16", "fp16"), default=None,
                   help="precision of the prior's network (default float32); the sampler's arithmetic stays float32")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the prior's network (falls back to eager with a one-line warning saying why)")


def runtime_options(args: argparse.Namespace) -> dict:
    """``{"dtype": ..., "compile": ...}`` from :func:`add_runtime`'s options."""
    return {"dtype": getattr(args, "dtype", None), "compile": bool(getattr(args, "compile", False))}


def add_params(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help=help)


def progress(args: argparse.Namespace) -> bool:
    """Whether the command shows its own progress bar (off with ``-q``)."""
    return not getattr(args, "quiet", False)


def device(name: str):
    """``torch.device(name)``, refusing CUDA where none is available (one line)."""
    import torch

    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available on this machine")
    return dev


def command_line(args: argparse.Namespace) -> str:
    """The command as typed (``invdiff ...``), for provenance and model cards."""
    return "invdiff " + " ".join(shlex.quote(a) for a in getattr(args, "argv", []))


def config_arg(text: str | None):
    """``--config``: a preset name, a JSON object, or the path of a JSON/YAML file of official flags."""
    import json
    from pathlib import Path

    if text is None:
        return None
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--config is not valid JSON ({err})") from None
    path = Path(text)
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"--config {text}: no such file")
        if path.suffix.lower() == ".json":
            return json.loads(path.read_text())
        try:
            import yaml
        except ImportError:
            raise ImportError(f"--config {text}: reading YAML needs PyYAML (pip install pyyaml), or pass JSON") from None
        return yaml.safe_load(path.read_text())
    return text  # a preset name
