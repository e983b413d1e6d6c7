"""Layer-wise conditioning: one prompt encoding per cross-attention layer (ADI Part 1).

Layers that share an identifier row (``model.row_groups``, :func:`group_layers`) share one
encoding, computed once per row. The L per-layer encodings travel concatenated along the token axis as ordinary
``encoder_hidden_states`` of shape ``[B, L*T, D]``; the processor installed on ``attn2``
number ``l`` attends to its own slice ``[:, l*T:(l+1)*T]``. Injection is by module path, never
by call order, so gradient checkpointing, ``torch.compile`` and the stock
``StableDiffusionPipeline`` (through ``prompt_embeds``) all see the same routing.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from adi_lightning.identifier import IdentifierTokenEmbedding

_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
#: How cross-attention layers share identifier rows (``model.row_groups``, :func:`group_layers`).
RowGroups = Literal["layer", "attention", "resolution", "shared"]
ROW_GROUPS: tuple[str, ...] = get_args(RowGroups)


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


def resolve_row_groups(layerwise: bool, row_groups: str | None) -> str:
    """The effective ``model.row_groups``: ``row_groups`` when given, else ``layer`` (``layerwise``)
    or ``shared`` (``layerwise: false``, Textual Inversion). ``layerwise: false`` is an alias of
    ``row_groups: shared``; with any other ``row_groups`` it is refused (ValueError)."""
    if row_groups is not None and row_groups not in ROW_GROUPS:
        raise ValueError(f"model.row_groups must be one of {', '.join(ROW_GROUPS)}, got {row_groups!r}")
    if not layerwise and row_groups not in (None, "shared"):
        raise ValueError(f"model.layerwise=false means model.row_groups=shared (Textual Inversion) and cannot be "
                         f"combined with model.row_groups={row_groups}: drop model.layerwise")
    return row_groups or ("layer" if layerwise else "shared")


def _group_key(path: str, row_groups: str, levels: int) -> object:
    if row_groups == "layer":
        return path
    if row_groups == "attention":  # one Transformer2DModel: ``<block>.attentions.<k>``
        return re.sub(r"\.transformer_blocks\.\d+\.attn2$", "", path)
    if row_groups == "resolution":  # down i and up levels-1-i run at the same size; mid at the coarsest
        head, _, rest = path.partition(".")
        index = int(rest.split(".", 1)[0]) if head != "mid_block" else 0
        return {"down_blocks": index, "mid_block": levels - 1, "up_blocks": levels - 1 - index}[head]
    return 0


def group_layers(layer_paths: list[str], row_groups: str, levels: int) -> torch.Tensor:
    """``layer_to_row`` ``[L]`` int64: the identifier row of each ``attn2`` path (rows numbered in
    order of first use). ``row_groups``: ``layer`` (one row per layer, P+/ADI), ``attention`` (one
    per attention module: the ``transformer_blocks`` of one Transformer2DModel share it),
    ``resolution`` (one per UNet resolution level; ``levels`` = ``len(unet.config.block_out_channels)``)
    or ``shared`` (one row, Textual Inversion)."""
    if row_groups not in ROW_GROUPS:
        raise ValueError(f"row_groups must be one of {', '.join(ROW_GROUPS)}, got {row_groups!r}")
    keys = [_group_key(path, row_groups, levels) for path in layer_paths]
    rows = {key: row for row, key in enumerate(dict.fromkeys(keys))}
    return torch.tensor([rows[key] for key in keys], dtype=torch.int64)


def layer_rows(layers: int | torch.Tensor, rows: int) -> torch.Tensor:
    """``layer_to_row`` ``[L]`` from ``layers`` (itself, or an int L: one row per layer when
    ``rows == L``, one shared row when ``rows == 1``); ValueError when ``rows`` does not fit."""
    if isinstance(layers, int):
        if rows not in (1, layers):
            raise ValueError(f"identifier has {rows} rows; the UNet has {layers} cross-attention layers")
        return torch.arange(layers) if rows == layers else torch.zeros(layers, dtype=torch.int64)
    if rows != int(layers.max()) + 1:
        raise ValueError(f"identifier has {rows} rows; its layer_to_row uses {int(layers.max()) + 1}")
    return layers


def count_layers(layers: int | torch.Tensor) -> int:
    """L, from an int or a ``layer_to_row`` ``[L]``."""
    return layers if isinstance(layers, int) else len(layers)


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



def encode_layerwise(
    text_encoder: nn.Module,
    overlay: IdentifierTokenEmbedding,
    input_ids: torch.Tensor,
    rows: torch.Tensor,
    layers: int | torch.Tensor,
) -> torch.Tensor:
    """Encode each prompt once per identifier row in ONE text-encoder call.

    Args:
        input_ids: ``[N, T]`` token ids (the placeholder id marks where the identifier goes).
        rows: ``[N, R, D]`` identifier rows per prompt (R groups of layers, :func:`group_layers`).
        layers: ``layer_to_row`` ``[L]`` (the row of each ``attn2`` layer), or L (:func:`layer_rows`).

    Returns:
        ``[N, L*T, D_text]``: each layer's row encoding, concatenated along the token axis (the
        encoding of a row is computed once and reused by every layer of its group).
    """
    output, r = call_with_rows(text_encoder, overlay, input_ids, rows, layers)
    return spread_over_layers(output[0], r, layers)


def call_with_rows(text_encoder: nn.Module, overlay: IdentifierTokenEmbedding, input_ids: torch.Tensor,
                   rows: torch.Tensor, layers: int | torch.Tensor, **kwargs) -> tuple[object, int]:
    """``(text_encoder output, R)`` for the ``[N, T]`` prompts each repeated once per identifier
    row (``rows`` ``[N, R, D]``, R fitting ``layers``), the placeholder embedding as that row: one
    encoder call over ``N*R`` prompts, prompt-major. ``kwargs`` go to the encoder."""
    n, r, d = rows.shape
    if n != input_ids.shape[0]:
        raise ValueError(f"{input_ids.shape[0]} prompts but identifier rows for {n}")
    layer_rows(layers, r)
    ids = input_ids.repeat_interleave(r, dim=0)
    with overlay.rows(rows.reshape(n * r, d)):
        return text_encoder(ids, **kwargs), r


def spread_over_layers(hidden: torch.Tensor, rows: int, layers: int | torch.Tensor) -> torch.Tensor:
    """``[N*R, T, C]`` per-row encodings (prompt-major) -> ``[N, L*T, C]`` along the token axis,
    layer l getting its row's encoding (``layer_rows(layers, R)[l]``)."""
    n, tokens = hidden.shape[0] // rows, hidden.shape[1]
    index = layer_rows(layers, rows).to(hidden.device)
    if rows == len(index) and bool((index == torch.arange(rows, device=index.device)).all()):
        return hidden.reshape(n, rows * tokens, hidden.shape[-1])  # one row per layer: a view
    hidden = hidden.reshape(n, rows, tokens, hidden.shape[-1]).index_select(1, index)
    return hidden.reshape(n, len(index) * tokens, hidden.shape[-1])


def encode_plain(text_encoder: nn.Module, input_ids: torch.Tensor, layers: int | torch.Tensor) -> torch.Tensor:
    """Encode prompts without the identifier (e.g. the empty negative prompt), repeated L times."""
    hidden = text_encoder(input_ids)[0]
    return hidden.repeat(1, count_layers(layers), 1)
