"""Block-wise identifiers in an MMDiT (SD3, FLUX): one text encoding per block, the transformer
analogue of the UNet's one encoding per ``attn2`` layer (P+ / ADI rows, :mod:`adi_lightning.conditioning`).

In SD3's ``SD3Transformer2DModel`` and FLUX's ``FluxTransformer2DModel`` the text is a stream carried
from block to block: the ``context_embedder`` (a linear map ``c``) projects the encoding ``E``
``[N, T, J]`` once, and each block updates the stream and hands it on (SD3: the
``JointTransformerBlock`` s; FLUX: the double-stream ``FluxTransformerBlock`` s, then the single-stream
``FluxSingleTransformerBlock`` s, which concatenate the text stream before the image tokens, run one
stream and split the text part off again: each block kind takes and returns ``encoder_hidden_states``).
Overwriting the stream at each block would change the forward pass even when every row is the same.
Instead each block gets an **additive, telescoping term**: with ``E_r`` the encoding made with
identifier row ``r`` and ``row(b)`` block ``b``'s row (``block_to_row``, :func:`group_blocks`),

- block 0's stream input is ``c(E_row(0))``, as the stock forward makes it;
- before block ``b >= 1`` the stream gets ``+ c(E_row(b)) - c(E_row(p))``, ``p`` the block that ran
  before it (``b - 1``, or the last block not skipped by ``skip_layers``).

If the blocks were the identity, block ``b`` would see ``c(E_row(b))``. With equal rows every term is
exactly zero and the forward is bit for bit the plain (Textual Inversion) forward. FLUX's single-stream
blocks get their terms on the text part of their one stream, the same way (their blocks are numbered
after the double-stream ones, :func:`stream_blocks`).

The stock forward and the stock pipelines (``StableDiffusion3Pipeline``, ``FluxPipeline``) run
unchanged: the caller passes ``encoder_hidden_states`` (``prompt_embeds``) as the R row encodings
concatenated along the token axis, ``[N, R*T, J]``, rows in order (R = B, one per block, without
``block_to_row``). Hooks installed by :func:`install_blockwise_routing` do the rest: the
``context_embedder`` projects each row's ``[N, T, J]`` part separately (the same call as for a plain
prompt, so equal rows give equal projections) and hands on row(0)'s projection as the stream; a
pre-hook on each block adds its term. FLUX's text position ids (``txt_ids``, ``[R*T, 3]`` as
``FluxPipeline.encode_prompt`` makes them for a long ``prompt_embeds``: zeros) are cut to one
encoding's ``[T, 3]`` by a pre-hook on the transformer (ValueError if the R chunks differ).
A plain ``[N, T, J]`` encoding (a negative prompt, an encoding without the identifier) passes untouched.

The pooled text embedding (``pooled_projections``: SD3's CLIP-L and CLIP-G pooled, FLUX's CLIP-L pooled,
added to the timestep embedding that modulates every block) is one vector, not per block: as SDXL's
(:func:`adi_lightning.families.sdxl.pooled_layer_index`), the caller encodes it with ONE row.

Gradient checkpointing (diffusers' non-reentrant ``_gradient_checkpointing_func``) is supported: a
recomputed block reuses the term of its forward. Call ``backward`` before the next forward of the
same transformer (as a training step does); otherwise the recomputation raises RuntimeError.
"""

from __future__ import annotations

import weakref
from functools import partial

import torch
from torch import nn

_ROUTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # transformer -> _BlockwiseRouting


def stream_blocks(transformer: nn.Module) -> list[str]:
    """The module paths of the MMDiT's blocks that carry the text stream, in execution order.

    SD3 (``SD3Transformer2DModel``): its joint blocks, ``transformer_blocks.<b>``, found as
    ``JointTransformerBlock`` entries, never by an ``attn2`` name (SD3.5's dual-attention blocks have
    an ``attn2`` that is an image-only self-attention). FLUX (``FluxTransformer2DModel``): its
    double-stream blocks ``transformer_blocks.<b>`` (``FluxTransformerBlock``), then its single-stream
    blocks ``single_transformer_blocks.<s>`` (``FluxSingleTransformerBlock``). ValueError for another model.
    """
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    def kind(name: str, block_class) -> list[str] | None:
        blocks = getattr(transformer, name, None)
        if isinstance(blocks, nn.ModuleList) and all(isinstance(block, block_class) for block in blocks):
            return [f"{name}.{index}" for index in range(len(blocks))]
        return None

    if isinstance(getattr(transformer, "context_embedder", None), nn.Module):
        joint = kind("transformer_blocks", JointTransformerBlock)
        if joint and not hasattr(transformer, "single_transformer_blocks"):
            return joint
        double, single = kind("transformer_blocks", FluxTransformerBlock), kind("single_transformer_blocks",
                                                                                FluxSingleTransformerBlock)
        if double is not None and single is not None and double + single:
            return double + single
    raise ValueError(f"{type(transformer).__name__} is not an SD3 or FLUX MMDiT: block-wise routing needs a "
                     "'context_embedder' and 'transformer_blocks' of JointTransformerBlock (diffusers "
                     "SD3Transformer2DModel), or of FluxTransformerBlock with 'single_transformer_blocks' of "
                     "FluxSingleTransformerBlock (FluxTransformer2DModel)")




