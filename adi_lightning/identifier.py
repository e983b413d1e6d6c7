"""LayerwiseIdentifier: the only trainable tensor, and how it enters the text encoder.

``E`` is an fp32 ``[R, D]`` parameter, one row per group of ``attn2`` layers (``model.row_groups``:
R = L layer-wise rows, ..., or 1 shared row for Textual Inversion). It reaches the frozen CLIP text
encoder through :class:`IdentifierTokenEmbedding`, which replaces ``embeddings.token_embedding``: ordinary ids read the frozen vocabulary table,
the placeholder id reads the rows handed in for that call. No vocabulary row can drift and no
optimizer ever sees the vocabulary.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from adi_lightning.io import atomic_save_safetensors

FORMAT_NAME = "adi-lightning-identifier"
FORMAT_VERSION = "1"
IDENTIFIER_KEY = "identifier"
LAYER_ROW_KEY = "layer_to_row"
# The model.identifier_path value that asks for the untrained identifier (every row the initializer
# word) in validate / test / predict, which otherwise refuse to run without an identifier or checkpoint.
UNTRAINED = "untrained"


class IdentifierTokenEmbedding(nn.Module):
    """Drop-in for CLIP's ``token_embedding`` (or T5's ``embed_tokens``): frozen rows, plus identifier
    rows for the placeholder."""

    def __init__(self, base: nn.Embedding, placeholder_id: int):
        super().__init__()
        self.base = base
        self.placeholder_id = placeholder_id
        self._rows: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @contextmanager
    def rows(self, per_prompt_rows: torch.Tensor):
        """Within the block, the placeholder in prompt ``i`` embeds as ``per_prompt_rows[i]``."""
        previous, self._rows = self._rows, per_prompt_rows
        try:
            yield
        finally:
            self._rows = previous

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_placeholder = input_ids == self.placeholder_id
        embeds = self.base(input_ids.masked_fill(is_placeholder, 0))
        if not bool(is_placeholder.any()):
            return embeds
        if self._rows is None:
            raise RuntimeError(
                "the identifier placeholder reached the text encoder outside a layer-wise "
                "encoding call; encode prompts with adi_lightning.conditioning.encode_layerwise"
            )
        if self._rows.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{input_ids.shape[0]} prompts but {self._rows.shape[0]} identifier rows")
        rows = self._rows.to(embeds.dtype)[:, None, :].expand_as(embeds)
        return torch.where(is_placeholder[..., None], rows, embeds)


def token_embedding_owner(text_encoder: nn.Module) -> nn.Module:
    """The module holding ``token_embedding`` (transformers 5: ``text_encoder.embeddings``).

    Fails loudly if a transformers upgrade moved it, instead of silently training nothing.
    """
    for owner in (getattr(text_encoder, "embeddings", None), getattr(getattr(text_encoder, "text_model", None), "embeddings", None)):
        if owner is not None and isinstance(getattr(owner, "token_embedding", None), (nn.Embedding, IdentifierTokenEmbedding)):
            return owner
    raise RuntimeError(
        f"{type(text_encoder).__name__} has no 'embeddings.token_embedding' nn.Embedding: the "
        "transformers CLIP text model layout changed; adi_lightning.identifier must be updated"
    )


def token_embedding_slot(text_encoder: nn.Module) -> tuple[nn.Module, str]:
    """``(owner, attribute)`` of the token-embedding table the encoder's forward reads: CLIP's
    ``embeddings.token_embedding`` (:func:`token_embedding_owner`), or T5's ``encoder.embed_tokens``
    (``T5EncoderModel``: the table ``shared`` is tied to it; the forward reads ``encoder.embed_tokens``,
    so the overlay goes there and ``shared`` is never touched). RuntimeError for any other layout."""
    stack = getattr(text_encoder, "encoder", None)
    if isinstance(getattr(stack, "embed_tokens", None), (nn.Embedding, IdentifierTokenEmbedding)):
        return stack, "embed_tokens"
    return token_embedding_owner(text_encoder), "token_embedding"


def get_token_embedding(text_encoder: nn.Module) -> nn.Module:
    """The token embedding the encoder's forward reads (CLIP or T5, :func:`token_embedding_slot`),
    the overlay when one is installed."""
    owner, name = token_embedding_slot(text_encoder)
    return getattr(owner, name)


def install_overlay(text_encoder: nn.Module, placeholder_id: int) -> IdentifierTokenEmbedding:
    """Replace the text encoder's token embedding (CLIP or T5, :func:`token_embedding_slot`) by the
    overlay (idempotent)."""
    owner, name = token_embedding_slot(text_encoder)
    current = getattr(owner, name)
    if isinstance(current, IdentifierTokenEmbedding):
        current.placeholder_id = placeholder_id
        return current
    overlay = IdentifierTokenEmbedding(current, placeholder_id)
    setattr(owner, name, overlay)
    return overlay


def remove_overlay(text_encoder: nn.Module) -> None:
    owner, name = token_embedding_slot(text_encoder)
    current = getattr(owner, name)
    if isinstance(current, IdentifierTokenEmbedding):
        setattr(owner, name, current.base)



def initializer_embedding(tokenizer, token_embedding: nn.Module, word: str,
                          key: str = "model.initializer_token") -> torch.Tensor:
    """The frozen embedding ``[D_i]`` of a single-token word, in fp32; ValueError naming ``key`` (the setting
    the word came from) when the tokenizer splits it."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(
            f"{key} {word!r} must be a single token, but the tokenizer splits it "
            f"into {len(ids)}: {pieces}"
        )
    return token_embedding.weight[ids[0]].detach().float().clone()


