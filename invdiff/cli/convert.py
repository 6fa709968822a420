"""``invdiff convert``: an outside checkpoint, with its config and options, as an invdiff
``.safetensors`` prior that every command loads by path (:func:`invdiff.priors.convert`)."""

from __future__ import annotations

import argparse

from .options import add_params, command_line, config_arg, parse_key_values

__all__ = ["register"]

_EXAMPLE = ("example: invdiff convert checkpoint_10.pth --config configs/ve/AAPM_256_ncsnpp_continuous.json "
            "--out aapm-ncsnpp.safetensors, then invdiff reconstruct --prior aapm-ncsnpp.safetensors ...")


def _cmd_convert(args: argparse.Namespace) -> int:
    from .. import priors

    options = parse_key_values(args.param or [], "--param")
    out = priors.convert(args.source, args.out, family=args.family, config=config_arg(args.config),
                         ema=not args.no_ema, dtype=args.dtype, overwrite=args.overwrite,
                         card={"convert_command": command_line(args)}, **options)
    card = priors.model_card(out)
    print(f"wrote {out}: family {card['family']}, {card.get('parameterisation', '')}, data range "
          f"{card.get('data_range')}, image shape {card.get('image_shape')}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="an outside checkpoint (with its config) as an invdiff .safetensors prior",
                       description=__doc__.splitlines()[0] + " " + __doc__.splitlines()[1], epilog=_EXAMPLE)
    p.add_argument("source", help="checkpoint file or model folder (any family of invdiff list priors)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--family", help="the checkpoint family, when it cannot be recognised from the keys")
    p.add_argument("--config", help="the official config: a preset name, a JSON object, or a .json/.yaml file")
    add_params(p, "an adapter option such as data_range=\"[0, 1]\" or image_shape=[2,320,320]")
    p.add_argument("--dtype", default="file", help="dtype of the stored weights: file (default: as the source), "
                   "float32, float16, bfloat16")
    p.add_argument("--no-ema", action="store_true", help="the raw weights of a training checkpoint, not its EMA")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is an invdiff prior file")
    p.set_defaults(func=_cmd_convert)
