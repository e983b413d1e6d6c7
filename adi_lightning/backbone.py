"""Load and freeze a Stable Diffusion pipeline: a local diffusers folder or a hub id.

One path for every backbone: the tiny test pipeline, the toy pipeline and real SD 1.x / 2.x
weights all go through ``StableDiffusionPipeline.from_pretrained`` here.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class BackboneError(ValueError):
    """The configured model path does not lead to a usable Stable Diffusion pipeline."""


@dataclass
class BackboneInfo:
    """What was found in the pipeline, reported at load time."""

    source: str
    num_cross_attention_layers: int
    text_dim: int
    prediction_type: str
    latent_channels: int
    vae_scale_factor: int

    def describe(self) -> str:
        return (
            f"backbone {self.source}: {self.num_cross_attention_layers} cross-attention layers, "
            f"text width D={self.text_dim}, prediction={self.prediction_type}, "
            f"latent channels={self.latent_channels}, VAE factor={self.vae_scale_factor}"
        )


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"model.weight_dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


def check_pipeline_source(name_or_path: str) -> None:
    """Fail early with a message that names the key, before diffusers' generic errors."""
    key = "model.pretrained_model_name_or_path"
    if not name_or_path:
        raise BackboneError(f"{key} is not set")
    path = Path(os.path.expanduser(name_or_path))
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BackboneError(
                f"{key}={name_or_path!r} is a folder but not a diffusers pipeline: it has no "
                "model_index.json (save one with pipe.save_pretrained(folder))"
            )
        missing = [part for part in PIPELINE_PARTS if not (path / part).is_dir()]
        if missing:
            raise BackboneError(
                f"{key}={name_or_path!r} is not a Stable Diffusion pipeline folder: missing {missing}"
            )
        return
    if path.exists():
        raise BackboneError(f"{key}={name_or_path!r} is a file, not a diffusers pipeline folder")
    if not _HUB_ID.match(name_or_path) or name_or_path.startswith((".", "/", "~")):
        raise BackboneError(f"{key}={name_or_path!r}: no such folder (and not a hub id like 'org/name')")


def load_pipeline(
    name_or_path: str,
    weight_dtype: str = "float32",
    variant: str | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
):
    """Load a ``StableDiffusionPipeline`` with its parts frozen, in eval mode.

    A relative folder that does not exist from the working directory is looked up in the project
    (``adi_lightning.paths.resolve_project_path``: the shipped toy pipeline from any directory).
    """
    from diffusers import StableDiffusionPipeline

    from adi_lightning.paths import resolve_project_path

    name_or_path = resolve_project_path(name_or_path)
    check_pipeline_source(name_or_path)
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    kwargs = dict(
        dtype=resolve_dtype(weight_dtype),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        local_files_only=local_files_only,
        low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
    )
    if variant:
        kwargs["variant"] = variant
    if revision:
        kwargs["revision"] = revision
    try:
        pipe = StableDiffusionPipeline.from_pretrained(os.path.expanduser(name_or_path), **kwargs)
    except Exception as err:
        local = Path(os.path.expanduser(name_or_path))
        hint = "" if local.exists() else f"; there is no local folder {str(local.absolute())!r} either"
        raise BackboneError(
            f"model.pretrained_model_name_or_path={name_or_path!r} could not be loaded as a hub id "
            f"(local_files_only={local_files_only}){hint}: {type(err).__name__}: {err}"
        ) from err
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
        part.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def describe_pipeline(pipe, source: str) -> BackboneInfo:
    from adi_lightning.conditioning import cross_attention_layers

    return BackboneInfo(
        source=source,
        num_cross_attention_layers=len(cross_attention_layers(pipe.unet)),
        text_dim=pipe.text_encoder.config.hidden_size,
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
        latent_channels=pipe.unet.config.in_channels,
        vae_scale_factor=2 ** (len(pipe.vae.config.block_out_channels) - 1),
    )
