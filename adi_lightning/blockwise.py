"""Block-wise identifiers in an MMDiT (SD3): one text encoding per joint block, the transformer
analogue of the UNet's one encoding per ``attn2`` layer (P+ / ADI rows, :mod:`adi_lightning.conditioning`).

In SD3's ``SD3Transformer2DModel`` the text is a stream carried from block to block: the
``context_embedder`` (a linear map ``c``) projects the encoding ``E`` ``[N, T, J]`` once, and each
``JointTransformerBlock`` updates the stream and hands it on. Overwriting the stream at each block
would change the forward pass even when every row is the same. Instead each block gets an
**additive, telescoping term**: with ``E_r`` the encoding made with identifier row ``r`` and
``row(b)`` block ``b``'s row (``block_to_row``, :func:`group_blocks`),

- block 0's stream input is ``c(E_row(0))``, as the stock forward makes it;
- before block ``b >= 1`` the stream gets ``+ c(E_row(b)) - c(E_row(p))``, ``p`` the block that ran
  before it (``b - 1``, or the last block not skipped by ``skip_layers``).

If the blocks were the identity, block ``b`` would see ``c(E_row(b))``. With equal rows every term is
exactly zero and the forward is bit for bit the plain (Textual Inversion) forward.

The stock forward and the stock ``StableDiffusion3Pipeline`` run unchanged: the caller passes
``encoder_hidden_states`` (``prompt_embeds``) as the R row encodings concatenated along the token axis,
``[N, R*T, J]``, rows in order (R = B, one per joint block, without ``block_to_row``). Hooks
installed by :func:`install_blockwise_routing` do the rest: the ``context_embedder`` projects each
row's ``[N, T, J]`` part separately (the same call as for a plain prompt, so equal rows give equal
projections) and hands on row(0)'s projection as the stream; a pre-hook on each block adds its term.
A plain ``[N, T, J]`` encoding (a negative prompt, an encoding without the identifier) passes untouched.

The pooled text embedding (``pooled_projections``, CLIP-L and CLIP-G pooled, added to the timestep
embedding that modulates every block) is one vector, not per block: as SDXL's
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


def joint_blocks(transformer: nn.Module) -> list[str]:
    """The module paths of the MMDiT's joint blocks (``transformer_blocks.<b>``), in execution order.

    Found as the ``JointTransformerBlock`` entries of ``transformer.transformer_blocks``, never by an
    ``attn2`` name: SD3.5's dual-attention blocks have an ``attn2`` that is an image-only
    self-attention. ValueError for a model that is not an SD3 MMDiT.
    """
    from diffusers.models.attention import JointTransformerBlock

    blocks = getattr(transformer, "transformer_blocks", None)
    if (not isinstance(blocks, nn.ModuleList) or not len(blocks)
            or not all(isinstance(block, JointTransformerBlock) for block in blocks)
            or not isinstance(getattr(transformer, "context_embedder", None), nn.Module)):
        raise ValueError(f"{type(transformer).__name__} is not an SD3 MMDiT: block-wise routing needs a "
                         "'context_embedder' and 'transformer_blocks' of JointTransformerBlock "
                         "(diffusers SD3Transformer2DModel)")
    return [f"transformer_blocks.{index}" for index in range(len(blocks))]


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
    raise TypeError("a joint block was called without encoder_hidden_states")


def _with_stream(args: tuple, kwargs: dict, stream: torch.Tensor) -> tuple[tuple, dict]:
    if "encoder_hidden_states" in kwargs:
        return args, {**kwargs, "encoder_hidden_states": stream}
    return (args[0], stream, *args[2:]), kwargs


class _BlockwiseRouting:
    """The hooks' state for one transformer: the row projections of the current forward."""

    def __init__(self, tokens: int, block_to_row: torch.Tensor):
        self.tokens = tokens
        self.block_to_row = block_to_row.tolist()
        self.rows = max(self.block_to_row) + 1
        self.handles: list = []
        self.pending: tuple[torch.Tensor, ...] | None = None  # row encodings awaiting projection
        self.projected: list[torch.Tensor] | None = None  # c(E_r) [N, T, C] per row; None: plain forward
        self.current_row = self.block_to_row[0]  # the row the stream carries so far
        self.added: dict[int, tuple] = {}  # block -> (weakref to the stream it got, its term or None)
        self.inner = False  # inside our own context_embedder calls

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
                    f"joint block {index} ran twice with block-wise routing for different streams: under "
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
    """Make ``transformer`` (an ``SD3Transformer2DModel``) read one text encoding per identifier row.

    Args:
        tokens_per_prompt: T, the tokens of ONE encoding (SD3: 77 CLIP + ``max_sequence_length`` T5).
        block_to_row: ``[B]`` the row of each joint block (:func:`group_blocks`); None: one per block.

    Afterwards ``encoder_hidden_states`` ``[N, R*T, J]`` (the R row encodings along the token axis)
    drives block ``b`` with row ``block_to_row[b]`` (see the module docstring), ``[N, T, J]`` runs the
    stock forward, any other token count raises ValueError. Returns the ``block_to_row`` used.
    RuntimeError if routing is already installed. Undo with :func:`remove_blockwise_routing`.
    """
    paths = joint_blocks(transformer)
    if transformer in _ROUTES:
        raise RuntimeError("block-wise routing is already installed on this transformer; "
                           "remove_blockwise_routing first")
    if isinstance(tokens_per_prompt, bool) or not isinstance(tokens_per_prompt, int) or tokens_per_prompt < 1:
        raise ValueError(f"tokens_per_prompt must be a positive int, got {tokens_per_prompt!r}")
    rows = check_block_to_row(block_to_row, len(paths))
    routing = _BlockwiseRouting(tokens_per_prompt, rows)
    embedder = transformer.context_embedder
    routing.handles = [embedder.register_forward_pre_hook(routing.embed_pre),
                       embedder.register_forward_hook(routing.embed_post)]
    for index, block in enumerate(transformer.transformer_blocks):
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
