"""``python -m adi_lightning.export --identifier F --format ti --out F2``: one-vector exports.

Other tools (diffusers' ``load_textual_inversion``, AUTOMATIC1111's webui, ComfyUI) know
single-token textual-inversion embeddings only: every cross-attention layer (every joint block of
an SD3 MMDiT) sees the same vector, which is exactly what ADI's layer-wise tokens avoid. An R-row
identifier becomes one vector by ``--method``: ``distill`` (the default, chosen by measurement on
SD 1.x: docs/report.md "One-vector exports"; :mod:`adi_lightning.distill` fits the vector whose
plain-TI predictions match the identifier's on action prompts, ``--steps`` / ``--seed`` /
``--subjects``), ``mean`` of the rows, or ``row`` (``--row N``, one row of the file; ``--row N``
alone means ``--method row``). Every such vector is measured on the pipeline the identifier was
learned on (``--pipeline``, default its recorded ``base_model``; ``--device``): its residual
(:func:`adi_lightning.distill.residual`, 0 = the identifier's predictions, 1 = the untrained
identifier's) is printed, and above :data:`MAX_RESIDUAL` (the vector loses the action) the export
is refused unless ``--lossy``. A Textual-Inversion identifier (one shared row, or rows all equal)
exports losslessly, unmeasured: there is nothing to distill, measure or lose, so ``--pipeline``,
``--device``, ``--steps``, ``--seed``, ``--subjects`` and ``--lossy`` typed with it are refused by name.

Formats, by the backbone family the file records (metadata ``family``): ``ti`` (diffusers,
``{token: [1, D]}``) and ``webui`` (AUTOMATIC1111 ``.pt``) for SD 1.x/2.x identifiers; ``sdxl`` for
SDXL identifiers (two text encoders): the community's SDXL embedding layout,
``{"clip_l": [1, D1], "clip_g": [1, D2]}`` (768 and 1280 for SDXL base); ``sd3`` for SD3 identifiers:
ComfyUI's SD3 embedding keys ``{"clip_l": [1, D1], "clip_g": [1, D2]}`` plus ``"t5xxl": [1, D3]``
when the identifier has a T5 part (4096 for SD3's T5-XXL). The one vector is split by the
identifier's recorded ``text_dims``; each key is that text encoder's token embedding. diffusers'
SDXL pipeline loads an ``sdxl`` file with one ``load_textual_inversion(tensor, token=...,
text_encoder=..., tokenizer=...)`` call per key (a path to the file is refused: it has several
tensors); SD3 pipelines have no ``load_textual_inversion``, so each ``sd3`` key is set into its
encoder's token embedding with plain transformers calls (docs/inference.md shows both). Only what lives in token-embedding space can be written this way: an SD3 identifier's
block-wise rows live in the MMDiT's text stream (one encoding per joint block), so a multi-row SD3
identifier is written as one distilled (or ``mean`` / ``row``) vector, measured like any other; the
rows themselves are used with ``adi_lightning.install_identifier``. ``ti`` / ``webui`` / ``sdxl``
refuse an SD3 file, and ``sd3`` refuses any other family's, by name. ``flux`` (FLUX identifiers:
``{"clip_l": [1, D1], "t5xxl": [1, D3]}``, CLIP-L then T5, set into each encoder's token embedding as
for ``sd3``) writes a one-row identifier losslessly and refuses a multi-row one by name: the
distillation does not run through FLUX's packed latents yet; every other format refuses a FLUX file.

Existing files: ``--out`` never replaces a file this command did not write. An existing ``--out``
is refused (FileExistsError naming it); ``--overwrite`` replaces it only when it is an earlier
export, recognised by its marker (:data:`WRITTEN_BY` under the key ``written_by``: safetensors
metadata for ``ti`` / ``sdxl`` / ``sd3`` / ``flux``, a payload key for ``webui``; exports written before the
marker existed are refused too). The identifier being exported is never the output, ``--overwrite``
or not. The file is written atomically (:func:`adi_lightning.io.atomic_path`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from adi_lightning import distill
from adi_lightning.distill import DEFAULT_SUBJECTS, DistillSettings
from adi_lightning.identifier import read_identifier, saved_layer_to_row
from adi_lightning.io import atomic_save_safetensors, atomic_torch_save

#: ``--format sdxl`` keys, in row order: ``text_encoder`` (CLIP ViT-L) then ``text_encoder_2``
#: (OpenCLIP bigG), as :attr:`adi_lightning.families.StableDiffusionXLFamily.text_parts`.
SDXL_KEYS = ("clip_l", "clip_g")
#: ``--format sd3`` keys, in row order (:attr:`adi_lightning.families.StableDiffusion3Family.text_parts`):
#: CLIP-L, CLIP-G, then T5-XXL when the identifier has a T5 part; ComfyUI's SD3 embedding keys.
SD3_KEYS = ("clip_l", "clip_g", "t5xxl")
#: ``--format flux`` keys, in row order (:attr:`adi_lightning.families.FluxFamily.text_parts`): CLIP-L (read by
#: FLUX through its pooled vector only), then T5-XXL (the token stream); the keys of FLUX embeddings in ComfyUI.
FLUX_KEYS = ("clip_l", "t5xxl")
FORMATS = ("ti", "webui", "sdxl", "sd3", "flux")
#: Backbone families (identifier metadata ``family``) whose identifiers ``ti`` / ``webui`` / ``sdxl`` hold.
EXPORTABLE_FAMILIES = ("sd", "sdxl")
#: The families ``--format sd3`` holds.
SD3_FAMILIES = ("sd3",)
#: The families ``--format flux`` holds.
FLUX_FAMILIES = ("flux",)
#: The ``written_by`` marker every export carries; ``--overwrite`` replaces only files that have it.
WRITTEN_BY = "adi_lightning.export"
#: How a multi-row identifier becomes one vector (``--method``): ``distill`` (:mod:`adi_lightning.distill`),
#: ``mean`` of the rows, or one ``row``.
METHODS = ("distill", "mean", "row")
#: The default, chosen by measurement (docs/report.md, "One-vector exports").
DEFAULT_METHOD = "distill"
#: The largest residual (:func:`adi_lightning.distill.residual`) written without ``--lossy``.
MAX_RESIDUAL = 0.04
#: The ``--`` flags of :class:`~adi_lightning.distill.DistillSettings` fields (:func:`check_nothing_to_distill`).
SETTINGS_FLAGS = ("steps", "seed")


def single_vector(table: torch.Tensor, row: int | None = None) -> torch.Tensor:
    """``[1, D]``: the mean of the rows, or one row."""
    if row is None:
        return table.mean(dim=0, keepdim=True)
    if not -table.shape[0] <= row < table.shape[0]:
        raise ValueError(f"--row {row} out of range for an identifier with {table.shape[0]} rows")
    return table[row : row + 1]


def _layers_of_row(identifier: str | Path, meta: dict[str, str], rows: int, row: int) -> list[str]:
    """The identifier layers (``attn2`` paths, SD3 joint blocks) that read row ``row`` of the file's
    ``rows`` (its ``layer_to_row``)."""
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


def _format_of(family: str, text_dims: list[int]) -> str:
    """The format that holds an identifier of ``family`` with these ``text_dims`` (for refusals)."""
    if family in SD3_FAMILIES:
        return "sd3"
    if family in FLUX_FAMILIES:
        return "flux"
    return "sdxl" if len(text_dims) == len(SDXL_KEYS) else "ti or webui"


def check_format_fits(identifier: str | Path, fmt: str, family: str, text_dims: list[int], width: int) -> None:
    """Refuse (ValueError, naming the format to use) a ``fmt`` that cannot hold an identifier of
    ``family`` with these ``text_dims`` and row ``width``: ``sd3`` takes SD3 files only (two or three
    text widths), ``flux`` FLUX files only (two), ``ti`` / ``webui`` / ``sdxl`` every other family's,
    ``sdxl`` two widths, ``ti`` / ``webui`` one."""
    if sum(text_dims) != width:
        raise ValueError(f"{identifier}: text_dims {text_dims} do not add up to its row width {width}")
    if fmt == "sd3":
        if family not in SD3_FAMILIES:
            raise ValueError(f"--format sd3 needs an SD3 identifier; {identifier} was trained on a {family} backbone: "
                             f"use --format {_format_of(family, text_dims)}")
        if len(text_dims) not in (2, 3):
            raise ValueError(f"{identifier}: an SD3 identifier has one vector per text encoder (CLIP-L, CLIP-G and "
                             f"T5 when loaded), got text widths {text_dims}")
        return
    if fmt == "flux":
        if family not in FLUX_FAMILIES:
            raise ValueError(f"--format flux needs a FLUX identifier; {identifier} was trained on a {family} backbone: "
                             f"use --format {_format_of(family, text_dims)}")
        if len(text_dims) != len(FLUX_KEYS):
            raise ValueError(f"{identifier}: a FLUX identifier has one vector per text encoder (CLIP-L and T5), got "
                             f"text widths {text_dims}")
        return
    if family not in EXPORTABLE_FAMILIES:
        raise ValueError(f"{identifier} was trained on a {family} backbone: one-vector exports in --format {fmt} are "
                         f"written for {' and '.join(EXPORTABLE_FAMILIES)} identifiers only"
                         + (" (an SD3 identifier's block-wise rows live in the transformer's text stream; "
                            "--format sd3 writes its token-embedding vector as clip_l / clip_g / t5xxl; "
                            "docs/inference.md)" if family in SD3_FAMILIES else "")
                         + (" (--format flux writes a FLUX identifier's token-embedding vector as clip_l / t5xxl; "
                            "docs/inference.md)" if family in FLUX_FAMILIES else ""))
    if fmt == "sdxl" and len(text_dims) != len(SDXL_KEYS):
        raise ValueError(f"--format sdxl needs an SDXL identifier (one vector per text encoder, widths D1 + D2); "
                         f"{identifier} has {len(text_dims)} text encoder(s), widths {text_dims}: "
                         "use --format ti or webui")
    if fmt != "sdxl" and len(text_dims) > 1:
        raise ValueError(f"{identifier} has one vector per text encoder (widths {text_dims}, SDXL): "
                         "use --format sdxl (clip_l / clip_g)")


class LossyExport(ValueError):
    """The one vector loses more of the identifier than :data:`MAX_RESIDUAL` and ``lossy`` was not given."""


@dataclass
class ExportReport:
    """What an export wrote and measured: ``method`` (:data:`METHODS`, or ``"lossless"`` for a
    one-row identifier), ``residual`` of the written vector and ``mean_residual`` of the mean of the
    rows (:func:`adi_lightning.distill.residual`; None when not measured: one row), ``losses`` of
    the distillation steps (empty unless ``distill``)."""

    path: Path
    method: str
    kept: str
    residual: float | None = None
    mean_residual: float | None = None
    losses: list[float] = field(default_factory=list)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_method(method: str | None, row: int | None) -> str:
    """The method ``--method`` / ``--row`` ask for: ``--row N`` alone means ``row``; ``row`` needs
    ``--row``; ``--row`` with ``mean`` / ``distill`` is refused (ValueError)."""
    if method is None:
        return "row" if row is not None else DEFAULT_METHOD
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "row" and row is None:
        raise ValueError("--method row needs --row N (the row to keep)")
    if method != "row" and row is not None:
        raise ValueError(f"--row {row} keeps one row: it goes with --method row, not --method {method}")
    return method


def check_nothing_to_distill(identifier: str | Path, rows: int, pipeline: str | None, device: str | None,
                             settings: DistillSettings | None, subjects, lossy: bool) -> None:
    """Refuse (ValueError, one line naming them as flags) the measurement and distillation arguments given
    (not None; ``lossy`` True) for an identifier whose ``rows`` rows are one vector: it is written as it is,
    nothing is distilled, measured or lost. ``settings`` is named by its fields that differ from
    :class:`~adi_lightning.distill.DistillSettings`'s defaults (``--steps``, ``--seed``, else
    ``settings.<field>``), or ``--steps/--seed`` when none does."""
    named = [flag for flag, value in (("--pipeline", pipeline), ("--device", device)) if value is not None]
    if settings is not None:
        default = DistillSettings()
        changed = [f"--{f.name}" if f.name in SETTINGS_FLAGS else f"settings.{f.name}" for f in fields(settings)
                   if getattr(settings, f.name) != getattr(default, f.name)]
        named += changed or ["/".join(f"--{name}" for name in SETTINGS_FLAGS)]
    named += ["--subjects"] if subjects is not None else []
    named += ["--lossy"] if lossy else []
    if named:
        shape = "one row" if rows == 1 else f"{rows} equal rows"
        raise ValueError(f"{', '.join(named)}: the identifier {identifier} has {shape}, nothing to distill or "
                         "measure (it is written as it is, losslessly, without loading a pipeline): drop "
                         + ("it" if len(named) == 1 else "them"))


def one_vector(identifier: str | Path, table: torch.Tensor, meta: dict[str, str], method: str, row: int | None,
               token: str, pipeline: str | None, device: str | None, settings: DistillSettings,
               subjects=DEFAULT_SUBJECTS, log=print) -> tuple[torch.Tensor, dict]:
    """``(vector [1, D] fp32, measured)`` for a multi-row ``table``: the mean, ``row`` or the
    distilled vector, with its :func:`~adi_lightning.distill.residual` (``measured``: ``residual``,
    ``mean_residual``, ``losses``), on ``pipeline`` (default: the file's ``base_model``) on ``device``."""
    from adi_lightning.backbone import load_backbone
    from adi_lightning.identifier import rows_for_layers

    source = pipeline or meta.get("base_model")
    if not source:
        raise ValueError(f"{identifier} records no base_model: name the pipeline it was learned on with --pipeline")
    if not meta.get("initializer_token"):
        raise ValueError(f"{identifier} records no initializer_token: the loss cannot be measured against the "
                         "untrained identifier")
    family = load_backbone(source, "float32")
    family.pipe.to(device or default_device())
    distill.prepare(family, token)
    rows, layer_to_row = rows_for_layers(identifier, table, meta, family.identifier_layers(), family.identifier_dim)
    untrained = family.initializer_row(meta["initializer_token"]).reshape(1, -1)
    log(f"measuring on {source} ({len(distill.action_prompts(token, subjects))} prompts over "
        f"{', '.join(subjects)}; device {family.denoiser.device})")
    teacher = distill.Teacher(family, rows, layer_to_row, distill.action_prompts(token, subjects), settings)
    mean = single_vector(table)
    measured = {"mean_residual": distill.residual(teacher, mean.to(teacher.device), untrained), "losses": []}
    if method == "distill":
        vector, measured["losses"] = distill.distill(teacher, mean)
    else:
        vector = single_vector(table, row)
    measured["residual"] = (measured["mean_residual"] if method == "mean"
                            else distill.residual(teacher, vector.to(teacher.device), untrained))
    return vector.float().cpu().contiguous(), measured


def export_identifier(identifier: str | Path, out: str | Path, fmt: str = "ti", row: int | None = None,
                      token: str | None = None, overwrite: bool = False, method: str | None = None,
                      pipeline: str | None = None, lossy: bool = False, settings: DistillSettings | None = None,
                      subjects=None, device: str | None = None, log=print) -> ExportReport:
    """Write a one-vector embedding file (``fmt`` in :data:`FORMATS`) atomically; returns what it
    wrote and measured (:class:`ExportReport`).

    ``method`` (:data:`METHODS`; None: ``row`` when ``row`` is given, else :data:`DEFAULT_METHOD`)
    makes the vector of a multi-row identifier; every such vector is measured on ``pipeline``
    (default: the file's ``base_model``) on ``device`` over ``subjects`` (default
    :data:`~adi_lightning.distill.DEFAULT_SUBJECTS`); ``settings``: the distillation budget and draws
    (default :class:`~adi_lightning.distill.DistillSettings`). A one-row identifier (or rows all equal)
    is written as it is: ``pipeline``, ``device``, ``settings``, ``subjects`` given (not None) or
    ``lossy`` are then refused (:func:`check_nothing_to_distill`). ValueError when the format does
    not fit the identifier's family or text encoders (:func:`check_format_fits`), ``row`` is out of
    range, the method and row do not go together or the pipeline does not fit; :class:`LossyExport`
    when the vector's residual exceeds :data:`MAX_RESIDUAL` and not ``lossy``; FileExistsError when
    ``out`` is the identifier, or exists and is not an earlier export replaced with ``overwrite``
    (:func:`check_out`). Nothing is written unless it returns.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    method = resolve_method(method, row)
    check_out(identifier, out, overwrite)
    table, meta = read_identifier(identifier)
    family = meta.get("family", "sd")  # files before the key: SD 1.x/2.x or SDXL
    text_dims = json.loads(meta.get("text_dims", "[]")) or [table.shape[1]]  # files before SDXL: one encoder
    check_format_fits(identifier, fmt, family, text_dims, table.shape[1])
    if row is not None:
        single_vector(table, row)  # out of range: refused before any pipeline is loaded
    token = token or meta.get("placeholder_token") or "<A>"
    lossless = bool((table == table[:1]).all())
    if not lossless and family in FLUX_FAMILIES:
        raise ValueError(f"{identifier} is a block-wise FLUX identifier ({table.shape[0]} different rows): --format "
                         "flux writes one-row (textual-inversion) FLUX identifiers only; the one-vector distillation "
                         "does not run on FLUX yet (docs/method.md 'FLUX'). Use the rows with "
                         "adi_lightning.install_identifier, or train with model.row_groups=shared")
    if lossless:  # one row (Textual Inversion), or rows all equal: nothing is lost
        check_nothing_to_distill(identifier, table.shape[0], pipeline, device, settings, subjects, lossy)
        report = ExportReport(Path(out), "lossless", f"the single shared row of {table.shape[0]} (lossless)")
        vector = table[:1].float().contiguous()
        log(f"{identifier}: one shared row, exported as it is (lossless; --method {method} has nothing to do)")
    else:
        settings = settings or DistillSettings()
        vector, measured = one_vector(identifier, meta=meta, table=table, method=method, row=row, token=token,
                                      pipeline=pipeline, device=device, settings=settings,
                                      subjects=DEFAULT_SUBJECTS if subjects is None else tuple(subjects), log=log)
        if method == "distill":
            kept = f"distilled from {table.shape[0]} rows in {settings.steps} steps"
        elif method == "mean":
            kept = f"mean of {table.shape[0]} rows"
        else:
            layers = ", ".join(_layers_of_row(identifier, meta, table.shape[0], row))
            kept = f"row {row} of {table.shape[0]}, used by {layers}"
        report = ExportReport(Path(out), method, kept, measured["residual"], measured["mean_residual"],
                              measured["losses"])
        report.kept = f"{kept}, residual {report.residual:.3f}"
        log(f"{kept}: residual {report.residual:.3f} (the mean of the rows: {report.mean_residual:.3f}; "
            f"0 = draws what the identifier draws, 1 = as far off as the untrained identifier)")
        if report.residual > MAX_RESIDUAL and not lossy:
            hint = "; more --steps may keep more" if method == "distill" else "; --method distill keeps more"
            raise LossyExport(f"the one vector ({kept}) loses the action: residual {report.residual:.3f} > "
                              f"{MAX_RESIDUAL} (docs/inference.md 'One-vector export'){hint}; add --lossy to "
                              f"write it anyway, or use the layer-wise identifier with adi_lightning.install_identifier")
        if report.residual > MAX_RESIDUAL:
            report.kept += " (lossy)"
    metadata = {"source": str(identifier), "kept": report.kept, "method": report.method,
                "residual": json.dumps(report.residual), "written_by": WRITTEN_BY}
    if fmt == "ti":
        # diffusers format: one tensor, keyed by its token.
        atomic_save_safetensors({token: vector}, out, metadata)
    elif fmt in ("sdxl", "sd3", "flux"):
        # One [1, D_i] tensor per text encoder; the token is the caller's (stored for reference only).
        keys = {"sdxl": SDXL_KEYS, "sd3": SD3_KEYS, "flux": FLUX_KEYS}[fmt]
        parts = {key: part.contiguous() for key, part in zip(keys, vector.split(text_dims, dim=-1))}
        atomic_save_safetensors(parts, out, {**metadata, "token": token})
    else:
        # AUTOMATIC1111 embedding .pt layout.
        payload = {"string_to_token": {"*": 265}, "string_to_param": {"*": vector}, "name": token,
                   "step": int(meta.get("global_step", 0)), "sd_checkpoint": None, "sd_checkpoint_name": None,
                   "written_by": WRITTEN_BY, "kept": report.kept}
        atomic_torch_save(payload, out)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adi_lightning.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identifier", required=True, help="identifier.safetensors written by adi-lightning")
    parser.add_argument("--format", default="ti", choices=FORMATS,
                        help="ti: diffusers load_textual_inversion (.safetensors); webui: AUTOMATIC1111 (.pt); "
                             "sdxl: an SDXL identifier's clip_l / clip_g (.safetensors); sd3: an SD3 identifier's "
                             "clip_l / clip_g (/ t5xxl) (.safetensors); flux: a one-row FLUX identifier's clip_l / "
                             "t5xxl (.safetensors)")
    parser.add_argument("--out", required=True, help="output file; an existing one is refused (see --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out, only if it is an earlier export (never the identifier)")
    parser.add_argument("--method", default=None, choices=METHODS,
                        help=f"how the rows become one vector (default {DEFAULT_METHOD}; --row N alone means row)")
    parser.add_argument("--row", type=int, default=None, help="--method row: keep this row of the file")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"--method distill: optimizer steps (default {DistillSettings.steps})")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"--method distill: the seed of every draw (default {DistillSettings.seed})")
    parser.add_argument("--subjects", nargs="+", default=None,
                        help=f"subjects of the prompts the vector is fitted and measured on (default: "
                             f"{' '.join(DEFAULT_SUBJECTS)}), e.g. words the backbone knows")
    parser.add_argument("--pipeline", default=None,
                        help="the diffusers pipeline the identifier was learned on (default: its recorded base_model)")
    parser.add_argument("--device", default=None, help="torch device for the measurement (default: cuda if available)")
    parser.add_argument("--lossy", action="store_true",
                        help=f"write the vector even when its residual exceeds {MAX_RESIDUAL} (it loses the action)")
    parser.add_argument("--token", default=None, help="token name stored in the file (default: the identifier's)")
    args = parser.parse_args(argv)
    try:
        method = resolve_method(args.method, args.row)
        for flag in SETTINGS_FLAGS:
            if getattr(args, flag) is not None and method != "distill":
                raise ValueError(f"--{flag} is a setting of --method distill, not of --method {method}")
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {args.steps}")
        typed = {k: getattr(args, k) for k in SETTINGS_FLAGS if getattr(args, k) is not None}
        # What was not typed goes in as None (lossy: False), so that export_identifier can refuse what was.
        report = export_identifier(args.identifier, args.out, args.format, args.row, args.token, args.overwrite,
                                   method, args.pipeline, args.lossy, DistillSettings(**typed) if typed else None,
                                   tuple(args.subjects) if args.subjects is not None else None, args.device)
    except (OSError, ValueError) as err:
        print(f"adi_lightning: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {report.path} ({args.format}; {report.kept})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
