"""Layer-wise conditioning: one prompt encoding per cross-attention layer (ADI Part 1).

The L per-layer encodings travel concatenated along the token axis as ordinary
``encoder_hidden_states`` of shape ``[B, L*T, D]``; the processor installed on ``attn2``
number ``l`` attends to its own slice ``[:, l*T:(l+1)*T]``. Injection is by module path, never
by call order, so gradient checkpointing, ``torch.compile`` and the stock
``StableDiffusionPipeline`` (through ``prompt_embeds``) all see the same routing.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

if TYPE_CHECKING:
    from adi_lightning.identifier import IdentifierTokenEmbedding

_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def _path_key(path: str) -> tuple:
    """Sort key following the UNet's data flow: down blocks, mid block, up blocks, numerically."""
    head = path.split(".", 1)[0]
    numbers = tuple(int(n) for n in re.findall(r"\.(\d+)(?=\.|$)", path))
    return (_BLOCK_ORDER.get(head, 3), head, numbers, path)


def cross_attention_layers(unet: nn.Module) -> dict[str, Attention]:
    """Every ``attn2`` (cross-attention) module of the UNet, ordered by module path.

    ``unet.attn_processors`` lists the mid block last; row order must not depend on that.
    """
    found = {
        name: module
        for name, module in unet.named_modules()
        if name.endswith("attn2") and isinstance(module, Attention)
    }
    if not found:
        raise ValueError(
            "the UNet has no cross-attention ('attn2') layers: it is not a text-conditioned "
            "Stable Diffusion UNet"
        )
    return {name: found[name] for name in sorted(found, key=_path_key)}


class LayerwiseCrossAttnProcessor(nn.Module):
    """Cross-attention processor for layer ``layer_index`` of ``num_layers``.

    It slices its own ``T`` tokens out of the concatenated ``[B, L*T, D]`` context and hands
    them to an ordinary processor (``inner``, SDPA by default).
    """

    def __init__(self, layer_index: int, num_layers: int, inner=None):
        super().__init__()
        if not 0 <= layer_index < num_layers:
            raise ValueError(f"layer_index {layer_index} out of range for {num_layers} layers")
        self.layer_index = layer_index
        self.num_layers = num_layers
        self.inner = inner if inner is not None else AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError(
                f"layer-wise cross-attention layer {self.layer_index} got no encoder_hidden_states"
            )
        total = encoder_hidden_states.shape[1]
        if total % self.num_layers:
            raise ValueError(
                f"cross-attention layer {self.layer_index} expected the {self.num_layers} layer-wise "
                f"encodings concatenated along the token axis ([B, {self.num_layers}*T, D]), got "
                f"{total} tokens. Encode prompts with adi_lightning's layer-wise encoder, or remove "
                "the identifier from this pipeline first."
            )
        tokens = total // self.num_layers
        start = self.layer_index * tokens
        context = encoder_hidden_states[:, start : start + tokens]
        if attention_mask is not None and attention_mask.shape[-1] == total:
            attention_mask = attention_mask[..., start : start + tokens]
        return self.inner(attn, hidden_states, context, attention_mask, temb, **kwargs)


def install_layerwise_processors(unet: nn.Module) -> dict[str, object]:
    """Put one :class:`LayerwiseCrossAttnProcessor` on each ``attn2``; return the old processors."""
    layers = cross_attention_layers(unet)
    previous = {}
    for index, (path, module) in enumerate(layers.items()):
        previous[path] = module.processor
        inner = module.processor
        if isinstance(inner, LayerwiseCrossAttnProcessor):
            inner = inner.inner
        module.set_processor(LayerwiseCrossAttnProcessor(index, len(layers), inner))
    return previous


def remove_layerwise_processors(unet: nn.Module, previous: dict[str, object] | None = None) -> None:
    """Restore the processors :func:`install_layerwise_processors` replaced (or plain SDPA)."""
    for path, module in cross_attention_layers(unet).items():
        if isinstance(module.processor, LayerwiseCrossAttnProcessor):
            restored = (previous or {}).get(path) or module.processor.inner
            module.set_processor(restored)


def tokenize(tokenizer, prompts: list[str], device: torch.device | None = None) -> torch.Tensor:
    """Token ids ``[N, T]`` padded to the tokenizer's max length, as Stable Diffusion does."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids if device is None else ids.to(device)


def encode_layerwise(
    text_encoder: nn.Module,
    overlay: IdentifierTokenEmbedding,
    input_ids: torch.Tensor,
    rows: torch.Tensor,
    num_layers: int,
) -> torch.Tensor:
    """Encode each prompt once per identifier row in ONE text-encoder call.

    Args:
        input_ids: ``[N, T]`` token ids (the placeholder id marks where the identifier goes).
        rows: ``[N, R, D]`` identifier rows per prompt: R = num_layers (layer-wise) or 1 (one
            shared row, Textual Inversion: encoded once and repeated for every layer).
        num_layers: L, the number of ``attn2`` layers of the UNet.

    Returns:
        ``[N, L*T, D_text]``: the per-row encodings concatenated along the token axis.
    """
    output, r = call_with_rows(text_encoder, overlay, input_ids, rows, num_layers)
    return spread_over_layers(output[0], r, num_layers)


def call_with_rows(text_encoder: nn.Module, overlay: IdentifierTokenEmbedding, input_ids: torch.Tensor,
                   rows: torch.Tensor, num_layers: int, **kwargs) -> tuple[object, int]:
    """``(text_encoder output, R)`` for the ``[N, T]`` prompts each repeated once per identifier
    row (``rows`` ``[N, R, D]``, R = num_layers or 1), the placeholder embedding as that row: one
    encoder call over ``N*R`` prompts, prompt-major. ``kwargs`` go to the encoder."""
    n, r, d = rows.shape
    if n != input_ids.shape[0]:
        raise ValueError(f"{input_ids.shape[0]} prompts but identifier rows for {n}")
    if r not in (1, num_layers):
        raise ValueError(f"identifier has {r} rows; the UNet has {num_layers} cross-attention layers")
    ids = input_ids.repeat_interleave(r, dim=0)
    with overlay.rows(rows.reshape(n * r, d)):
        return text_encoder(ids, **kwargs), r


def spread_over_layers(hidden: torch.Tensor, rows: int, num_layers: int) -> torch.Tensor:
    """``[N*R, T, C]`` per-row encodings (prompt-major) -> ``[N, L*T, C]`` along the token axis;
    one shared row (R = 1) is repeated for every layer."""
    tokens = hidden.shape[1]
    hidden = hidden.reshape(hidden.shape[0] // rows, rows * tokens, hidden.shape[-1])
    if rows == 1 and num_layers > 1:
        hidden = hidden.repeat(1, num_layers, 1)
    return hidden


def encode_plain(text_encoder: nn.Module, input_ids: torch.Tensor, num_layers: int) -> torch.Tensor:
    """Encode prompts without the identifier (e.g. the empty negative prompt), repeated L times."""
    hidden = text_encoder(input_ids)[0]
    return hidden.repeat(1, num_layers, 1)
