"""Convert an official EDM network pickle (NVlabs/edm) into an invdiff ``.safetensors`` prior.

    python scripts/edm_pickle_to_safetensors.py edm-ffhq-64x64-uncond-vp.pkl edm-ffhq-vp.safetensors

**Run this only inside your own trusted EDM environment, on a pickle you trust.** An EDM
``.pkl`` is a Python pickle (``torch_utils.persistence`` even stores the network's source
code in it); unpickling runs code from the file. invdiff itself never unpickles: this script
is not imported by invdiff, it is a tool for you to run once, where the EDM code
(``torch_utils``, ``dnnlib``) is importable (e.g. from the root of an EDM checkout, or with
it on ``PYTHONPATH``). It needs ``torch`` and ``safetensors`` only besides that.

It loads the pickle (``generate.py`` reads ``pickle.load(f)["ema"]``; ``--key`` picks another
entry, and a pickle of the module itself is accepted), and writes:

* the preconditioner's ``state_dict()`` (keys ``model.<...>``; iDDPMPrecond's ``u`` table
  too, which invdiff recomputes and ignores), as safetensors;
* metadata ``invdiff_format="1"``, ``family="nvlabs-edm"``, JSON ``config`` =
  ``{"precond": class name, "precond_kwargs": {...}, "network": class name,
  "network_kwargs": {...}}`` from the modules' ``init_kwargs`` (the persistence record of
  their constructor arguments), JSON ``options`` (``{"data_range": "[-1, 1]"}``, EDM's
  training range), ``image_shape``, ``sigma_min`` / ``sigma_max`` (EDM ``generate.py``'s
  sampling range 0.002..80 clamped to the preconditioner's, on invdiff's ``[0, 1]`` scale:
  half the model's), ``card`` = ``{}``.

Then ``invdiff.priors.load("edm-ffhq-vp.safetensors")`` reads it without unpickling.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import sys
from pathlib import Path

import torch

_PRECOND_KEYS = {
    "EDMPrecond": ("sigma_min", "sigma_max", "sigma_data"),
    "VPPrecond": ("beta_d", "beta_min", "M", "epsilon_t"),
    "VEPrecond": ("sigma_min", "sigma_max"),
    "iDDPMPrecond": ("C_1", "C_2", "M"),
}
_COMMON = ("img_resolution", "img_channels", "label_dim", "use_fp16")
_SAMPLING = (0.002, 80.0)  # edm_sampler's defaults in generate.py
_SCALE = 2.0  # [-1, 1] training images: sigma on invdiff's [0, 1] scale is half the model's


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _init_kwargs(module) -> dict:
    kw = getattr(module, "init_kwargs", None)
    return dict(kw) if kw is not None else {}


def _sigma_range(net, precond: str) -> tuple[float, float]:
    """The model-scale sampling range of generate.py: (0.002, 80) clamped to the net's."""
    lo = float(getattr(net, "sigma_min", 0.0) or 0.0)
    hi = float(getattr(net, "sigma_max", math.inf))
    return max(_SAMPLING[0], lo), min(_SAMPLING[1], hi)


def convert(pkl: Path, out: Path, key: str = "ema") -> dict:
    with open(pkl, "rb") as f:
        data = pickle.load(f)  # trusted file, trusted environment: see the docstring
    net = data[key] if isinstance(data, dict) else data
    precond = type(net).__name__
    if precond not in _PRECOND_KEYS:
        raise SystemExit(f"{pkl}: {precond} is not an EDM preconditioner ({', '.join(_PRECOND_KEYS)})")
    model = net.model
    network = type(model).__name__
    pre_all = _init_kwargs(net)
    precond_kwargs = {k: v for k, v in pre_all.items() if k in _COMMON or k in _PRECOND_KEYS[precond]}
    for k in _COMMON:  # attributes every official preconditioner sets
        if k not in precond_kwargs and hasattr(net, k):
            precond_kwargs[k] = getattr(net, k)
    network_kwargs = _init_kwargs(model)
    if not network_kwargs:  # the precond's init_kwargs hold the network's keywords (model_kwargs)
        network_kwargs = {k: v for k, v in pre_all.items() if k not in precond_kwargs and k != "model_type"}
    res, ch = int(precond_kwargs["img_resolution"]), int(precond_kwargs["img_channels"])
    lo, hi = _sigma_range(net, precond)
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    config = {"precond": precond, "precond_kwargs": _jsonable(precond_kwargs), "network": network,
              "network_kwargs": _jsonable(network_kwargs)}
    metadata = {
        "invdiff_format": "1",
        "family": "nvlabs-edm",
        "config": json.dumps(config),
        "options": json.dumps({"data_range": "[-1, 1]"}),
        "image_shape": json.dumps([ch, res, res]),
        "sigma_min": repr(lo / _SCALE),
        "sigma_max": repr(hi / _SCALE),
        "card": json.dumps({}),
    }
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(out)
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert an EDM .pkl (trusted!) to an invdiff .safetensors prior.")
    parser.add_argument("pickle", type=Path, help="the EDM network pickle (network-snapshot-*.pkl, edm-*.pkl)")
    parser.add_argument("output", type=Path, help="the .safetensors file to write")
    parser.add_argument("--key", default="ema", help="entry of the pickled dict holding the network (default: ema)")
    args = parser.parse_args(argv)
    if args.output.suffix != ".safetensors":
        raise SystemExit(f"output must end in .safetensors, got {args.output.name}")
    config = convert(args.pickle, args.output, args.key)
    print(f"wrote {args.output}: {config['precond']} around {config['network']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
