"""A tiny, randomly initialised Stable Diffusion 3 pipeline folder (``StableDiffusion3Pipeline``), built offline.

SD3's shape with tiny widths (Esser et al. 2024): an MMDiT (``SD3Transformer2DModel``: joint blocks in
which the text and image tokens attend together, the last block updating only the image stream), two
CLIP text encoders with projection (``CLIPTextModelWithProjection``: CLIP ViT-L and OpenCLIP bigG) of
DIFFERENT widths and projection widths, an optional T5 encoder of yet another width (the transformer's
``joint_attention_dim``), a 16-channel VAE with SD3's ``scaling_factor`` and ``shift_factor``, and a
``FlowMatchEulerDiscreteScheduler`` with SD3's shift 3.0.

``StableDiffusion3Pipeline.encode_prompt`` builds the context as: CLIP-L and CLIP-G penultimate hidden
states concatenated on channels, zero-padded to the T5 width, then concatenated with T5's last hidden
state along tokens (zeros when there is no T5); the pooled embedding is both CLIP projections
concatenated. So ``joint_attention_dim`` = T5 width >= sum of the CLIP widths, and
``pooled_projection_dim`` = sum of the projection widths. Without T5 the folder has no
``text_encoder_3``/``tokenizer_3`` (``model_index.json`` lists them as null), as users drop T5; stock
diffusers then loads it only with ``from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)``
(they are not among ``StableDiffusion3Pipeline._optional_components``).

``dual_attention_layers`` mimics SD3.5 (Medium: the first 13 of 24 blocks): those blocks get an
``attn2``, a second attention over the image tokens only (no text), so ``attn2`` does NOT mean
cross-attention in an MMDiT.

:func:`build_tiny_sd3_transformer` builds the MMDiT alone, in memory, for tests of the block-wise routing
(:mod:`adi_lightning.blockwise`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .pipeline import DEFAULT_WORDS, _clip_pair, _vae
from .tokenizer import build_t5_tokenizer

SD3_VAE_SCALING = 1.5305
SD3_VAE_SHIFT = 0.0609
SD3_LATENT_CHANNELS = 16
SD3_SHIFT = 3.0


def _t5_encoder(tokenizer, width: int, layers: int, heads: int, seed: int, ff: int | None = None,
                buckets: tuple[int, int] = (8, 32)):
    """A random ``T5EncoderModel`` shaped as T5 v1.1 (gated-GELU MLP ``ff`` wide, default ``2 * width``, untied
    embeddings), SD3's T5-XXL; ``buckets``: relative attention buckets and their maximum distance."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=width // heads,
        d_ff=ff or width * 2,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets[0],
        relative_attention_max_distance=buckets[1],
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def _mmdit_vae(block_out_channels: Sequence[int], seed: int, scaling_factor: float, shift_factor: float,
               latent_channels: int = SD3_LATENT_CHANNELS, **config):
    """SD3's and FLUX's ``AutoencoderKL`` (:func:`~adi_lightning.tiny.pipeline._vae`): latents ``(mode -
    shift_factor) * scaling_factor``, no quant convs, upcast to fp32; ``config``: its other settings."""
    return _vae(block_out_channels, seed, scaling_factor=scaling_factor, latent_channels=latent_channels,
                shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
                **config)