_FUNCTION_WORDS = {"a", "an", "the", "of", "one", "in", "on", "at", "with", "and", "to", "up"}


def check_initializer_word(word: str, templates=(), subjects=()) -> list[str]:
    """Warn (and return where) when the initializer is a subject word of the run.

    A noun of the prompt templates ("person" in "a photo of a person {}"), a subject of the data
    or of the judge in the action slot makes the untrained "a cat <A>" read "a cat person": the
    identifier starts as a subject, and training drifts toward subjects and colours. Choose an
    action-neutral word instead (e.g. "standing"). Returns the sources that contain ``word``.
    """
    target = word.strip().lower()
    found = []
    template_words = {w for t in templates for w in re.findall(r"[a-z]+", t.lower())} - _FUNCTION_WORDS
    if target in template_words:
        found.append("a word of data.prompt_templates")
    if target in {str(s).lower() for s in subjects}:
        found.append("a subject of the data or the judge")
    if found:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"model.initializer_token={word!r} is {' and '.join(found)}: the identifier starts as a "
                       "subject, not an action. Prefer an action-neutral word such as 'standing' (docs/method.md: "
                       "'Choosing the initializer').")
    return found


class LayerwiseIdentifier(nn.Module):
    """The ``[R, D]`` fp32 identifier table, with the ``attn2`` path of each layer it feeds.

    ``layer_paths`` are the L cross-attention module paths in UNet order; ``layer_to_row`` ``[L]``
    gives each its row (:func:`adi_lightning.conditioning.group_layers`; None: one row per layer),
    ``row_groups`` names that grouping (saved with the file).
    """

    def __init__(self, init: torch.Tensor, layer_paths: list[str], layer_to_row: torch.Tensor | None = None,
                 row_groups: str = "layer"):
        super().__init__()
        self.layer_paths = list(layer_paths)
        self.row_groups = row_groups
        rows = torch.arange(len(layer_paths)) if layer_to_row is None else layer_to_row.to(torch.int64).cpu()
        if rows.shape != (len(layer_paths),) or sorted(set(rows.tolist())) != list(range(int(rows.max()) + 1)):
            raise ValueError(f"layer_to_row {rows.tolist()} does not number {len(layer_paths)} layers' rows 0..R-1")
        self._layer_to_row = rows
        self.embedding = nn.Parameter(init.detach().float().reshape(1, -1).repeat(int(rows.max()) + 1, 1).contiguous())
        # The untrained table, for "what does the initializer alone draw" baselines (not saved).
        self.register_buffer("initial", self.embedding.detach().clone(), persistent=False)

    @property
    def num_layers(self) -> int:
        return len(self.layer_paths)

    @property
    def num_rows(self) -> int:
        return self.embedding.shape[0]

    @property
    def dim(self) -> int:
        return self.embedding.shape[1]

    def layer_to_row(self) -> torch.Tensor:
        """``[L]`` int64: the row of each layer of :attr:`layer_paths`."""
        return self._layer_to_row.clone()

    def load(self, path: str | Path, dim: int) -> None:
        """Take the rows and grouping of an identifier file, mapped by ``attn2`` path
        (:func:`rows_for_layers`; ``dim``: the pipeline's row width D): a file saved with another
        ``row_groups`` replaces this table's shape and grouping (e.g. for generation; ``fit``
        refuses that, :func:`adi_lightning.checks.check_identifier_grouping`). ValueError when the
        file does not fit these layers or this width."""
        table, meta = read_identifier(path)
        rows, layer_to_row = rows_for_layers(path, table, meta, self.layer_paths, dim)
        if rows.shape != self.embedding.shape or not torch.equal(layer_to_row, self._layer_to_row):
            self.embedding = nn.Parameter(rows.clone().to(self.embedding.device))
            self.initial = self.initial[:1].repeat(rows.shape[0], 1)
            self._layer_to_row = layer_to_row
        self.row_groups = meta.get("row_groups") or ("layer" if rows.shape[0] > 1 else "shared")
        with torch.no_grad():
            self.embedding.copy_(rows)

    def save(self, path: str | Path, metadata: dict[str, str], table: torch.Tensor | None = None) -> Path:
        """Write the table (or ``table`` ``[R, D]``, e.g. an earlier copy of it) atomically as
        safetensors, with the row paths and provenance. Raises FloatingPointError if non-finite.

        A second tensor (``layer_to_row``) makes diffusers' ``load_textual_inversion`` refuse the
        file instead of silently loading L vectors as one token.
        """
        table = self.embedding if table is None else table
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "num_layers": str(self.num_layers),
            "num_rows": str(self.num_rows),
            "dim": str(self.dim),
            "layerwise": json.dumps(self.num_rows > 1),
            "row_groups": self.row_groups,
            "layer_paths": json.dumps(self.layer_paths),
            **{k: str(v) for k, v in metadata.items()},
        }
        tensors = {
            IDENTIFIER_KEY: table.detach().float().cpu().contiguous(),
            LAYER_ROW_KEY: self.layer_to_row(),
        }
        if not torch.isfinite(tensors[IDENTIFIER_KEY]).all():
            raise FloatingPointError(f"refusing to write a non-finite identifier to {path}")
        return atomic_save_safetensors(tensors, path, meta)


