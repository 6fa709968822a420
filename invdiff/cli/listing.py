"""``invdiff list``: the registered operators, samplers and shipped priors."""

from __future__ import annotations

import argparse

from .options import add_params, config_arg, parse_key_values

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


def _show_card(card: dict) -> None:
    """A checkpoint's card, one ``key: value`` line each, most telling first."""
    import json

    first = ["file", "family", "source", "formats", "parameterisation", "data_range", "data_convention", "image_shape",
             "any_size", "sigma_min", "sigma_max", "parameters", "file_dtype", "config_source", "config"]
    for key in first + sorted(k for k in card if k not in first):
        if key in card:
            value = card[key]
            text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
            print(f"  {key}: {text}")


def _cmd_list(args: argparse.Namespace) -> int:
    from .. import operators, priors, samplers

    if args.file is not None:
        options = parse_key_values(args.param or [], "--param")
        card = priors.inspect(args.file, family=args.family, config=config_arg(args.config), **options)
        print(f"prior checkpoint (invdiff.priors.load({args.file!r}{', family=' + repr(args.family) if args.family else ''}"
              f"{', config=...' if args.config else ''})):")
        _show_card(card)
        return 0
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
        print("checkpoint families (invdiff.priors.load(PATH, family=..., config=...); "
              "invdiff list --file PATH says what a file is):")
        for name in priors.families():
            fam = priors.get_family(name)
            print(f"  {name}: {fam.formats or 'invdiff .safetensors'}; {fam.source}".rstrip("; "))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list operators, samplers and priors; or say what a checkpoint is (--file)")
    p.add_argument("what", nargs="?", default="all", choices=["all", "operators", "samplers", "priors"])
    p.add_argument("--file", metavar="PATH", help="a checkpoint file or model folder (or shipped prior name): print "
                   "its family, source, parameterisation, data range, config and size without loading its weights")
    p.add_argument("--family", help="with --file: the checkpoint family, when it cannot be recognised from the keys")
    p.add_argument("--config", help="with --file: the official config (a preset name, a JSON object, or a "
                   ".json/.yaml file of official flags)")
    add_params(p, "with --file: an adapter option such as image_shape=[2,320,320] or data_range=[0,1]")
    p.set_defaults(func=_cmd_list)