def build_tiny_sd3_pipeline(
    out_dir: str | os.PathLike,
    words: Iterable[str] = DEFAULT_WORDS,
    seed: int = 0,
    with_t5: bool = True,
    text_widths: tuple[int, int] = (32, 48),
    projection_dims: tuple[int, int] = (24, 40),
    t5_width: int = 96,
    sample_size: int = 32,
    num_layers: int = 3,
    attention_heads: int = 2,
    attention_head_dim: int = 10,
    dual_attention_layers: Sequence[int] = (),
    qk_norm: str | None = None,
    vae_channels: Sequence[int] = (16, 32),
    text_layers: int | tuple[int, int] = 2,
    text_heads: int | tuple[int, int] = 4,
    text_acts: tuple[str, str] = ("quick_gelu", "gelu"),
    t5_layers: int = 2,
    t5_heads: int = 4,
    t5_ff: int | None = None,
    t5_buckets: tuple[int, int] = (8, 32),
    shift: float = SD3_SHIFT,
    pos_embed_max_size: int | None = None,
    vae_layers_per_block: int = 1,
    vae_norm_groups: int | None = None,
) -> Path:
    """Build and ``save_pretrained`` a tiny SD3-shaped pipeline folder (safetensors); return its path.

    ``sample_size`` is in pixels; the latent (``sample_size / 2`` with the default 2x VAE) must be
    divisible by the patch size 2. ``t5_width`` is the transformer's ``joint_attention_dim`` with or
    without T5 (the pipeline feeds zeros of that width when T5 is dropped), so both variants of one
    ``seed`` have the same transformer and CLIP encoders. Defaults: CLIP widths 32 and 48 (context
    channels 80, zero-padded to 96), pooled 24 + 40 = 64, MMDiT width 2 x 10 = 20, all distinct so a
    mix-up fails on a shape (real SD3: projection width = CLIP width). SD3.5-Medium-like blocks:
    ``dual_attention_layers=(0, 1), qk_norm="rms_norm"``. ValueError for widths that do not fit.

    ``text_layers`` / ``text_heads`` are one value for both CLIPs or one per CLIP; with ``t5_ff`` (T5's
    gated MLP width, default ``2 * t5_width``), ``t5_buckets``, ``pos_embed_max_size`` (default: twice the
    latent, in patches), ``vae_layers_per_block`` and ``vae_norm_groups`` (default: the narrowest VAE block)
    the same function builds SD3-Medium's shapes at real size (``benchmarks/step_time.py --sd3-shaped``).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    patch = 2
    latent = sample_size // 2 ** (len(vae_channels) - 1)
    if latent % patch:
        raise ValueError(f"sample_size {sample_size} px gives latent {latent}, not divisible by the patch size {patch}")
    if t5_width < sum(text_widths):
        raise ValueError(f"t5_width {t5_width} (joint_attention_dim) must be >= the CLIP widths' sum "
                         f"{sum(text_widths)}")
    if any(d not in range(num_layers) for d in dual_attention_layers):
        raise ValueError(f"dual_attention_layers {tuple(dual_attention_layers)} must be block indices < {num_layers}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_3 = build_t5_tokenizer(words, out / "tokenizer_3") if with_t5 else None
    with torch.random.fork_rng(devices=[]):  # seed the weights without touching the caller's RNG
        clip = _clip_pair(words, out, text_widths, projection_dims, text_layers, text_heads, text_acts, seed)
        vae = _mmdit_vae(vae_channels, seed + 2, SD3_VAE_SCALING, SD3_VAE_SHIFT, layers_per_block=vae_layers_per_block,
                         norm_num_groups=vae_norm_groups)
        transformer = build_tiny_sd3_transformer(
            num_layers=num_layers, dual_attention_layers=dual_attention_layers, seed=seed + 3, sample_size=latent,
            in_channels=SD3_LATENT_CHANNELS, joint_attention_dim=t5_width, pooled_projection_dim=sum(projection_dims),
            heads=attention_heads, head_dim=attention_head_dim, qk_norm=qk_norm,
            pos_embed_max_size=pos_embed_max_size or 2 * latent // patch)  # default: images up to twice sample_size
        text_encoder_3 = (_t5_encoder(tokenizer_3, t5_width, t5_layers, t5_heads, seed + 4, t5_ff, t5_buckets)
                          if with_t5 else None)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=vae,
        **clip,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_sd3_transformer(
    num_layers: int = 4,
    dual_attention_layers: Sequence[int] = (),
    seed: int = 0,
    sample_size: int = 8,
    in_channels: int = 4,
    joint_attention_dim: int = 24,
    pooled_projection_dim: int = 16,
    heads: int = 2,
    head_dim: int = 8,
    qk_norm: str | None = None,
    pos_embed_max_size: int | None = None,
):
    """An fp32, eval-mode ``SD3Transformer2DModel``: latents ``[N, in_channels, sample_size,
    sample_size]`` (patch size 2), text ``[N, T, joint_attention_dim]``, pooled
    ``[N, pooled_projection_dim]``; the stream width (``caption_projection_dim``) is ``heads *
    head_dim``, as the joint attention requires. ``pos_embed_max_size`` defaults to ``sample_size``.
    The same ``seed`` gives the same weights, and the global RNG is left as it was."""
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(
            sample_size=sample_size, patch_size=2, in_channels=in_channels, num_layers=num_layers,
            attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint_attention_dim,
            caption_projection_dim=heads * head_dim, pooled_projection_dim=pooled_projection_dim,
            out_channels=in_channels, pos_embed_max_size=pos_embed_max_size or sample_size,
            dual_attention_layers=tuple(dual_attention_layers), qk_norm=qk_norm)
    return model.float().eval()
