"""Shared defaults of the benchmark scripts: what to run on when no pipeline or data is given."""

from __future__ import annotations

from pathlib import Path


def fill_default_inputs(args, work: Path) -> None:
    """Default ``--pipeline`` / ``--data`` to the tiny test pipeline and action folder (built into
    ``work``) and ``--resolution`` to the pipeline's native image size."""
    if not args.pipeline:
        from adi_lightning.tiny import build_tiny_pipeline

        args.pipeline = str(build_tiny_pipeline(work / "pipeline"))
    if not args.data:
        from adi_lightning.tiny import build_tiny_action_folder

        args.data = str(build_tiny_action_folder(work / "data"))
    if args.resolution is None:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        unet = UNet2DConditionModel.load_config(args.pipeline, subfolder="unet")
        vae = AutoencoderKL.load_config(args.pipeline, subfolder="vae")
        args.resolution = int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
