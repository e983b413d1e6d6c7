"""A tiny, randomly initialised FLUX.1 pipeline folder (``FluxPipeline``), built offline.

FLUX.1's shape with tiny widths: a ``FluxTransformer2DModel`` with double-stream blocks
(``transformer_blocks``: text and image tokens attend together, each stream with its own weights) followed by
single-stream blocks (``single_transformer_blocks``: one stream of the text tokens then the image tokens), the
guidance embedding of FLUX.1-dev (``guidance_embeds=True``), a CLIP-L ``CLIPTextModel`` whose POOLED output
is the only thing FLUX reads of it (``pooled_projection_dim`` = its width), a T5 encoder of another width
(``joint_attention_dim``: the token stream is T5 alone), a 16-channel VAE with FLUX's ``scaling_factor`` and
``shift_factor``, and a ``FlowMatchEulerDiscreteScheduler`` configured as FLUX.1-dev's (dynamic shifting by
the image's token count: ``mu`` from ``base_shift``..``max_shift`` over ``base_image_seq_len``..``max_image_seq_len``).

The transformer reads latents packed into 2x2 patches (``in_channels`` = 4 x 16 = 64, ``patch_size`` 1), so a
``sample_size`` px image has ``(sample_size / vae_scale / 2)^2`` image tokens. The rotary axes
(``axes_dims_rope``) must sum to ``attention_head_dim``.

:func:`build_tiny_flux_transformer` builds the transformer alone, in memory, for tests of the block-wise
routing (:mod:`adi_lightning.blockwise`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .pipeline import DEFAULT_WORDS, _text_encoder
from .sd3 import _mmdit_vae, _t5_encoder
from .tokenizer import build_clip_tokenizer, build_t5_tokenizer

FLUX_VAE_SCALING = 0.3611
FLUX_VAE_SHIFT = 0.1159
FLUX_LATENT_CHANNELS = 16
#: FLUX.1-dev's scheduler config (``scheduler/scheduler_config.json``): dynamic shifting, exponential time shift.
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)


def build_tiny_flux_pipeline(
    out_dir: str | os.PathLike,
    words: Iterable[str] = DEFAULT_WORDS,
    seed: int = 0,
    clip_width: int = 32,
    t5_width: int = 48,
    sample_size: int = 32,
    num_layers: int = 2,
    num_single_layers: int = 2,
    attention_heads: int = 2,
    attention_head_dim: int = 16,
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6),
    vae_channels: Sequence[int] = (16, 32),
    text_layers: int = 2,
    text_heads: int = 4,
    t5_layers: int = 2,
    t5_heads: int = 4,
) -> Path:
    """Build and ``save_pretrained`` a tiny FLUX.1-dev-shaped pipeline folder (safetensors); return its path.

    ``sample_size`` is in pixels: the latent (``sample_size / 2`` with the default 2x VAE) must be even (2x2
    packing). Defaults: CLIP-L 32 wide (the pooled vector), T5 48 (the stream), transformer width 2 x 16 = 32,
    two double-stream and two single-stream blocks. ValueError for sizes that do not fit.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    latent = sample_size // 2 ** (len(vae_channels) - 1)
    if latent % 2:
        raise ValueError(f"sample_size {sample_size} px gives latent {latent}, not divisible by FLUX's 2x2 packing")
    if sum(axes_dims_rope) != attention_head_dim or any(axis % 2 for axis in axes_dims_rope):
        raise ValueError(f"axes_dims_rope {tuple(axes_dims_rope)} must be even and sum to attention_head_dim "
                         f"{attention_head_dim}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_clip_tokenizer(words, out / "tokenizer")
    tokenizer_2 = build_t5_tokenizer(words, out / "tokenizer_2")
    with torch.random.fork_rng(devices=[]):  # seed the weights without touching the caller's RNG
        text_encoder = _text_encoder(tokenizer, clip_width, text_layers, text_heads, seed)  # CLIPTextModel
        vae = _mmdit_vae(vae_channels, seed + 2, FLUX_VAE_SCALING, FLUX_VAE_SHIFT, FLUX_LATENT_CHANNELS)
        transformer = build_tiny_flux_transformer(
            num_layers=num_layers, num_single_layers=num_single_layers, seed=seed + 3,
            joint_attention_dim=t5_width, pooled_projection_dim=clip_width, heads=attention_heads,
            head_dim=attention_head_dim, axes_dims_rope=axes_dims_rope)
        text_encoder_2 = _t5_encoder(tokenizer_2, t5_width, t5_layers, t5_heads, seed + 4)
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_flux_transformer(
    num_layers: int = 2,
    num_single_layers: int = 2,
    seed: int = 0,
    joint_attention_dim: int = 24,
    pooled_projection_dim: int = 16,
    heads: int = 2,
    head_dim: int = 16,
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6),
    guidance_embeds: bool = True,
    latent_channels: int = FLUX_LATENT_CHANNELS,
):
    """An fp32, eval-mode ``FluxTransformer2DModel``: packed latents ``[N, S_img, 4 * latent_channels]``, text
    ``[N, T, joint_attention_dim]``, pooled ``[N, pooled_projection_dim]``, ``txt_ids [T, 3]``, ``img_ids
    [S_img, 3]``, ``timestep`` and ``guidance`` ``[N]`` as fractions (the model multiplies them by 1000). The
    same ``seed`` gives the same weights, and the global RNG is left as it was."""
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * latent_channels, num_layers=num_layers, num_single_layers=num_single_layers,
            attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim, guidance_embeds=guidance_embeds,
            axes_dims_rope=tuple(axes_dims_rope))
    return model.float().eval()
