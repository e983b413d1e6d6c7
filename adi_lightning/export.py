"""``python -m adi_lightning.export --identifier F --format ti --out F2``: one-vector exports.

Other tools (diffusers' ``load_textual_inversion``, AUTOMATIC1111's webui) know single-token
textual-inversion embeddings only, so an L-row layer-wise identifier must be squeezed into one
vector. That is lossy: every cross-attention layer then sees the same vector, which is exactly
what ADI's layer-wise tokens avoid. The default keeps the mean of the rows; ``--row N`` keeps one
row (e.g. a mid-block row). A Textual-Inversion identifier (one shared row) exports losslessly.

Formats: ``ti`` (diffusers, ``{token: [1, D]}``) and ``webui`` (AUTOMATIC1111 ``.pt``) for SD 1.x/2.x
identifiers; ``sdxl`` for SDXL identifiers (two text encoders): the community's SDXL embedding
layout, ``{"clip_l": [1, D1], "clip_g": [1, D2]}`` (768 and 1280 for SDXL base), the one vector
split by the identifier's recorded ``text_dims``. diffusers loads it with one
``load_textual_inversion(tensor, token=..., text_encoder=..., tokenizer=...)`` call per key (a
path to the file is refused: the file has two tensors); docs/inference.md "SDXL" shows the calls.

Existing files: ``--out`` never replaces a file this command did not write. An existing ``--out``
is refused (FileExistsError naming it); ``--overwrite`` replaces it only when it is an earlier
export, recognised by its marker (:data:`WRITTEN_BY` under the key ``written_by``: safetensors
metadata for ``ti`` / ``sdxl``, a payload key for ``webui``; exports written before the marker
existed are refused too). The identifier being exported is never the output, ``--overwrite`` or
not. The file is written atomically (:func:`adi_lightning.io.atomic_path`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from adi_lightning.identifier import read_identifier, saved_layer_to_row
from adi_lightning.io import atomic_save_safetensors, atomic_torch_save

#: ``--format sdxl`` keys, in row order: ``text_encoder`` (CLIP ViT-L) then ``text_encoder_2``
#: (OpenCLIP bigG), as :attr:`adi_lightning.families.StableDiffusionXLFamily.text_parts`.
SDXL_KEYS = ("clip_l", "clip_g")
FORMATS = ("ti", "webui", "sdxl")
#: The ``written_by`` marker every export carries; ``--overwrite`` replaces only files that have it.
WRITTEN_BY = "adi_lightning.export"


def single_vector(table: torch.Tensor, row: int | None = None) -> torch.Tensor:
    """``[1, D]``: the mean of the rows, or one row."""
    if row is None:
        return table.mean(dim=0, keepdim=True)
    if not -table.shape[0] <= row < table.shape[0]:
        raise ValueError(f"--row {row} out of range for an identifier with {table.shape[0]} rows")
    return table[row : row + 1]


def _layers_of_row(identifier: str | Path, meta: dict[str, str], rows: int, row: int) -> list[str]:
    """The ``attn2`` paths that read row ``row`` of the file's ``rows`` (its ``layer_to_row``)."""
    paths = json.loads(meta.get("layer_paths", "[]"))
    return [path for path, r in zip(paths, saved_layer_to_row(identifier, rows, len(paths)).tolist()) if r == row]


