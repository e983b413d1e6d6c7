"""A tiny, randomly initialised SDXL pipeline folder (``StableDiffusionXLPipeline``), built offline.

SDXL's shape with tiny widths: a UNet with ``addition_embed_type="text_time"`` (pooled text
embedding + six time ids), down blocks (plain, cross-attn, cross-attn), a cross-attn mid block and
up blocks (cross-attn, cross-attn, plain), more transformer layers in the deeper blocks
(``transformer_layers_per_block``); two CLIP text encoders of DIFFERENT widths (``text_encoder``
a ``CLIPTextModel``, ``text_encoder_2`` a ``CLIPTextModelWithProjection``), so that mixing them up
fails on a shape; ``tokenizer_2`` pads with ``!`` as SDXL's; a VAE with SDXL's scaling factor and
``force_upcast``; an Euler scheduler. The number of ``attn2`` layers is read from the UNet.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .pipeline import DEFAULT_WORDS, SD_SCHEDULER, _clip_pair, _vae

SDXL_VAE_SCALING = 0.13025


def build_tiny_sdxl_pipeline(
    out_dir: str | os.PathLike,
    words: Iterable[str] = DEFAULT_WORDS,
    seed: int = 0,
    text_widths: tuple[int, int] = (32, 48),
    projection_dim: int = 24,
    sample_size: int = 32,
    layers_per_block: int = 2,
    transformer_layers_per_block: Sequence[int] = (1, 1, 2),
    unet_channels: Sequence[int] = (16, 32, 32),
    vae_channels: Sequence[int] = (16, 32),
    time_embed_dim: int = 8,
    text_layers: int | tuple[int, int] = 2,
    text_heads: int | tuple[int, int] = 4,
    text_acts: tuple[str, str] = ("quick_gelu", "quick_gelu"),
) -> Path:
    """Build and ``save_pretrained`` a tiny SDXL-shaped pipeline folder (safetensors); return its path.

    ``sample_size`` is in pixels; the latent (``sample_size / 2`` with the default 2x VAE) must be
    divisible by 4 (the UNet downsamples twice). Defaults give 17 ``attn2`` layers, context width
    32 + 48 = 80 and a pooled embedding of 24. ``text_layers`` / ``text_heads`` are one value for
    both encoders or one per encoder, so that SDXL's real encoders can be built with a small UNet:
    ``text_widths=(768, 1280), projection_dim=1280, text_layers=(12, 32), text_heads=(12, 20),
    text_acts=("quick_gelu", "gelu")`` (CLIP ViT-L, OpenCLIP bigG; the vocabulary stays the tiny one).
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    latent = sample_size // 2 ** (len(vae_channels) - 1)
    if latent % 4:
        raise ValueError(f"sample_size {sample_size} px gives latent {latent}, not divisible by 4")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # seed the weights without touching the caller's RNG
        clip = _clip_pair(words, out, text_widths, (None, projection_dim), text_layers, text_heads, text_acts, seed)
        vae = _vae(vae_channels, seed + 2, scaling_factor=SDXL_VAE_SCALING)
        torch.manual_seed(seed + 3)
        unet = UNet2DConditionModel(
            sample_size=latent,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=tuple(unet_channels),
            layers_per_block=layers_per_block,
            transformer_layers_per_block=tuple(transformer_layers_per_block),
            attention_head_dim=2,
            norm_num_groups=min(min(unet_channels), 8),
            cross_attention_dim=sum(text_widths),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=6 * time_embed_dim + projection_dim,
        ).eval()
    euler = {k: v for k, v in SD_SCHEDULER.items() if k not in ("clip_sample", "set_alpha_to_one")}
    scheduler = EulerDiscreteScheduler(**euler, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, **clip, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
