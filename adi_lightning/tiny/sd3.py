"""A tiny, randomly initialised SD3 MMDiT (``SD3Transformer2DModel``), built offline in milliseconds.

SD3's topology with tiny widths: a patch embedding, the pooled-text + timestep embedding, the
``context_embedder`` (joint attention width -> stream width) and ``num_layers`` joint blocks
(``JointTransformerBlock``), the last one ``context_pre_only``; ``dual_attention_layers`` gives
those blocks SD3.5's second, image-only self-attention (``attn2``). The weights are random, so
outputs are noise, but shapes, module paths and the forward pass are diffusers' own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
):
    """An fp32, eval-mode ``SD3Transformer2DModel``: latents ``[N, in_channels, sample_size,
    sample_size]`` (patch size 2), text ``[N, T, joint_attention_dim]``, pooled
    ``[N, pooled_projection_dim]``; the stream width (``caption_projection_dim``) is ``heads *
    head_dim``, as the joint attention requires. The same ``seed`` gives the same weights, and the
    global RNG is left as it was."""
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(
            sample_size=sample_size, patch_size=2, in_channels=in_channels, num_layers=num_layers,
            attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint_attention_dim,
            caption_projection_dim=heads * head_dim, pooled_projection_dim=pooled_projection_dim,
            out_channels=in_channels, pos_embed_max_size=sample_size,
            dual_attention_layers=tuple(dual_attention_layers))
    return model.float().eval()
