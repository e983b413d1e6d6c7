"""Load and freeze a diffusers pipeline (a local folder or a hub id) as its backbone family.

One path for every backbone: the tiny test pipelines, the toy pipeline and real weights all go
through :func:`load_backbone`: the ``_class_name`` of the folder's ``model_index.json`` picks the
family (:mod:`adi_lightning.families`), whose stock pipeline class ``from_pretrained`` loads it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Every family has these; its text encoders and tokenizers are its own (BackboneFamily.text_parts), and so
# is its denoiser (BackboneFamily.denoiser_part: unet, transformer).
PIPELINE_PARTS = ("vae", "scheduler")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class BackboneError(ValueError):
    """The configured model path does not lead to a usable Stable Diffusion pipeline."""


@dataclass
class BackboneInfo:
    """What was found in the pipeline, reported at load time (``text_dim``: the identifier's row
    width D, the sum of the text encoders' widths)."""

    source: str
    family: str
    num_cross_attention_layers: int
    text_dim: int
    prediction_type: str
    latent_channels: int
    vae_scale_factor: int
    #: What the identifier's layers are (``num_cross_attention_layers`` counts them): ``attn2`` layers of a
    #: UNet, or an MMDiT's joint blocks.
    layer_kind: str = "cross-attention layers"

    def describe(self) -> str:
        return (
            f"backbone {self.source} ({self.family}): {self.num_cross_attention_layers} {self.layer_kind}, "
            f"text width D={self.text_dim}, prediction={self.prediction_type}, "
            f"latent channels={self.latent_channels}, VAE factor={self.vae_scale_factor}"
        )


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"model.weight_dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


def check_pipeline_source(name_or_path: str) -> None:
    """Fail early with a message that names the key, before diffusers' generic errors."""
    key = "model.pretrained_model_name_or_path"
    if not name_or_path:
        raise BackboneError(f"{key} is not set")
    path = Path(os.path.expanduser(name_or_path))
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BackboneError(
                f"{key}={name_or_path!r} is a folder but not a diffusers pipeline: it has no "
                "model_index.json (save one with pipe.save_pretrained(folder))"
            )
        missing = [part for part in PIPELINE_PARTS if not (path / part).is_dir()]
        if missing:
            raise BackboneError(
                f"{key}={name_or_path!r} is not a diffusers pipeline folder: missing {missing}"
            )
        return
    if path.exists():
        raise BackboneError(f"{key}={name_or_path!r} is a file, not a diffusers pipeline folder")
    if not _HUB_ID.match(name_or_path) or name_or_path.startswith((".", "/", "~")):
        from adi_lightning.paths import build_command

        command = build_command(name_or_path)
        built = f"; this project builds that folder with: {command}" if command else ""
        raise BackboneError(f"{key}={name_or_path!r}: no such folder (and not a hub id like 'org/name'){built}")


def pipeline_index(name_or_path: str, local_files_only: bool, revision: str | None = None) -> dict:
    """The pipeline's ``model_index.json`` (a local folder, or a hub id's cached config)."""
    local = Path(os.path.expanduser(name_or_path))
    if local.is_dir():
        return json.loads((local / "model_index.json").read_text())
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(name_or_path, local_files_only=local_files_only, revision=revision))


def pipeline_class_name(name_or_path: str, local_files_only: bool, revision: str | None = None) -> str:
    """``_class_name`` of the pipeline's ``model_index.json`` (a local folder, or a hub id's cached config)."""
    return pipeline_index(name_or_path, local_files_only, revision).get("_class_name", "")


def family_class(class_name: str, source: str = "the pipeline") -> type:
    """The :class:`~adi_lightning.families.BackboneFamily` of a pipeline class name (``families.FAMILIES``);
    BackboneError naming ``source`` and what is supported."""
    from adi_lightning.families import FAMILIES, NOT_YET

    if class_name in FAMILIES:
        return FAMILIES[class_name]
    supported = ", ".join(FAMILIES)
    if class_name in NOT_YET:
        raise BackboneError(f"{source} is a {class_name} ({NOT_YET[class_name]}): not yet supported by "
                            f"adi-lightning (supported: {supported})")
    raise BackboneError(f"{source} is a {class_name or 'pipeline without _class_name'}, which adi-lightning does not "
                        f"support (supported: {supported})")


def family_of(pipe):
    """The family over a loaded pipeline object (its class or a base class names the family)."""
    from adi_lightning.families import FAMILIES

    known = {**FAMILIES, **{family.img2img_class_name: family for family in FAMILIES.values()}}
    for cls in type(pipe).__mro__:
        if cls.__name__ in known:
            return known[cls.__name__](pipe)
    return family_class(type(pipe).__name__, f"a {type(pipe).__name__} object")(pipe)