def group_blocks(num_blocks: int, rows: int) -> torch.Tensor:
    """``block_to_row`` ``[B]`` int64: ``rows`` contiguous groups of consecutive blocks, as equal in
    size as possible (``rows == B``: one row per block; ``rows == 1``: one shared row, Textual
    Inversion). ValueError unless ``1 <= rows <= num_blocks``."""
    if not 1 <= rows <= num_blocks:
        raise ValueError(f"rows must be between 1 and the {num_blocks} joint blocks, got {rows}")
    return torch.arange(num_blocks) * rows // num_blocks


def check_block_to_row(block_to_row: torch.Tensor | None, num_blocks: int) -> torch.Tensor:
    """``block_to_row`` as ``[B]`` int64 (None: ``arange(B)``, one row per block). ValueError unless it
    has one entry per block and uses every row of ``0..R-1``."""
    if block_to_row is None:
        return torch.arange(num_blocks)
    rows = torch.as_tensor(block_to_row).to(torch.int64).cpu()
    if rows.shape != (num_blocks,) or sorted(set(rows.tolist())) != list(range(int(rows.max()) + 1)):
        raise ValueError(f"block_to_row {rows.tolist()} does not number the rows 0..R-1 of {num_blocks} joint blocks")
    return rows


def _stream_argument(args: tuple, kwargs: dict) -> torch.Tensor:
    """The ``encoder_hidden_states`` a block was called with: by keyword (the plain loop) or as the
    second positional argument (diffusers' gradient checkpointing)."""
    if "encoder_hidden_states" in kwargs:
        return kwargs["encoder_hidden_states"]
    if len(args) >= 2:
        return args[1]
    raise TypeError("an MMDiT block was called without encoder_hidden_states")


def _with_stream(args: tuple, kwargs: dict, stream: torch.Tensor) -> tuple[tuple, dict]:
    if "encoder_hidden_states" in kwargs:
        return args, {**kwargs, "encoder_hidden_states": stream}
    return (args[0], stream, *args[2:]), kwargs


class _BlockwiseRouting:
    """The hooks' state for one transformer: the row projections of the current forward."""

    def __init__(self, tokens: int, block_to_row: torch.Tensor, txt_ids_position: int | None = None):
        self.tokens = tokens
        self.txt_ids_position = txt_ids_position  # FLUX: txt_ids' positional index in the forward
        self.block_to_row = block_to_row.tolist()
        self.rows = max(self.block_to_row) + 1
        self.handles: list = []
        self.pending: tuple[torch.Tensor, ...] | None = None  # row encodings awaiting projection
        self.projected: list[torch.Tensor] | None = None  # c(E_r) [N, T, C] per row; None: plain forward
        self.current_row = self.block_to_row[0]  # the row the stream carries so far
        self.added: dict[int, tuple] = {}  # block -> (weakref to the stream it got, its term or None)
        self.inner = False  # inside our own context_embedder calls

    def transformer_pre(self, module: nn.Module, args: tuple, kwargs: dict):
        """FLUX: ``txt_ids`` of R encodings (``[R*T, 3]``, or the deprecated ``[N, R*T, 3]``) -> one
        encoding's ``[T, 3]`` (the stream carries T text tokens; rotary positions must match it)."""
        by_keyword = "txt_ids" in kwargs
        position = self.txt_ids_position
        if by_keyword:
            ids = kwargs["txt_ids"]
        elif position is not None and len(args) > position:
            ids = args[position]
        else:
            return None
        if ids is None or ids.shape[-2] != self.rows * self.tokens or self.rows == 1:
            return None
        chunks = ids.split(self.tokens, dim=-2)
        if any(not torch.equal(chunk, chunks[0]) for chunk in chunks[1:]):
            raise ValueError("block-wise routing needs the same txt_ids for every identifier row's encoding "
                             f"({self.rows} chunks of {self.tokens} text positions differ)")
        if by_keyword:
            return args, {**kwargs, "txt_ids": chunks[0]}
        return (*args[:position], chunks[0], *args[position + 1:]), kwargs

    def embed_pre(self, module: nn.Module, args: tuple):
        if self.inner:
            return None
        encodings = args[0]
        self.pending, self.projected, self.added = None, None, {}
        self.current_row = self.block_to_row[0]
        tokens = encodings.shape[1]
        if tokens == self.tokens:
            return None
        if tokens != self.rows * self.tokens:
            raise ValueError(
                f"block-wise routing expects encoder_hidden_states with {self.tokens} tokens (a plain prompt) "
                f"or {self.rows}*{self.tokens} = {self.rows * self.tokens} (one encoding per identifier row, "
                f"concatenated along the token axis), got {tokens}. Encode prompts with the identifier's "
                "block-wise encoder, or remove_blockwise_routing first.")
        self.pending = encodings.split(self.tokens, dim=1)
        return (self.pending[self.block_to_row[0]], *args[1:])

    def embed_post(self, module: nn.Module, args: tuple, output: torch.Tensor):
        if self.inner or self.pending is None:
            return None
        chunks, self.pending, first = self.pending, None, self.block_to_row[0]
        self.inner = True
        try:  # each row alone, as a plain prompt is projected: equal rows give equal projections
            self.projected = [output if row == first else module(chunk) for row, chunk in enumerate(chunks)]
        finally:
            self.inner = False
        return None

    def block_pre(self, index: int, module: nn.Module, args: tuple, kwargs: dict):
        if self.projected is None:
            return None
        stream = _stream_argument(args, kwargs)
        if index in self.added:  # recomputed under gradient checkpointing
            seen, term = self.added[index]
            if seen() is not stream:
                raise RuntimeError(
                    f"MMDiT block {index} ran twice with block-wise routing for different streams: under "
                    "gradient checkpointing, call backward before the next forward of this transformer")
        else:
            row, previous = self.block_to_row[index], self.current_row
            term = None if row == previous else self.projected[row] - self.projected[previous]
            self.added[index] = (weakref.ref(stream), term)
            self.current_row = row
        if term is None:
            return None
        return _with_stream(args, kwargs, stream + term.to(stream.dtype))


