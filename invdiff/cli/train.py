"""``invdiff train``: train an EDM prior on a built-in dataset or a folder of images."""

from __future__ import annotations

import argparse

from .options import add_device, add_progress, add_seed, progress

__all__ = ["register"]


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from ..train.edm import TrainConfig, reproduce_command, train

    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(
        data=args.data, size=args.size, channels=args.channels, width=args.width, unshuffle=args.unshuffle,
        patch=args.patch, sizes=tuple(int(v) for v in args.sizes.split(",") if v), patch_pad=args.patch_pad,
        patch_mix=tuple(float(v) for v in args.patch_mix.split(",") if v), steps=args.steps,
        batch=args.batch, lr=args.lr, ema_halflife=args.ema_halflife,
        augment=tuple(a for a in args.augment.split(",") if a), n_images=args.n_images, seed=args.seed,
    )
    # the command recorded in the model card reproduces the weights in one uninterrupted run
    # (train.reproduce_command); --command (hidden) replaces it
    command = args.command
    if args.latent:
        from ..train.latent import LatentTrainConfig, train_latent

        if args.resume or args.device != "cpu":
            raise ValueError("--latent trains on the CPU in one run (no --resume, no --device)")
        ae = LatentTrainConfig(steps=args.ae_steps, latent_channels=args.latent_channels, width=args.ae_width)
        command = command or reproduce_command(config, args.out, ae)
        result = train_latent(config, ae, args.out, checkpoint=args.checkpoint,
                              checkpoint_every=args.checkpoint_every, time_limit=args.time_limit, name=args.name,
                              command=command, progress=progress(args))
        card = result.card
        print(f"wrote {result.path} ({card['parameters']:,} parameters, autoencoder held-out PSNR "
              f"{card['heldout_reconstruction_psnr']} dB, latent prior {card['steps']} steps, "
              f"final loss {card['final_loss']})")
        if "heldout_denoising_psnr" in card:
            print(f"held-out decoded denoising PSNR: {card['heldout_denoising_psnr']}")
        return 0
    command = command or reproduce_command(config, args.out)
    result = train(config, args.out, checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                   resume=args.resume, device=args.device, time_limit=args.time_limit, name=args.name,
                   command=command, progress=progress(args))
    card = result.card
    print(f"wrote {result.path} ({card['parameters']:,} parameters, {card['steps']} steps, "
          f"final loss {card['final_loss']}, {card['steps_per_second']} steps/s)")
    if "heldout_denoising_psnr" in card:
        print(f"held-out denoising PSNR: {card['heldout_denoising_psnr']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a diffusion prior (EDM loss) on built-in data or a folder of images")
    p.add_argument("--data", required=True, help="ct-phantom, mri-brain, or a folder of PNG/TIFF/DICOM/NIfTI images")
    p.add_argument("--out", required=True, help="output .safetensors file (a .md model card is written beside it)")
    p.add_argument("--size", type=int, default=64,
                   help="image side (default 64); with --patch, the largest image side of the pool")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--width", type=int, default=32, help="U-Net base width (default 32: 1.24 M parameters)")
    p.add_argument("--unshuffle", type=int, default=2, help="pixel-unshuffle factor of the network input (default 2)")
    p.add_argument("--patch", type=int, default=0,
                   help="train a patch prior (PaDIS) on PATCH x PATCH crops of full-size images, usable at any size "
                        "(default 0: a whole-image prior at --size)")
    p.add_argument("--sizes", default="", help="--patch: comma-separated image sizes of the pool (default: --size)")
    p.add_argument("--patch-pad", type=int, default=-1, help="--patch: zero padding of the crops (default PATCH/2)")
    p.add_argument("--patch-mix", default="0.5,0.3,0.2",
                   help="--patch: probabilities of the patch sizes PATCH, PATCH/2, PATCH/4 (default 0.5,0.3,0.2)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema-halflife", type=float, default=5_000.0, help="EMA half-life in images")
    p.add_argument("--augment", default="hflip", help="comma-separated: hflip,vflip,rot90,rotate (default hflip)")
    p.add_argument("--n-images", type=int, default=4096, help="pool size for generated data (default 4096)")
    add_seed(p)
    add_device(p)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument("--checkpoint", default=None, help="training checkpoint (default: OUT with .ckpt)")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--time-limit", type=float, default=None, help="stop cleanly after this many minutes")
    p.add_argument("--name", default=None, help="prior name for the model card (default: file stem)")
    p.add_argument("--latent", action="store_true",
                   help="train a latent diffusion prior: a ConvAutoencoder, then the EDM prior on its latents "
                        "(--width, --steps, --lr... apply to the latent prior)")
    p.add_argument("--ae-steps", type=int, default=1500, help="--latent: autoencoder steps (default 1500)")
    p.add_argument("--latent-channels", type=int, default=4, help="--latent: latent channels (default 4)")
    p.add_argument("--ae-width", type=int, default=32, help="--latent: autoencoder base width (default 32)")
    p.add_argument("--command", default=None, help=argparse.SUPPRESS)
    add_progress(p, verbose="(no extra bars for training)")
    p.set_defaults(func=_cmd_train)
