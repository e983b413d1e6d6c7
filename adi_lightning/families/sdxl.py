"""SDXL (diffusers ``StableDiffusionXLPipeline``): two CLIP text encoders and added conditions.

As ``StableDiffusionXLPipeline.encode_prompt``: ``text_encoder`` (CLIP ViT-L, ``CLIPTextModel``) and
``text_encoder_2`` (OpenCLIP bigG, ``CLIPTextModelWithProjection``) each give their penultimate
hidden state (``hidden_states[-2]``); the UNet context is both concatenated on channels,
``[N, T, D1 + D2]``; the projected EOS embedding of ``text_encoder_2`` (``text_embeds`` ``[N, P]``)
and six time ids (original size, crop top-left, target size) enter through ``added_cond_kwargs``.

Layer-wise (ADI / P+): an identifier row is ``[D1 + D2]``, one vector per text encoder; layer l's
context is both encoders' encodings with layer l's row (``model.row_groups``), ``[N, L*T, D1 + D2]``
along the token axis as for SD. The pooled embedding is global (added to the time embedding of
every ResNet), so it cannot be per layer: it is the pooled encoding with the row of ONE layer,
:func:`pooled_layer_index` (the first mid-block cross-attention layer, where the UNet is at its coarsest; the middle layer in path
order if there is no mid block). That row trains through both its group's contexts and the pooled
embedding. Textual Inversion (one shared row) uses that row everywhere.

Stock-pipeline details kept on both paths: ``force_zeros_for_empty_prompt`` (the unconditional
context and pooled embedding are zeros), time ids ``(H, W, 0, 0, H, W)`` for ``H x W`` images (the
pipeline's default at that size; training images are centre crops at the training resolution), and
the VAE's ``force_upcast`` (a float16 VAE encodes in float32).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPTextModelOutput

from adi_lightning.conditioning import (call_with_rows, count_layers, cross_attention_layers, layer_rows,
                                        spread_over_layers)
from adi_lightning.families.base import BackboneFamily, Features, TextEncoderStandIn
from adi_lightning.identifier import token_embedding_owner
from adi_lightning.prompts import tokenize


def pooled_layer_index(layer_paths: list[str]) -> int:
    """Index of the layer whose identifier row the pooled (global) text embedding sees: the first
    ``mid_block`` path, else ``L // 2`` (``layer_paths`` in :func:`cross_attention_layers` order)."""
    mid = [i for i, path in enumerate(layer_paths) if path.startswith("mid_block")]
    return mid[0] if mid else len(layer_paths) // 2