def install_blockwise_routing(transformer: nn.Module, tokens_per_prompt: int,
                              block_to_row: torch.Tensor | None = None) -> torch.Tensor:
    """Make ``transformer`` (``SD3Transformer2DModel`` or ``FluxTransformer2DModel``) read one text encoding
    per identifier row.

    Args:
        tokens_per_prompt: T, the tokens of ONE encoding (SD3: 77 CLIP + ``max_sequence_length`` T5; FLUX:
            ``max_sequence_length`` T5).
        block_to_row: ``[B]`` the row of each block of :func:`stream_blocks` (:func:`group_blocks`); None:
            one per block.

    Afterwards ``encoder_hidden_states`` ``[N, R*T, J]`` (the R row encodings along the token axis)
    drives block ``b`` with row ``block_to_row[b]`` (see the module docstring), ``[N, T, J]`` runs the
    stock forward, any other token count raises ValueError. Returns the ``block_to_row`` used.
    RuntimeError if routing is already installed. Undo with :func:`remove_blockwise_routing`.
    """
    import inspect

    paths = stream_blocks(transformer)
    if transformer in _ROUTES:
        raise RuntimeError("block-wise routing is already installed on this transformer; "
                           "remove_blockwise_routing first")
    if isinstance(tokens_per_prompt, bool) or not isinstance(tokens_per_prompt, int) or tokens_per_prompt < 1:
        raise ValueError(f"tokens_per_prompt must be a positive int, got {tokens_per_prompt!r}")
    rows = check_block_to_row(block_to_row, len(paths))
    parameters = list(inspect.signature(transformer.forward).parameters)
    txt_ids_position = parameters.index("txt_ids") if "txt_ids" in parameters else None
    routing = _BlockwiseRouting(tokens_per_prompt, rows, txt_ids_position)
    embedder = transformer.context_embedder
    routing.handles = [embedder.register_forward_pre_hook(routing.embed_pre),
                       embedder.register_forward_hook(routing.embed_post)]
    if txt_ids_position is not None:
        routing.handles.append(transformer.register_forward_pre_hook(routing.transformer_pre, with_kwargs=True))
    for index, path in enumerate(paths):
        block = transformer.get_submodule(path)
        routing.handles.append(block.register_forward_pre_hook(partial(routing.block_pre, index), with_kwargs=True))
    _ROUTES[transformer] = routing
    return rows.clone()


def remove_blockwise_routing(transformer: nn.Module) -> bool:
    """Remove every hook :func:`install_blockwise_routing` added (the transformer is then exactly as
    before); returns False if none was installed."""
    routing = _ROUTES.pop(transformer, None)
    if routing is None:
        return False
    for handle in routing.handles:
        handle.remove()
    routing.projected = routing.pending = None
    routing.added = {}
    return True


def blockwise_block_to_row(transformer: nn.Module) -> torch.Tensor | None:
    """The installed ``block_to_row`` ``[B]`` of ``transformer``, or None without block-wise routing."""
    routing = _ROUTES.get(transformer)
    return None if routing is None else torch.tensor(routing.block_to_row, dtype=torch.int64)
