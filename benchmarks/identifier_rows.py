"""Where in the layer-wise identifier a leak sits: per-row norms and word similarities, and row resets.

A layer-wise identifier (P+, ADI) has one row per cross-attention layer. This script prints, per row,
the layer it feeds, its norm and its cosine similarity to chosen words' token embeddings (the
initializer, subjects, the action word). With ``--reset-rows`` it writes a copy of the identifier
whose chosen rows are set back to the initializer word's embedding (the untrained value); with
``--remove-words`` a copy whose every row's change from the initializer is projected orthogonal to
those words' embeddings (what ``model.subject_words`` does during training, here after it). Testing
that copy (``python -m adi_lightning test ... --model.identifier_path=<copy>``) says what those rows
carried. Used in docs/report.md ("Where ADI's subject leak sits").

    python benchmarks/identifier_rows.py RUN/identifier.safetensors --words man child cat rabbit squatting
    python benchmarks/identifier_rows.py RUN/identifier.safetensors --reset-rows 12 --out reset12.safetensors
    python benchmarks/identifier_rows.py RUN/identifier.safetensors --remove-words person man woman child --out x.safetensors

SD 1.x/2.x identifiers (one text encoder) only; the pipeline is the file's ``base_model`` unless
``--pipeline`` names another. The copy is never written over an existing file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def word_embeddings(pipeline: str | Path, words: list[str]) -> dict[str, torch.Tensor]:
    """``{word: [D] fp32}``: the token embeddings of single-token ``words`` in the pipeline's text encoder."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from adi_lightning.identifier import initializer_embedding

    tokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
    table = CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder").get_input_embeddings()
    return {w: initializer_embedding(tokenizer, table, w, key="word") for w in words}


def row_report(table: torch.Tensor, layer_paths: list[str], words: dict[str, torch.Tensor]) -> str:
    """One line per row: index, layer path, norm, cosine similarity to each word. ``table`` ``[R, D]``."""
    head = f"{'row':>3}  {'layer':<52} {'norm':>6}" + "".join(f" {w[:9]:>9}" for w in words)
    lines = [head, f"{'':>3}  {'(word norms)':<52} {'':>6}" + "".join(f" {v.norm():9.2f}" for v in words.values())]
    for r, row in enumerate(table):
        cos = [torch.nn.functional.cosine_similarity(row, v, dim=0).item() for v in words.values()]
        path = layer_paths[r] if len(layer_paths) == len(table) else "(grouped rows)"
        lines.append(f"{r:>3}  {path:<52} {row.norm():6.2f}" + "".join(f" {c:9.2f}" for c in cos))
    return "\n".join(lines)


def reset_rows(table: torch.Tensor, rows: list[int], initializer: torch.Tensor) -> torch.Tensor:
    """A copy of ``table`` ``[R, D]`` with ``rows`` set to ``initializer`` ``[D]``; ValueError for a row
    outside ``0..R-1``."""
    bad = [r for r in rows if not 0 <= r < table.shape[0]]
    if bad:
        raise ValueError(f"--reset-rows {bad}: the identifier has rows 0..{table.shape[0] - 1}")
    out = table.clone()
    out[rows] = initializer.to(out.dtype)
    return out


def remove_words(table: torch.Tensor, initializer: torch.Tensor, rows: list[torch.Tensor]) -> torch.Tensor:
    """``table`` ``[R, D]`` with each row's change from ``initializer`` ``[D]`` projected orthogonal to the
    span of the word ``rows`` (``[D]`` each): the post-hoc form of ``model.subject_words``."""
    from adi_lightning.word_directions import word_basis, without_directions

    return initializer + without_directions(table - initializer, word_basis(torch.stack(rows)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("identifier", help="an adi-lightning identifier file (identifier.safetensors)")
    p.add_argument("--pipeline", default=None, help="the pipeline folder (default: the file's base_model)")
    p.add_argument("--words", nargs="*", default=["man", "woman", "child", "cat", "rabbit"],
                   help="single-token words to compare each row with (the initializer is always first)")
    p.add_argument("--reset-rows", nargs="+", type=int, default=None, help="rows set back to the initializer")
    p.add_argument("--remove-words", nargs="+", default=None,
                   help="project every row's change from the initializer orthogonal to these words' embeddings")
    p.add_argument("--out", default=None, help="where --reset-rows / --remove-words write the copy (must not exist)")
    args = p.parse_args(argv)

    from adi_lightning.identifier import read_identifier
    from adi_lightning.io import atomic_save_safetensors

    try:
        edits = [flag for flag, v in (("--reset-rows", args.reset_rows), ("--remove-words", args.remove_words)) if v]
        if len(edits) > 1:
            raise ValueError(f"{' and '.join(edits)}: one edit per copy")
        if bool(edits) != (args.out is not None):
            raise ValueError("--out goes with --reset-rows or --remove-words")
        if args.out is not None and Path(args.out).exists():
            raise FileExistsError(f"--out {args.out} exists: this script never writes over a file")
        table, meta = read_identifier(args.identifier)
        if meta.get("family", "sd") != "sd":
            raise ValueError(f"{args.identifier} is a {meta['family']!r} identifier: this script reads SD 1.x/2.x ones")
        pipeline = args.pipeline or meta.get("base_model")
        if pipeline and not Path(pipeline).is_dir() and (REPO / pipeline).is_dir():
            pipeline = str(REPO / pipeline)  # toy identifiers record the package-relative pipeline path
        initializer = meta["initializer_token"]
        words = word_embeddings(pipeline, list(dict.fromkeys([initializer, *args.words, *(args.remove_words or [])])))
        print(row_report(table, json.loads(meta.get("layer_paths", "[]")),
                         {w: v for w, v in words.items() if w == initializer or w in args.words}))
        if edits:
            from safetensors import safe_open

            with safe_open(args.identifier, framework="pt") as handle:
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
            if args.reset_rows:
                edited, note = reset_rows(table, args.reset_rows, words[initializer]), {"reset_rows": args.reset_rows}
            else:
                edited = remove_words(table, words[initializer], [words[w] for w in args.remove_words])
                note = {"removed_words": args.remove_words}
            tensors["identifier"] = edited.contiguous()
            atomic_save_safetensors(tensors, args.out, {**meta, **{k: json.dumps(v) for k, v in note.items()},
                                                        "edited_from": str(args.identifier)})
            print(f"wrote {args.out}: {note}")
    except (OSError, ValueError, KeyError) as err:
        print(f"identifier_rows: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
