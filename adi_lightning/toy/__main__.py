"""``python -m adi_lightning.toy {pretrain,pretrain-sd3,train-judges,evaluate-backbone,make-data} ...``.

Why one entry point: the shipped assets (pipeline, judges) are reproducible by documented
commands, and the evaluation and data export that use them live beside them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import fields

from adi_lightning.paths import TOY_DIFFICULTIES


def _pretrain(args) -> None:
    from .pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)
                            if getattr(args, f.name, None) is not None and f.name != "held_out"})
    if args.unet_channels:
        cfg.unet_channels = tuple(args.unet_channels)
    t0 = time.time()
    pretrain(args.out, cfg)
    print(f"pretrain done in {(time.time() - t0) / 60:.1f} min -> {args.out}")


def _pretrain_sd3(args) -> None:
    from .pretrain_sd3 import PretrainSD3Config, estimate, pretrain_sd3

    cfg = PretrainSD3Config(**{f.name: getattr(args, f.name) for f in fields(PretrainSD3Config)
                               if getattr(args, f.name, None) is not None and f.name != "held_out"})
    if args.estimate:
        est = estimate(cfg)
        for name, count in est["parameters"].items():
            print(f"{name}: {count / 1e6:.3f}M params")
        print(f"total: {est['bytes'] / 1e6:.2f} MB of safetensors (budget {est['max_bytes'] / 1e6:.1f} MB)")
        return
    t0 = time.time()
    pretrain_sd3(args.out, cfg)
    print(f"pretrain-sd3 done in {(time.time() - t0) / 60:.1f} min -> {args.out}")


def _train_judges(args) -> None:
    from .judges import train_judges

    train_judges(args.out, pipeline=args.pipeline, steps=args.steps, seed=args.seed, minutes=args.minutes)


def _evaluate(args) -> None:
    from .evaluate import evaluate_backbone

    evaluate_backbone(args.pipeline, args.judges, args.out, seeds=args.seeds,
                      steps=args.num_inference_steps, guidance_scale=args.guidance_scale, batch=args.batch)


def _make_data(args) -> None:
    from .export import make_action_folder

    out = make_action_folder(args.out, action=args.action, num_exemplars=args.num_exemplars,
                             subjects=args.subjects, seed=args.seed, size=args.size, overwrite=args.overwrite,
                             difficulty=args.difficulty, num_pool=args.num_pool)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    from . import (
        DEFAULT_GUIDANCE_SCALE, DEFAULT_INFERENCE_STEPS, toy_judges_path, toy_pipeline_path, toy_sd3_pipeline_path,
    )

    parser = argparse.ArgumentParser(prog="python -m adi_lightning.toy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain the toy SD pipeline on world renders")
    p.add_argument("--out", default=str(toy_pipeline_path()))
    p.add_argument("--minutes", type=float, help="wall-time budget of the UNet phase (default 45)")
    p.add_argument("--steps", type=int, help="max UNet steps (default 100000: the time budget decides)")
    p.add_argument("--vae-steps", dest="vae_steps", type=int)
    p.add_argument("--num-images", dest="num_images", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--log-every", dest="log_every", type=int)
    p.add_argument("--text-dim", dest="text_dim", type=int)
    p.add_argument("--layers-per-block", dest="layers_per_block", type=int)
    p.add_argument("--unet-channels", dest="unet_channels", type=int, nargs=4)
    p.add_argument("--init", help="continue from this pipeline folder (--vae-steps 0 keeps its VAE)")
    p.add_argument("--ranks", type=int, help="data-parallel processes, one thread each (default 1; 2 on a 2-core CPU)")
    p.add_argument("--minutes-checkpoint", dest="checkpoint_minutes", type=float)
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("pretrain-sd3", help="pretrain the toy SD3 pipeline (MMDiT, CLIP-L + CLIP-G, no T5) on "
                                            "world renders by rectified flow")
    p.add_argument("--out", default=str(toy_sd3_pipeline_path()))
    p.add_argument("--minutes", type=float, help="wall-time budget of the transformer phase (default 100)")
    p.add_argument("--steps", type=int, help="max transformer steps (default 100000: the time budget decides)")
    p.add_argument("--vae-steps", dest="vae_steps", type=int)
    p.add_argument("--num-images", dest="num_images", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--log-every", dest="log_every", type=int)
    p.add_argument("--time-sampling", dest="time_sampling",
                   help="flow-time density: logit_normal (default, SD3's), uniform, importance, cubic")
    p.add_argument("--loss-weighting", dest="loss_weighting", help="none (default), sigma_sqrt, cosmap")
    p.add_argument("--shift", type=float, help="the scheduler's time shift, saved with it (default 1.0, for 64 image tokens; SD3's 3.0 is for 1024 px)")
    p.add_argument("--joint-blocks", dest="joint_blocks", type=int, help="MMDiT joint blocks (default 6)")
    p.add_argument("--heads", type=int, help="attention heads (default 4)")
    p.add_argument("--head-dim", dest="head_dim", type=int, help="width per head (default 24: stream width 96)")
    p.add_argument("--clip-widths", dest="clip_widths", type=int, nargs=2,
                   help="CLIP-L and CLIP-G widths (default 64 96)")
    p.add_argument("--text-layers", dest="text_layers", type=int)
    p.add_argument("--vae-channels", dest="vae_channels", type=int, nargs="+", help="VAE block widths (default 32 64)")
    p.add_argument("--init",
                   help="continue from this toy SD3 folder (--vae-steps 0 keeps its VAE and latent constants)")
    p.add_argument("--minutes-checkpoint", dest="checkpoint_minutes", type=float)
    p.add_argument("--estimate", action="store_true", help="print parameter counts and MB of the weights, and exit")
    p.set_defaults(func=_pretrain_sd3)

    p = sub.add_parser("train-judges", help="train the action / subject / context classifiers")
    p.add_argument("--out", default=str(toy_judges_path()))
    p.add_argument("--pipeline", default=str(toy_pipeline_path()), help="its VAE gives the round-trip augmentation")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--minutes", type=float, default=15.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_train_judges)

    p = sub.add_parser("evaluate-backbone", help="judge the pipeline's images of every subject x action")
    p.add_argument("--pipeline", default=str(toy_pipeline_path()))
    p.add_argument("--judges", default=str(toy_judges_path()))
    p.add_argument("--out", default="outputs/toy_backbone")
    p.add_argument("--seeds", type=int, default=8, help="images per prompt")
    p.add_argument("--num-inference-steps", dest="num_inference_steps", type=int, default=DEFAULT_INFERENCE_STEPS)
    p.add_argument("--guidance-scale", dest="guidance_scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    p.add_argument("--batch", type=int, default=80)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("make-data", help="write an action folder (exemplars, action-different partners, context pool)")
    p.add_argument("--action", default="jumping")
    p.add_argument("--out", required=True)
    p.add_argument("--num-exemplars", dest="num_exemplars", type=int, default=6)
    p.add_argument("--subjects", nargs="+", default=None, help="human-like subjects of the exemplars")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--difficulty", choices=TOY_DIFFICULTIES, default="shared",
                   help="shared: exemplars share one look, plus a context pool of other looks (context partners "
                        "only); diverse: every exemplar its own look; shared_no_pool: shared, no pool")
    p.add_argument("--num-pool", dest="num_pool", type=int, default=6, help="context-pool size (shared only)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a folder this command wrote earlier (it carries .adi_lightning_owned); any other "
                        "existing folder is refused")
    p.set_defaults(func=_make_data)

    for name, p in sub.choices.items():
        p.add_argument("--threads", type=int, default=int(os.environ.get("ADI_TOY_THREADS", "1")),
                       help="torch CPU threads (default 1, or $ADI_TOY_THREADS)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    # One thread by default: on a small shared CPU, 2 OpenMP threads stall at every op's barrier
    # whenever another process holds a core (docs/getting-started.md, OMP_NUM_THREADS).
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormal floats can slow CPU training many-fold
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
