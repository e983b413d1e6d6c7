"""ToyActionWorld: the embedded default backbone, its judges and its data (see ``python -m adi_lightning.toy``)."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
#: Classifier-free guidance and DDIM steps the shipped pipeline was evaluated with (the stock
#: ``StableDiffusionPipeline`` default of 7.5 over-saturates this tiny model).
DEFAULT_GUIDANCE_SCALE = 4.0
DEFAULT_INFERENCE_STEPS = 25


def toy_pipeline_path() -> Path:
    """The shipped pretrained toy pipeline folder (a diffusers StableDiffusionPipeline)."""
    return ASSETS / "pipeline"


def toy_sd3_pipeline_path() -> Path:
    """The toy SD3 pipeline folder (a diffusers StableDiffusion3Pipeline, no T5), built by
    ``python -m adi_lightning.toy pretrain-sd3``; shipped part-trained (docs/method.md, "A toy SD3 backbone")."""
    return ASSETS / "pipeline_sd3"


def toy_judges_path() -> Path:
    """The shipped judges folder (``judges.safetensors``)."""
    return ASSETS / "judges"
