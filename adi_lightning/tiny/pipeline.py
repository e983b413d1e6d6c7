"""A tiny, randomly initialised Stable Diffusion 1.x pipeline folder, built offline in seconds.

Why: every code path of the framework (layer-wise identifier overlay, per-layer ``attn2`` routing,
gradient masking, sampling through the stock ``StableDiffusionPipeline``) must run in tests and in a
CPU demo without the hub. The UNet keeps SD 1.x's cross-attention topology (3 cross-attn down
blocks, cross-attn mid block, 3 cross-attn up blocks, 2 layers per block => 16 ``attn2``), only with
tiny widths, so the number of layers L and the text width D are read from the model exactly as for
the real checkpoint. The weights are random: images are noise-like, but shapes, names and APIs match.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .tokenizer import build_clip_tokenizer

#: Words of the tiny vocabulary: prompt templates, subjects, actions, colours and dataset contexts.
#: "close-up" tokenises as close / - / up ("-" is a base byte symbol).
DEFAULT_WORDS: tuple[str, ...] = (
    # templates
    "a", "an", "photo", "picture", "rendering", "image", "cropped", "close", "up", "of", "one",
    "the", "good", "nice", "small", "large", "clean", "dark", "bright", "weird", "cool",
    "doing", "is", "and", "at", "by",
    # subjects
    "person", "someone", "man", "woman", "child", "boy", "girl", "dog", "cat", "corgi",
    "horse", "bird", "panda", "monkey", "bear", "subject",
    # actions
    "jumping", "standing", "sitting", "waving", "squatting", "kicking", "raising", "raise",
    "hands", "hand", "both", "arms", "handstand", "lying", "down", "running",
    "walking", "dancing", "action", "pose",
    # relations and scene words used in captions
    "in", "on", "with", "background", "scene", "park", "beach", "room", "street", "field",
    # colours
    "red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "pink",
    "brown",
)

SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def _text_encoder(tokenizer, width: int, layers: int, heads: int, seed: int, projection_dim: int | None = None,
                  hidden_act: str = "quick_gelu"):
    """A random CLIP text encoder (MLP 4x wide, as CLIP's); with ``projection_dim``, a
    ``CLIPTextModelWithProjection`` (SDXL's second, OpenCLIP bigG: ``hidden_act="gelu"``)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # bos/eos/pad ids must be the tokenizer's: CLIP pools the hidden state at the first eos id
    # (the legacy argmax path is only taken when eos_token_id == 2).
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=width * 4,
        projection_dim=projection_dim or width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act=hidden_act,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection_dim else CLIPTextModel)(config).eval()


def _clip_pair(words: Iterable[str], out: Path, widths: tuple[int, int], projection_dims: tuple[int | None, int],
               text_layers: int | tuple[int, int], text_heads: int | tuple[int, int], text_acts: tuple[str, str],
               seed: int) -> dict:
    """SDXL's and SD3's two CLIP text encoders (ViT-L, then OpenCLIP bigG) of ``widths``, with their tokenizers
    built into ``out / "tokenizer"`` and ``out / "tokenizer_2"`` (``tokenizer_2`` pads with ``!``, as
    OpenCLIP bigG's): the pipeline's ``tokenizer``, ``tokenizer_2``, ``text_encoder`` and ``text_encoder_2``
    by component name. ``projection_dims``: each encoder's projection width, None for a ``CLIPTextModel``
    (:func:`_text_encoder`); ``text_layers`` / ``text_heads``: one value for both or one per encoder. The
    weights are seeded ``seed`` and ``seed + 1`` (they reseed the global RNG: call under ``fork_rng``)."""
    tokenizer = build_clip_tokenizer(words, out / "tokenizer")
    tokenizer_2 = build_clip_tokenizer(words, out / "tokenizer_2")
    tokenizer_2.pad_token = "!"  # OpenCLIP bigG pads with "!" (SDXL's and SD3's tokenizer_2)
    layers, heads = ((v, v) if isinstance(v, int) else tuple(v) for v in (text_layers, text_heads))
    encoders = [_text_encoder(tok, widths[i], layers[i], heads[i], seed + i, projection_dims[i],
                              hidden_act=text_acts[i]) for i, tok in enumerate((tokenizer, tokenizer_2))]
    return dict(tokenizer=tokenizer, tokenizer_2=tokenizer_2, text_encoder=encoders[0], text_encoder_2=encoders[1])


def _vae(block_out_channels: Sequence[int], seed: int, scaling_factor: float = 0.18215, latent_channels: int = 4,
         layers_per_block: int = 1, norm_num_groups: int | None = None, **config):
    """A random ``AutoencoderKL`` (``norm_num_groups`` defaults to the narrowest block's width); ``config``
    adds its other settings (SD3: ``shift_factor``, no quant convs)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups or min(block_out_channels),
        sample_size=32,
        scaling_factor=scaling_factor,
        **config,
    ).eval()


def _unet(
    cross_attention_dim: int,
    latent_size: int,
    block_out_channels: Sequence[int],
    layers_per_block: int,
    attention_heads: int,
    norm_num_groups: int,
    seed: int,
):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        # diffusers' SD 1.x naming quirk: ``attention_head_dim`` is the number of heads per block.
        attention_head_dim=attention_heads,
        norm_num_groups=norm_num_groups,
        cross_attention_dim=cross_attention_dim,
    ).eval()



def build_tiny_pipeline(
    out_dir: str | os.PathLike,
    words: Iterable[str] = DEFAULT_WORDS,
    seed: int = 0,
    cross_attention_dim: int = 32,
    sample_size: int = 32,
    layers_per_block: int = 2,
    unet_channels: Sequence[int] = (16, 32, 32, 32),
    vae_channels: Sequence[int] = (16, 32),
    attention_heads: int = 2,
    text_layers: int = 2,
    text_heads: int = 4,
) -> Path:
    """Build and ``save_pretrained`` a tiny SD 1.x-style pipeline folder (safetensors); return its path.

    ``sample_size`` is the image resolution in pixels. The VAE downsamples by
    ``2 ** (len(vae_channels) - 1)`` and the UNet by 8, so the latent size must be a multiple of 8
    (32 px with the default 2x VAE gives a 16x16 latent, 2x2 at the UNet bottom).
    ``layers_per_block`` 2 gives 16 ``attn2`` layers (as SD 1.x); 1 gives 10 (faster tests).
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    vae_factor = 2 ** (len(vae_channels) - 1)
    latent = sample_size // vae_factor
    if sample_size % vae_factor or latent % 8:
        raise ValueError(
            f"sample_size {sample_size} px gives latent {sample_size / vae_factor:g} with a "
            f"{vae_factor}x VAE; the UNet's 3 downsamplings need a latent divisible by 8"
        )
    if cross_attention_dim % text_heads:
        raise ValueError(f"text width {cross_attention_dim} is not divisible by {text_heads} heads")
    if any(c % attention_heads for c in unet_channels):
        raise ValueError(f"UNet channels {tuple(unet_channels)} not divisible by {attention_heads} heads")
    groups = min(min(unet_channels), 8)
    if any(c % groups for c in unet_channels) or any(c % min(vae_channels) for c in vae_channels):
        raise ValueError("channel counts must be divisible by the group-norm group counts")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The tokenizer is built straight into the folder; save_pretrained rewrites it identically.
    tokenizer = build_clip_tokenizer(words, out / "tokenizer")
    with torch.random.fork_rng(devices=[]):  # seed the weights without touching the caller's RNG
        text_encoder = _text_encoder(tokenizer, cross_attention_dim, text_layers, text_heads, seed)
        vae = _vae(vae_channels, seed + 1)
        unet = _unet(
            cross_attention_dim, latent, unet_channels, layers_per_block, attention_heads, groups, seed + 2
        )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out
