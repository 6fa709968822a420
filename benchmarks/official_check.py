"""Check invdiff's ``nvlabs-edm`` family against the official EDM code, from a checkout you point to.

    python benchmarks/official_check.py --edm-repo PATH

``PATH`` is a clone of https://github.com/NVlabs/edm (a work tree, or a bare git directory:
``training/networks.py`` is then read with ``git show HEAD:training/networks.py``). The
official module is imported from a temporary copy with ``torch_utils.persistence`` replaced
by a no-op decorator; nothing of it is copied into invdiff (it is CC BY-NC-SA 4.0).

For each network config (EDM's ``ddpmpp`` and ``ncsnpp`` SongUNets and a DhariwalUNet, at
small widths, and a ddpmpp SongUNet at the published width 128) the official network gets
random weights; they are loaded into the network invdiff builds (deepinv's NCSNpp / ADMUNet
with the official GroupNorm groups), and the table prints: whether the state-dict keys and
shapes are identical, the max abs difference of the raw network outputs (invdiff's network,
and deepinv's class as deepinv builds it, with 32 GroupNorm groups), and, for each official
preconditioner, the max abs difference between the official ``precond(x', sigma')`` mapped to
``[0, 1]`` and ``EDMOfficialPrior.denoise(x, sigma)`` over sigma in {0.01, 0.1, 1, 10}.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

from invdiff.priors import edm_official as eo

CONFIGS = {
    "SongUNet ddpmpp (w32)": ("SongUNet", dict(img_resolution=16, in_channels=3, out_channels=3, augment_dim=9,
                                                model_channels=32, channel_mult=[1, 2], num_blocks=1,
                                                attn_resolutions=[8], embedding_type="positional",
                                                channel_mult_noise=1, encoder_type="standard",
                                                decoder_type="standard", resample_filter=[1, 1])),
    "SongUNet ncsnpp (w32)": ("SongUNet", dict(img_resolution=16, in_channels=3, out_channels=3, augment_dim=9,
                                                model_channels=32, channel_mult=[1, 2], num_blocks=1,
                                                attn_resolutions=[8], embedding_type="fourier",
                                                channel_mult_noise=2, encoder_type="residual",
                                                decoder_type="standard", resample_filter=[1, 3, 3, 1])),
    "SongUNet ddpmpp (w128)": ("SongUNet", dict(img_resolution=16, in_channels=3, out_channels=3,
                                                 model_channels=128, channel_mult=[1, 1], num_blocks=1,
                                                 attn_resolutions=[8], embedding_type="positional",
                                                 channel_mult_noise=1, encoder_type="standard",
                                                 decoder_type="standard", resample_filter=[1, 1])),
    "DhariwalUNet (w64, labels)": ("DhariwalUNet", dict(img_resolution=16, in_channels=3, out_channels=3,
                                                        label_dim=10, model_channels=64, channel_mult=[1, 2],
                                                        num_blocks=1, attn_resolutions=[8])),
}
SIGMAS = (0.01, 0.1, 1.0, 10.0)


def official_module(edm_repo: Path) -> types.ModuleType:
    """``training/networks.py`` of the checkout, imported with a no-op ``persistence`` stub."""
    src = edm_repo / "training" / "networks.py"
    if src.is_file():
        text = src.read_text()
    else:
        text = subprocess.run(["git", "-C", str(edm_repo), "show", "HEAD:training/networks.py"], check=True,
                              capture_output=True, text=True).stdout
    tmp = Path(tempfile.mkdtemp(prefix="edm_official_"))
    (tmp / "edm_networks.py").write_text(text)
    persistence = types.ModuleType("torch_utils.persistence")
    persistence.persistent_class = lambda cls: cls
    pkg = types.ModuleType("torch_utils")
    pkg.persistence = persistence
    sys.modules.setdefault("torch_utils", pkg)
    sys.modules.setdefault("torch_utils.persistence", persistence)
    spec = importlib.util.spec_from_file_location("edm_networks", tmp / "edm_networks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def randomise(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere: the official init zeroes the last layers (the output would be 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return net


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def check(official: types.ModuleType, seed: int = 0) -> list[tuple]:
    rows = []
    for name, (network, kw) in CONFIGS.items():
        torch.manual_seed(seed)
        ref = randomise(getattr(official, network)(**kw).eval(), seed)
        cfg = eo.parse_config({"network": network, "network_kwargs": kw})
        ours = eo.build_network(network, cfg["network_kwargs"]).eval()
        sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
        same_keys = list(sd_ref) == list(sd_ours) and all(sd_ref[k].shape == sd_ours[k].shape for k in sd_ref)
        ours.load_state_dict(sd_ref)
        raw = copy.deepcopy(ours)
        for m in raw.modules():  # deepinv's own GroupNorm groups
            if isinstance(m, torch.nn.GroupNorm):
                m.num_groups = 32
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(2, kw["in_channels"], kw["img_resolution"], kw["img_resolution"], generator=g)
        c_noise = torch.tensor([-1.2, 0.7])
        labels = torch.eye(kw["label_dim"])[:2] if kw.get("label_dim") else None
        aug = torch.randn(2, kw["augment_dim"], generator=g) if kw.get("augment_dim") else None
        with torch.no_grad():
            out_ref = ref(x, c_noise, labels, aug)
            d_ours = max_diff(ours.forward_unet(x, c_noise, labels, aug), out_ref)
            d_raw = max_diff(raw.forward_unet(x, c_noise, labels, aug), out_ref)
            scale = float(out_ref.abs().max())
        inferred = eo.infer_network_kwargs(sd_ref)[1]
        inferred_ok = all(inferred[k] == cfg["network_kwargs"][k] for k in inferred)
        # the denoiser: the official preconditioners around the same network
        den = {}
        for precond in eo.PRECONDS:
            if precond == "iDDPMPrecond" and network == "SongUNet":
                continue
            pk = dict(img_resolution=kw["img_resolution"], img_channels=kw["in_channels"],
                      label_dim=kw.get("label_dim", 0))
            nk = {k: v for k, v in kw.items() if k not in ("img_resolution", "in_channels", "out_channels",
                                                            "label_dim")}
            torch.manual_seed(seed)
            pre = getattr(official, precond)(model_type=network, **pk, **nk).eval()
            randomise(pre.model, seed)
            full = eo.parse_config({"precond": precond, "precond_kwargs": pk, "network": network,
                                    "network_kwargs": nk})
            prior = eo.EDMOfficialPrior(eo.build_network(network, full["network_kwargs"]), precond,
                                        full["precond_kwargs"]).eval()
            prior.model.load_state_dict(pre.model.state_dict())
            xi = torch.rand(2, kw["in_channels"], kw["img_resolution"], kw["img_resolution"], generator=g)
            worst = 0.0
            with torch.no_grad():
                for s in SIGMAS:
                    sig = torch.full((2,), s)
                    ref_d = (pre(2 * xi - 1, 2 * sig) + 1) / 2
                    worst = max(worst, max_diff(prior.denoise(xi, sig), ref_d))
            den[precond] = worst
        rows.append((name, same_keys, inferred_ok, d_ours, d_raw, den, scale))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edm-repo", type=Path, required=True, help="a checkout of github.com/NVlabs/edm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = check(official_module(args.edm_repo), args.seed)
    print("| network | keys identical | config inferred | max abs diff (invdiff network) | "
          "max abs diff (deepinv as built) | max abs output | max abs diff of the denoiser per preconditioner |")
    print("|---|---|---|---|---|---|---|")
    for name, same, inferred, d_ours, d_raw, den, scale in rows:
        dens = ", ".join(f"{k} {v:.1e}" for k, v in den.items())
        print(f"| {name} | {same} | {inferred} | {d_ours:.1e} | {d_raw:.1e} | {scale:.2g} | {dens} |")
    return 0 if all(r[1] and r[2] and r[3] <= 1e-5 and max(r[5].values()) <= 1e-4 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
