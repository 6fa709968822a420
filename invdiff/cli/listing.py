"""``invdiff list``: the registered operators, samplers and shipped priors."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def _summary(doc: str | None) -> str:
    """The first sentence of a docstring's first paragraph, without reST roles."""
    import re

    para = " ".join((doc or "").strip().split("\n\n")[0].split())
    para = re.sub(r":\w+:`~?(?:[\w.]+\.)?([\w]+)`", r"\1", para).replace("``", "")
    for stop in (": ", ". "):
        if stop in para:
            para = para.split(stop)[0]
    return para.rstrip(".")


def _cmd_list(args: argparse.Namespace) -> int:
    from .. import operators, priors, samplers

    what = args.what
    if what in ("operators", "all"):
        print("operators (invdiff.operators.make):")
        for name in operators.available():
            print(f"  {operators.describe(name)}")
    if what in ("samplers", "all"):
        print("samplers (invdiff.samplers.make):")
        for name in samplers.available():
            print(f"  {name}: {_summary(samplers.get(name).__doc__)}")
        from ..samplers.volume import VOLUME_SAMPLERS

        print("volume samplers (invdiff.samplers.volume.make_volume; reconstruct --volume):")
        for name, cls in VOLUME_SAMPLERS.items():
            print(f"  {name}: {_summary(cls.__doc__)}")
    if what in ("priors", "all"):
        print("priors (invdiff.priors.load):")
        shipped = priors.available()
        if not shipped:
            print("  (no shipped weights yet; analytic priors: GaussianPrior, GaussianMixturePrior)")
        for name in shipped:
            card = priors.model_card(name)
            print(f"  {name}: {card.get('description', '') if isinstance(card, dict) else card}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list operators, samplers and priors")
    p.add_argument("what", nargs="?", default="all", choices=["all", "operators", "samplers", "priors"])
    p.set_defaults(func=_cmd_list)