def read_identifier(path: str | Path) -> tuple[torch.Tensor, dict[str, str]]:
    """Read an identifier file: ``(table [R, D] fp32, metadata)``, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"identifier file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            keys = set(handle.keys())
            if meta.get("format") != FORMAT_NAME or IDENTIFIER_KEY not in keys:
                raise ValueError(f"{path} is not an adi-lightning identifier file (format={meta.get('format')!r})")
            table = handle.get_tensor(IDENTIFIER_KEY).float()
    except ValueError:
        raise
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"cannot read identifier file {path}: {err}") from err
    return table, meta


def saved_layer_to_row(path: str | Path, rows: int, num_layers: int) -> torch.Tensor:
    """The file's ``layer_to_row`` ``[L]`` int64, in its ``layer_paths`` order (files written before row
    groups: one row per layer, or one shared row). ValueError when it does not map its ``rows`` rows
    onto its ``num_layers`` layers."""
    with safe_open(str(path), framework="pt") as handle:
        saved = handle.get_tensor(LAYER_ROW_KEY).long() if LAYER_ROW_KEY in handle.keys() else None
    if saved is None and rows in (1, num_layers):  # files without layer_to_row
        saved = torch.arange(num_layers) if rows > 1 else torch.zeros(num_layers, dtype=torch.int64)
    if saved is None or saved.shape != (num_layers,) or set(saved.tolist()) != set(range(rows)):
        raise ValueError(f"identifier {path} has {rows} rows that its layer_to_row does not map onto "
                         f"its {num_layers} layers")
    return saved


def rows_for_layers(path: str | Path, table: torch.Tensor, meta: dict[str, str], layer_paths: list[str],
                    dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [R, D], layer_to_row [L])`` of a saved table for a pipeline whose ``attn2`` paths are
    ``layer_paths``: each layer gets the row the file stores for its path (rows in the file's order).

    Refuses a pipeline whose cross-attention paths or text width differ from the file's, naming
    the file and the base model it was learned on (its ``base_model`` metadata).
    """
    saved_paths = json.loads(meta.get("layer_paths", "[]"))
    name = f"identifier {path}" + (f" (base model {meta['base_model']!r})" if meta.get("base_model") else "")
    if table.shape[1] != dim:
        raise ValueError(
            f"{name} has D={table.shape[1]} but the pipeline's text encoder width is {dim} "
            "(an identifier learned on SD 1.x (768) does not fit SD 2.x (1024) and vice versa)"
        )
    if sorted(saved_paths) != sorted(layer_paths):
        raise ValueError(
            f"{name} was learned for {len(saved_paths)} cross-attention layers that do "
            f"not match this pipeline's {len(layer_paths)} ('attn2' module paths differ)"
        )
    saved_rows = saved_layer_to_row(path, table.shape[0], len(saved_paths))
    index = {p: i for i, p in enumerate(saved_paths)}
    layer_rows = saved_rows[[index[p] for p in layer_paths]].tolist()
    order = list(dict.fromkeys(layer_rows))  # rows renumbered in order of first use, as group_layers numbers them
    renumber = {row: new for new, row in enumerate(order)}
    return table[order], torch.tensor([renumber[row] for row in layer_rows], dtype=torch.int64)
