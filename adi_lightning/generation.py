"""Use a learned identifier from plain Python, with the stock diffusers pipeline.

    pipe = StableDiffusionPipeline.from_pretrained("models/stable-diffusion-v1-5")
    adi_lightning.install_identifier(pipe, "identifier.safetensors")
    image = pipe("a photo of a corgi <A>").images[0]
    adi_lightning.remove_identifier(pipe)

``install_identifier`` adds the placeholder to the tokenizer, puts the identifier overlay into
the text encoder, a :class:`LayerwiseCrossAttnProcessor` on every ``attn2``, and wraps the text
encoder so that every prompt (negative prompts too, hence classifier-free guidance) comes out as
the L per-layer encodings concatenated along the token axis.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from adi_lightning.conditioning import (
    cross_attention_layers,
    tokenize,
    encode_layerwise,
    encode_plain,
    install_layerwise_processors,
    remove_layerwise_processors,
)
from adi_lightning.prompts import check_identifier_prompts
from adi_lightning.identifier import (
    add_placeholder_token,
    install_overlay,
    read_identifier,
    remove_overlay,
    rows_for_layers,
)


class LayerwiseTextEncoder(nn.Module):
    """Stands in for ``pipe.text_encoder``: ``[B, T]`` ids in, ``[B, L*T, D]`` encodings out.

    Prompts containing the placeholder are encoded once per identifier row in one call; other
    prompts (e.g. the negative prompt) are encoded once and repeated for every layer.
    """

    def __init__(self, text_encoder: nn.Module, table: torch.Tensor, placeholder_id: int, num_layers: int):
        super().__init__()
        self.text_encoder = text_encoder
        self.register_buffer("table", table.detach().float().clone(), persistent=False)
        self.placeholder_id = placeholder_id
        self.num_layers = num_layers

    @property
    def config(self):
        return self.text_encoder.config

    @property
    def dtype(self) -> torch.dtype:
        return self.text_encoder.dtype

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    def forward(self, input_ids: torch.Tensor, attention_mask=None, output_hidden_states=None, **kwargs):
        if output_hidden_states:
            raise ValueError("clip_skip / hidden states are not supported with a layer-wise identifier")
        # The stock pipeline tokenizes the negative prompt to the positive embedding's length
        # (L*T): the first T tokens are the ordinary T-token encoding of it.
        input_ids = input_ids[:, : self.text_encoder.config.max_position_embeddings]
        if bool((input_ids == self.placeholder_id).any()):
            rows = self.table.unsqueeze(0).expand(input_ids.shape[0], *self.table.shape)
            overlay = self.text_encoder.embeddings.token_embedding
            hidden = encode_layerwise(self.text_encoder, overlay, input_ids, rows, self.num_layers)
        else:
            hidden = encode_plain(self.text_encoder, input_ids, self.num_layers)
        return BaseModelOutputWithPooling(last_hidden_state=hidden)


def stock_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """A ``StableDiffusionPipeline`` over already loaded components (no safety checker)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_embeddings(text_encoder, tokenizer, prompts: list[str], num_layers: int,
                      rows: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds, negative_prompt_embeds)``, each ``[N, L*T, D]``: the prompts with the
    identifier ``rows`` ``[N, R, D]`` (None: plain prompts) and the empty negative prompt. Raises
    ValueError for a prompt whose identifier would be cut off or is joined to a word
    (:func:`adi_lightning.prompts.check_identifier_prompts`)."""
    device = text_encoder.device
    ids = tokenize(tokenizer, prompts, device)
    if rows is None:
        embeds = encode_plain(text_encoder, ids, num_layers)
    else:
        overlay = text_encoder.embeddings.token_embedding
        token = tokenizer.convert_ids_to_tokens(overlay.placeholder_id)
        check_identifier_prompts(tokenizer, token, overlay.placeholder_id, prompts, "prompt")
        embeds = encode_layerwise(text_encoder, overlay, ids, rows, num_layers)
    negative = encode_plain(text_encoder, tokenize(tokenizer, [""] * len(prompts), device), num_layers)
    return embeds.to(dtype), negative.to(dtype)


def run_seeded(pipe, embeds: torch.Tensor, negative: torch.Tensor, seeds: list[int], image=None, **kwargs) -> list:
    """One image per (embedding, seed), each from its own seeded generator (so a grid cell does
    not depend on the batch it was generated in)."""
    outputs = []
    for i, seed in enumerate(seeds):
        generator = torch.Generator(pipe.device).manual_seed(int(seed))
        extra = {} if image is None else {"image": image[i]}
        out = pipe(prompt_embeds=embeds[i : i + 1], negative_prompt_embeds=negative[i : i + 1],
                   generator=generator, output_type="pil", **extra, **kwargs)
        outputs.append(out.images[0])
    return outputs


@dataclass
class _Installed:
    tokenizer: object
    text_encoder: nn.Module
    processors: dict


def install_identifier(pipe, identifier_path: str | Path, token: str | None = None):
    """Make ``pipe`` accept prompts with the identifier's placeholder (e.g. ``<A>``).

    Args:
        pipe: A diffusers Stable Diffusion pipeline (SD 1.x / 2.x).
        identifier_path: An ``identifier.safetensors`` written by adi-lightning.
        token: The placeholder to use in prompts; defaults to the one saved in the file.

    Raises a clear error if the pipeline's ``attn2`` layers or text width differ from the file's.
    Returns the pipeline (changed in place).
    """
    if getattr(pipe, "_adi_installed", None) is not None:
        remove_identifier(pipe)
    table, meta = read_identifier(identifier_path)
    layer_paths = list(cross_attention_layers(pipe.unet))
    rows = rows_for_layers(identifier_path, table, meta, layer_paths, pipe.text_encoder.config.hidden_size)
    token = token or meta.get("placeholder_token") or "<A>"

    saved = _Installed(pipe.tokenizer, pipe.text_encoder, {})
    tokenizer = copy.deepcopy(pipe.tokenizer)  # the original is restored untouched on removal
    placeholder_id = add_placeholder_token(tokenizer, token)
    install_overlay(pipe.text_encoder, placeholder_id)
    saved.processors = install_layerwise_processors(pipe.unet)
    wrapper = LayerwiseTextEncoder(pipe.text_encoder, rows.to(pipe.text_encoder.device), placeholder_id, len(layer_paths))
    pipe.tokenizer = tokenizer
    pipe.text_encoder = wrapper
    pipe._adi_installed = saved
    return pipe


def remove_identifier(pipe):
    """Undo :func:`install_identifier`: the pipeline's outputs are exactly the original ones."""
    saved = getattr(pipe, "_adi_installed", None)
    if saved is None:
        return pipe
    remove_layerwise_processors(pipe.unet, saved.processors)
    remove_overlay(saved.text_encoder)
    pipe.tokenizer = saved.tokenizer
    pipe.text_encoder = saved.text_encoder
    pipe._adi_installed = None
    return pipe
