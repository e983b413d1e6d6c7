"""Stable Diffusion 1.x / 2.x (diffusers ``StableDiffusionPipeline``): one CLIP text encoder.

A prompt becomes UNet conditioning as in ``StableDiffusionPipeline.encode_prompt``: the text
encoder's last hidden state ``[N, T, D]`` is the cross-attention context. Layer-wise, the L
per-layer encodings travel concatenated along the token axis, ``[N, L*T, D]``
(:mod:`adi_lightning.conditioning`); the unconditional embedding is the encoding of ``""``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from adi_lightning.conditioning import encode_layerwise, encode_plain
from adi_lightning.families.base import BackboneFamily, Features, TextEncoderStandIn
from adi_lightning.prompts import tokenize


class LayerwiseTextEncoder(TextEncoderStandIn):
    """Stands in for ``pipe.text_encoder``: ``[B, T]`` ids in, ``[B, L*T, D]`` encodings out.

    Prompts containing the placeholder are encoded once per identifier row in one call; other
    prompts (e.g. the negative prompt) are encoded once and repeated for every layer.
    """

    def forward(self, input_ids: torch.Tensor, attention_mask=None, output_hidden_states=None, **kwargs):
        if output_hidden_states:
            raise ValueError("clip_skip / hidden states are not supported with a layer-wise identifier")
        # The stock pipeline tokenizes the negative prompt to the positive embedding's length
        # (L*T): the first T tokens are the ordinary T-token encoding of it.
        input_ids = input_ids[:, : self.text_encoder.config.max_position_embeddings]
        if bool((input_ids == self.placeholder_id).any()):
            rows = self.table.unsqueeze(0).expand(input_ids.shape[0], *self.table.shape)
            overlay = self.text_encoder.embeddings.token_embedding
            hidden = encode_layerwise(self.text_encoder, overlay, input_ids, rows, self.layers)
        else:
            hidden = encode_plain(self.text_encoder, input_ids, self.layers)
        return BaseModelOutputWithPooling(last_hidden_state=hidden)


class StableDiffusionFamily(BackboneFamily):
    """SD 1.x / 2.x: features are ``(context [N, L*T, D],)``, the UNet gets ``encoder_hidden_states``."""

    pipeline_class_name = "StableDiffusionPipeline"
    img2img_class_name = "StableDiffusionImg2ImgPipeline"
    name = "sd"
    text_parts = ("text_encoder",)
    tokenizer_parts = ("tokenizer",)
    load_kwargs = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def tokenize(self, prompts: list[str], device: torch.device | None = None) -> torch.Tensor:
        """``[N, T]`` (:func:`adi_lightning.prompts.tokenize`)."""
        return tokenize(self.tokenizer, prompts, device)

    def encode_text(self, ids: torch.Tensor, rows: torch.Tensor | None, layers: int | torch.Tensor) -> Features:
        """``(context [N, L*T, D],)``: the last hidden state, as ``StableDiffusionPipeline``."""
        (encoder,) = self.text_encoders
        if rows is None:
            return (encode_plain(encoder, ids, layers),)
        return (encode_layerwise(encoder, self.overlay, ids, rows, layers),)

    def denoiser_inputs(self, features: Features, dtype: torch.dtype, size: tuple[int, int]) -> dict:
        return {"encoder_hidden_states": features[0].to(dtype)}

    def pipeline_inputs(self, features: Features, negative: Features, dtype: torch.dtype) -> dict:
        return {"prompt_embeds": features[0].to(dtype), "negative_prompt_embeds": negative[0].to(dtype)}

    def layerwise_text_encoder(self, index, encoder, rows, placeholder_id, layers) -> nn.Module:
        return LayerwiseTextEncoder(encoder, rows, placeholder_id, layers)