def load_backbone(
    name_or_path: str,
    weight_dtype: str = "float32",
    variant: str | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
):
    """Load a pipeline as its :class:`~adi_lightning.families.BackboneFamily`, parts frozen, in eval mode.

    A relative folder that does not exist from the working directory is looked up in the project
    (``adi_lightning.paths.resolve_project_path``: the shipped toy pipeline from any directory).
    """
    from adi_lightning.paths import resolve_project_path

    name_or_path = resolve_project_path(name_or_path)
    check_pipeline_source(name_or_path)
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    kwargs = dict(
        dtype=resolve_dtype(weight_dtype),
        local_files_only=local_files_only,
        low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
    )
    if variant:
        kwargs["variant"] = variant
    if revision:
        kwargs["revision"] = revision
    local = Path(os.path.expanduser(name_or_path))
    try:
        index = pipeline_index(name_or_path, local_files_only, revision)
        class_name = index.get("_class_name", "")
        family = family_class(class_name, f"model.pretrained_model_name_or_path={name_or_path!r}")
        parts = (family.denoiser_part, *family.text_parts, *family.tokenizer_parts)
        missing = [p for p in parts if local.is_dir() and not (local / p).is_dir()]
        if missing:
            raise BackboneError(f"model.pretrained_model_name_or_path={name_or_path!r} is a {class_name} folder "
                                f"missing {missing}")
        pipe = family.pipeline_class().from_pretrained(os.path.expanduser(name_or_path), **kwargs, **family.load_kwargs,
                                                       **family.folder_load_kwargs(index))
    except BackboneError:
        raise
    except Exception as err:
        hint = "" if local.exists() else f"; there is no local folder {str(local.absolute())!r} either"
        raise BackboneError(
            f"model.pretrained_model_name_or_path={name_or_path!r} could not be loaded as a hub id "
            f"(local_files_only={local_files_only}){hint}: {type(err).__name__}: {err}"
        ) from err
    backbone = family(pipe)
    for part in backbone.modules().values():
        part.requires_grad_(False)
        part.eval()
    pipe.set_progress_bar_config(disable=True)
    return backbone


def backbone_identity(name_or_path: str, variant: str | None = None, revision: str | None = None) -> dict:
    """What identifies the backbone's weights, cheap to compute (no file is read): ``files``, each
    model file's ``[relative path, size in bytes, mtime in ns]`` under the pipeline folder (links
    followed, hidden entries skipped), plus ``variant`` and ``revision``. A hub id is the folder of
    its cached snapshot (``snapshot``: the commit) when the hub cache holds one, else ``files`` is
    empty. New weights at the same path change a size or an mtime, so a cache keyed by this is
    rebuilt; copying a folder without keeping mtimes rebuilds it too.
    """
    from adi_lightning.paths import resolve_project_path

    local = Path(os.path.expanduser(resolve_project_path(name_or_path)))
    out: dict = {"source": name_or_path, "variant": variant, "revision": revision}
    if not local.is_dir():
        local = _hub_snapshot(name_or_path, revision)
        out["snapshot"] = local.name if local is not None else None
    out["files"] = _file_stats(local) if local is not None else []
    return out


def _file_stats(folder: Path) -> list[list]:
    found = []
    for parent, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(n for n in names if not n.startswith(".")):
            path = Path(parent) / name
            try:
                stat = path.stat()
                found.append([path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns])
            except OSError:  # a dangling link: recorded as such
                found.append([path.relative_to(folder).as_posix(), None, None])
    return found


def _hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The hub cache's snapshot folder of ``repo_id`` at ``revision``, or None when not cached."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "model_index.json", revision=revision)
    except Exception:  # not a valid repo id, no hub library: nothing cached to describe
        return None
    return Path(found).parent if isinstance(found, str) else None


def load_pipeline(name_or_path: str, weight_dtype: str = "float32", **kwargs):
    """The frozen stock pipeline of :func:`load_backbone` (e.g. ``StableDiffusionPipeline``)."""
    return load_backbone(name_or_path, weight_dtype, **kwargs).pipe


def describe_pipeline(pipe, source: str) -> BackboneInfo:
    """What :class:`BackboneInfo` reports about a loaded pipeline of a supported family."""
    family = family_of(pipe)
    return BackboneInfo(
        source=source,
        family=family.name,
        num_cross_attention_layers=len(family.identifier_layers()),
        text_dim=family.identifier_dim,
        prediction_type=family.training_objective().prediction_type,
        latent_channels=family.denoiser.config.in_channels,
        vae_scale_factor=2 ** (len(pipe.vae.config.block_out_channels) - 1),
        layer_kind=family.layer_kind,
    )
