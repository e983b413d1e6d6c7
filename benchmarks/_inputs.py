"""Shared defaults of the benchmark scripts: what to run on when no pipeline or data is given."""

from __future__ import annotations

import json
from pathlib import Path


def native_resolution(pipeline: str | Path) -> int:
    """The pipeline's native image size in pixels: its denoiser's ``sample_size`` (the UNet's, or the
    MMDiT's ``transformer``) times the VAE's downsampling ``2 ** (len(block_out_channels) - 1)``.
    SystemExit when the denoiser's config has no ``sample_size`` (give ``--resolution``)."""
    folder = Path(pipeline)
    part = next((p for p in ("unet", "transformer") if (folder / p / "config.json").is_file()), None)
    denoiser = json.loads((folder / part / "config.json").read_text()) if part else {}
    if "sample_size" not in denoiser:
        raise SystemExit(f"{folder}: no unet/ or transformer/ config with a sample_size; give --resolution")
    vae = json.loads((folder / "vae" / "config.json").read_text())
    return int(denoiser["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def fill_default_inputs(args, work: Path) -> None:
    """Default ``--pipeline`` / ``--data`` to the tiny test pipeline and action folder (built into
    ``work``) and ``--resolution`` to the pipeline's native image size (:func:`native_resolution`)."""
    if not args.pipeline:
        from adi_lightning.tiny import build_tiny_pipeline

        args.pipeline = str(build_tiny_pipeline(work / "pipeline"))
    if not args.data:
        from adi_lightning.tiny import build_tiny_action_folder

        args.data = str(build_tiny_action_folder(work / "data"))
    if args.resolution is None:
        args.resolution = native_resolution(args.pipeline)