def written_by_export(path: str | Path) -> bool:
    """Whether ``path`` is a file this command wrote (it carries the :data:`WRITTEN_BY` marker)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
        if head[:2] == b"PK":  # torch.save's zip: the webui payload
            payload = torch.load(path, map_location="cpu", weights_only=True)
            return isinstance(payload, dict) and payload.get("written_by") == WRITTEN_BY
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("written_by") == WRITTEN_BY
    except Exception:  # noqa: BLE001 - unreadable or another format: not ours
        return False


def check_out(identifier: str | Path, out: str | Path, overwrite: bool = False) -> None:
    """Refuse an ``out`` that is the identifier itself, or an existing file that is not an earlier
    export (or any existing file without ``overwrite``): FileExistsError naming it."""
    out = Path(out)
    same = out.resolve() == Path(identifier).resolve() or (out.exists() and Path(identifier).exists()
                                                           and out.samefile(identifier))
    if same:
        raise FileExistsError(f"--out {out} is the identifier being exported (--identifier {identifier}); "
                              "it is never replaced: choose another --out")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_file():
        raise FileExistsError(f"--out {out} exists and is not a file; choose another --out")
    if not overwrite:
        extra = " (an earlier export: add --overwrite to replace it)" if written_by_export(out) else ""
        raise FileExistsError(f"--out {out} already exists{extra}; it is never replaced without --overwrite: "
                              "choose another --out")
    if not written_by_export(out):
        raise FileExistsError(f"--out {out} already exists and was not written by {WRITTEN_BY} (no "
                              f"written_by={WRITTEN_BY!r} marker), so --overwrite does not replace it: choose "
                              "another --out, or move the file away yourself")


def export_identifier(identifier: str | Path, out: str | Path, fmt: str = "ti", row: int | None = None,
                      token: str | None = None, overwrite: bool = False) -> Path:
    """Write a one-vector embedding file (``fmt`` in :data:`FORMATS`) atomically; returns its path.

    ValueError when the format does not fit the identifier's text encoders (``sdxl`` needs two
    recorded ``text_dims``; ``ti`` / ``webui`` one) or ``row`` is out of range; FileExistsError
    when ``out`` is the identifier, or exists and is not an earlier export replaced with
    ``overwrite`` (:func:`check_out`).
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    check_out(identifier, out, overwrite)
    table, meta = read_identifier(identifier)
    text_dims = json.loads(meta.get("text_dims", "[]")) or [table.shape[1]]  # files before SDXL: one encoder
    if sum(text_dims) != table.shape[1]:
        raise ValueError(f"{identifier}: text_dims {text_dims} do not add up to its row width {table.shape[1]}")
    if fmt == "sdxl" and len(text_dims) != len(SDXL_KEYS):
        raise ValueError(f"--format sdxl needs an SDXL identifier (one vector per text encoder, widths D1 + D2); "
                         f"{identifier} has {len(text_dims)} text encoder(s), widths {text_dims}: use --format ti or webui")
    if fmt != "sdxl" and len(text_dims) > 1:
        raise ValueError(f"{identifier} has one vector per text encoder (widths {text_dims}, SDXL): "
                         "use --format sdxl (clip_l / clip_g)")
    token = token or meta.get("placeholder_token") or "<A>"
    vector = single_vector(table, row).float().contiguous()
    if table.shape[0] == 1:
        kept = "the single shared row (lossless)"
    elif row is None:
        kept = f"mean of {table.shape[0]} rows (lossy)"
    else:
        layers = ", ".join(_layers_of_row(identifier, meta, table.shape[0], row))
        kept = f"row {row} of {table.shape[0]}, used by {layers} (lossy)"
    if fmt == "ti":
        # diffusers format: one tensor, keyed by its token.
        return atomic_save_safetensors({token: vector}, out, {"source": str(identifier), "kept": kept,
                                                                  "written_by": WRITTEN_BY})
    if fmt == "sdxl":
        # One [1, D_i] tensor per text encoder; the token is the caller's (stored for reference only).
        parts = {key: part.contiguous() for key, part in zip(SDXL_KEYS, vector.split(text_dims, dim=-1))}
        return atomic_save_safetensors(parts, out, {"source": str(identifier), "kept": kept, "token": token,
                                                        "written_by": WRITTEN_BY})
    # AUTOMATIC1111 embedding .pt layout.
    payload = {"string_to_token": {"*": 265}, "string_to_param": {"*": vector}, "name": token,
               "step": int(meta.get("global_step", 0)), "sd_checkpoint": None, "sd_checkpoint_name": None,
               "written_by": WRITTEN_BY}
    return atomic_torch_save(payload, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adi_lightning.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identifier", required=True, help="identifier.safetensors written by adi-lightning")
    parser.add_argument("--format", default="ti", choices=FORMATS,
                        help="ti: diffusers load_textual_inversion (.safetensors); webui: AUTOMATIC1111 (.pt); "
                             "sdxl: an SDXL identifier's clip_l / clip_g (.safetensors)")
    parser.add_argument("--out", required=True, help="output file; an existing one is refused (see --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out, only if it is an earlier export (never the identifier)")
    parser.add_argument("--row", type=int, default=None, help="keep this row instead of the mean of all rows")
    parser.add_argument("--token", default=None, help="token name stored in the file (default: the identifier's)")
    args = parser.parse_args(argv)
    try:
        path = export_identifier(args.identifier, args.out, args.format, args.row, args.token, args.overwrite)
    except (OSError, ValueError) as err:
        print(f"adi_lightning: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({args.format}; lossy one-vector export unless the identifier has one row)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