def encode_part(encoder: nn.Module, ids: torch.Tensor, rows: torch.Tensor | None, layers: int | torch.Tensor,
                pooled_layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One SDXL text encoder: ``(penultimate hidden state [N, L*T, D_i], text_embeds [N, P] or None)``.

    ``ids`` ``[N, T]``; ``rows`` ``[N, R, D_i]`` (None: plain prompts, encoded once for all layers);
    ``layers``: ``layer_to_row`` ``[L]`` or L (:func:`~adi_lightning.conditioning.layer_rows`); the
    pooled embedding (``CLIPTextModelWithProjection`` only) is the one of layer ``pooled_layer``'s row.
    """
    if rows is None:
        output, r = encoder(ids, output_hidden_states=True), 1
    else:
        output, r = call_with_rows(encoder, token_embedding_owner(encoder).token_embedding, ids, rows, layers,
                                   output_hidden_states=True)
    hidden = spread_over_layers(output.hidden_states[-2], r, layers if rows is not None else count_layers(layers))
    pooled = getattr(output, "text_embeds", None)
    if pooled is not None:
        row = int(layer_rows(layers, r)[pooled_layer]) if rows is not None else 0
        pooled = pooled.reshape(ids.shape[0], r, -1)[:, row]
    return hidden, pooled


class LayerwiseTextEncoderXL(TextEncoderStandIn):
    """Stands in for ``pipe.text_encoder`` / ``pipe.text_encoder_2`` of ``StableDiffusionXLPipeline``.

    ``encode_prompt`` calls it with ``output_hidden_states=True`` and reads ``hidden_states[-2]``
    (here the layer-wise ``[B, L*T, D_i]``) and, from ``text_encoder_2``, ``[0]`` (``text_embeds``,
    the pooled embedding of :func:`pooled_layer_index`'s row). ``clip_skip`` is not supported.
    """

    def __init__(self, text_encoder: nn.Module, table: torch.Tensor, placeholder_id: int, layers: int | torch.Tensor,
                 pooled_layer: int):
        super().__init__(text_encoder, table, placeholder_id, layers)
        self.pooled_layer = pooled_layer

    def forward(self, input_ids: torch.Tensor, attention_mask=None, output_hidden_states=None, **kwargs):
        # A negative prompt is tokenized to the positive embedding's length (L*T): keep the first T.
        input_ids = input_ids[:, : self.text_encoder.config.max_position_embeddings]
        rows = None
        if bool((input_ids == self.placeholder_id).any()):
            rows = self.table.unsqueeze(0).expand(input_ids.shape[0], *self.table.shape)
        hidden, pooled = encode_part(self.text_encoder, input_ids, rows, self.layers, self.pooled_layer)
        if pooled is None:
            return BaseModelOutputWithPooling(last_hidden_state=hidden, hidden_states=(hidden, None))
        return CLIPTextModelOutput(text_embeds=pooled, last_hidden_state=hidden, hidden_states=(hidden, None))


class StableDiffusionXLFamily(BackboneFamily):
    """SDXL: features are ``(context [N, L*T, D1+D2], pooled [N, P])``; the UNet also gets
    ``added_cond_kwargs`` (``text_embeds``, ``time_ids``)."""

    pipeline_class_name = "StableDiffusionXLPipeline"
    img2img_class_name = "StableDiffusionXLImg2ImgPipeline"
    name = "sdxl"
    text_parts = ("text_encoder", "text_encoder_2")
    tokenizer_parts = ("tokenizer", "tokenizer_2")

    @property
    def pooled_layer(self) -> int:
        """The layer whose row the pooled embedding sees (:func:`pooled_layer_index`)."""
        return pooled_layer_index(list(cross_attention_layers(self.unet)))

    def tokenize(self, prompts: list[str], device: torch.device | None = None) -> torch.Tensor:
        """``[N, 2, T]``: both tokenizers' ids (their padding differs: ``tokenizer_2`` pads with ``!``)."""
        return torch.stack([tokenize(tokenizer, prompts, device) for tokenizer in self.tokenizers], dim=1)

    def encode_text(self, ids: torch.Tensor, rows: torch.Tensor | None, layers: int | torch.Tensor) -> Features:
        """``(context [N, L*T, D1+D2], pooled [N, P])`` (see the module docstring)."""
        parts = self.split_rows(rows) if rows is not None else (None, None)
        pooled_layer = self.pooled_layer
        hidden_1, _ = encode_part(self.text_encoders[0], ids[:, 0], parts[0], layers, pooled_layer)
        hidden_2, pooled = encode_part(self.text_encoders[1], ids[:, 1], parts[1], layers, pooled_layer)
        return torch.cat([hidden_1, hidden_2], dim=-1), pooled

    def negative(self, count: int, layers: int | torch.Tensor, device: torch.device | None = None) -> Features:
        """Zeros when the pipeline's ``force_zeros_for_empty_prompt`` (SDXL base), else the encoding of ``""``."""
        if not self.pipe.config.get("force_zeros_for_empty_prompt", True):
            return super().negative(count, layers, device)
        encoder = self.text_encoders[1]
        tokens = count_layers(layers) * self.tokenizer.model_max_length
        return (torch.zeros(count, tokens, self.identifier_dim, dtype=encoder.dtype, device=device),
                torch.zeros(count, encoder.config.projection_dim, dtype=encoder.dtype, device=device))

    def denoiser_inputs(self, features: Features, dtype: torch.dtype, size: tuple[int, int]) -> dict:
        """Context, pooled ``text_embeds`` and ``time_ids`` ``(H, W, 0, 0, H, W)`` for ``size = (H, W)``."""
        context, pooled = features
        time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=dtype, device=context.device).repeat(context.shape[0], 1)
        return {"encoder_hidden_states": context.to(dtype),
                "added_cond_kwargs": {"text_embeds": pooled.to(dtype), "time_ids": time_ids}}

    def pipeline_inputs(self, features: Features, negative: Features, dtype: torch.dtype) -> dict:
        return {"prompt_embeds": features[0].to(dtype), "negative_prompt_embeds": negative[0].to(dtype),
                "pooled_prompt_embeds": features[1].to(dtype), "negative_pooled_prompt_embeds": negative[1].to(dtype)}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """As the base, in float32 when the VAE is float16 and ``vae.config.force_upcast`` (as the
        SDXL pipelines and training scripts: the SDXL VAE overflows in float16)."""
        if not (self.vae.dtype == torch.float16 and self.vae.config.get("force_upcast", False)):
            return super().encode_images(pixels)
        self.vae.to(torch.float32)
        try:
            return super().encode_images(pixels)
        finally:
            self.vae.to(torch.float16)

    def layerwise_text_encoder(self, index, encoder, rows, placeholder_id, layers) -> nn.Module:
        return LayerwiseTextEncoderXL(encoder, rows, placeholder_id, layers, self.pooled_layer)
