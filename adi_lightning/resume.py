"""What a checkpoint contributes to a command (``--ckpt_path``), and what it may not change.

Precedence, lowest first: the classes' defaults < ``--config`` files (and group files such as
``--model configs/model/adi.yaml``) < the checkpoint's model and data hyperparameters < keys typed
on the command line (``--model.learning_rate=0.5``, ``--data.seed=3``). The CLI applies it by
rewriting the command line before it is parsed: group files first, then the checkpoint's values,
then every other argument in the order given. So ``config.yaml`` records what the run used, and a
checkpoint alone (no ``--config``) fills every model and data key it stores.

``--ckpt_path`` takes a checkpoint file or a run folder; a folder means its newest checkpoint
(:func:`newest_checkpoint`), and one console line names the file. Lightning's names ``last``,
``best`` and ``hpc`` look inside the command's own run folder, which is new for every command, so
they are refused with the newest checkpoint under ``trainer.default_root_dir`` as the suggestion
(:func:`resolve_named`); ``last`` and ``hpc`` resolve only in a folder that a requeued SLURM job
rejoins (docs/distributed.md).

Lightning 2.6's own ``LightningCLI._parse_ckpt_path`` merges the checkpoint's hyperparameters over
the whole parsed config, typed flags included; :class:`adi_lightning.cli.ADICLI` turns it off.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adi_lightning.arguments import option_name, option_value, split_options
from adi_lightning.backbone import BackboneError, check_pipeline_source

SUBCOMMANDS = ("fit", "validate", "test", "predict")
GROUP_FILES = ("--config", "-c", "--model", "--data", "--trainer")
# Lightning resolves these ckpt_path values itself; they are not files to read settings from.
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc")
# Model keys a checkpoint fixes: a typed value that differs is refused, with the reason.
UNCHANGEABLE = {"layerwise": "it sets the identifier's row count", "row_groups": "it sets the identifier's rows"}
BACKBONE = "pretrained_model_name_or_path"
#: Keys whose None (unset) is the backbone family's default (``BackboneFamily.guidance``): a typed value is
#: compared with the checkpoint's by the value in force.
FAMILY_DEFAULT_KEYS = ("model.guidance_scale", "data.generate_guidance")


def _short(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def config_family(config) -> type | None:
    """The :class:`~adi_lightning.families.BackboneFamily` class of ``config.model``'s backbone, read from its
    ``model_index.json`` (local files only, nothing loaded); None when that cannot be read."""
    from adi_lightning.backbone import family_class, pipeline_class_name
    from adi_lightning.paths import resolve_project_path

    try:
        source = resolve_project_path(config.model[BACKBONE])
        return family_class(pipeline_class_name(source, True, getattr(config.model, "revision", None)))
    except Exception:  # noqa: BLE001 - only the wording of a note depends on it; loading the backbone says why
        return None


def typed_keys(options: list[list[str]]) -> set[str]:
    """The ``model.x`` / ``data.x`` keys typed as flags in ``options`` (:func:`~adi_lightning.arguments.
    split_options` of a command line), not those that group files (``--model preset.yaml``) give."""
    keys = set()
    for option in options:
        parts = option_name(option)[2:].split(".")
        if option_name(option).startswith("--") and len(parts) >= 2 and parts[0] in ("model", "data"):
            keys.add(f"{parts[0]}.{parts[1]}")
    return keys


@dataclass
class CheckpointSettings:
    """The model and data settings a checkpoint stores, and the keys typed on the command line."""

    path: str
    subcommand: str
    before: list[list[str]]  # the options before the subcommand, kept in place
    options: list[list[str]]  # the subcommand's options
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)
    global_step: int | None = None

    @property
    def typed(self) -> set[str]:
        """``model.x`` / ``data.x`` keys typed as flags (not from config files)."""
        return typed_keys(self.options)

    @property
    def has_config(self) -> bool:
        return any(option_name(o) in GROUP_FILES for o in self.before + self.options)

    def argv(self, accepted: dict[str, set[str]]) -> list[str]:
        """The command line with the checkpoint's settings between the group files and the rest.

        ``accepted`` names the keys each group's parser takes (link targets such as
        ``data.with_partners`` are derived, so they are left out).
        """
        import json

        typed = self.typed
        files = [o for o in self.options if option_name(o) in GROUP_FILES]
        rest = [o for o in self.options if option_name(o) not in GROUP_FILES]
        inserted = []
        for group in ("model", "data"):
            values = {k: v for k, v in self.stored.get(group, {}).items()
                      if k in accepted.get(group, ()) and f"{group}.{k}" not in typed}
            if values:
                inserted.append([f"--{group}", json.dumps(values)])
        flat = [tok for option in (*self.before, [self.subcommand], *files, *inserted, *rest) for tok in option]
        return flat

    def check_before_parsing(self) -> None:
        """Refuse, with the flag to add, what the checkpoint cannot provide."""
        model, typed = self.stored.get("model", {}), self.typed
        if f"model.{BACKBONE}" in typed:
            return
        if not model.get(BACKBONE):
            if not self.has_config:
                raise ValueError(f"checkpoint {self.path} stores no model.{BACKBONE}: add "
                                 f"--model.{BACKBONE}=PATH (or a --config that sets it)")
            return
        try:
            check_pipeline_source(model[BACKBONE])
        except BackboneError as err:
            raise BackboneError(f"{err}; it is the backbone stored in checkpoint {self.path}: give its location "
                                f"on this machine with --model.{BACKBONE}=PATH") from err

    def check_parsed(self, config) -> None:
        """Refuse typed values the checkpoint fixes and a fit with no step left (the checkpoint at or past
        ``trainer.max_steps``: Lightning would exit at once, with no identifier), and say which typed
        values replace stored ones (:data:`FAMILY_DEFAULT_KEYS` compared by the value in force, so a typed
        null that resolves to the checkpoint's value replaces nothing)."""
        model, typed = self.stored.get("model", {}), self.typed
        for key, why in UNCHANGEABLE.items():
            if key in model and config.model[key] != model[key]:
                raise ValueError(f"model.{key}={config.model[key]} cannot change on resume: checkpoint {self.path} "
                                 f"was trained with model.{key}={model[key]} ({why}); drop --model.{key}")
        if "model.identifier_path" in typed and config.model.identifier_path:
            raise ValueError("model.identifier_path and --ckpt_path both give the identifier (the checkpoint's "
                             "would replace the file's): give one of them")
        if self.subcommand == "fit" and not self.has_config and config.trainer.max_steps in (None, -1) \
                and config.trainer.max_epochs is None:
            raise ValueError(f"fit from checkpoint {self.path} alone has no stopping point (it is at global step "
                             f"{self.global_step}): add --trainer.max_steps=N, or --config with the run's settings")
        max_steps = config.trainer.max_steps
        if self.subcommand == "fit" and self.global_step is not None and max_steps not in (None, -1) \
                and self.global_step >= max_steps:
            raise ValueError(f"checkpoint {self.path} is at global step {self.global_step} and trainer.max_steps="
                             f"{max_steps}: fit would train nothing; give --trainer.max_steps larger than "
                             f"{self.global_step} to train on")
        replaced = []
        family = config_family(config) if typed & set(FAMILY_DEFAULT_KEYS) else None
        for key in sorted(typed):
            group, name = key.split(".")
            stored = self.stored.get(group, {})
            if name not in stored:
                continue
            value, before, shown = config[key], stored[name], _short(config[key])
            if key in FAMILY_DEFAULT_KEYS and family is not None:  # None: the family's default, the value in force
                value, before = family.guidance(value), family.guidance(before)
                shown += f" ({family.name}'s default {value})" if config[key] is None else ""
            if value != before:
                replaced.append(f"{key}={shown} (checkpoint: {_short(stored[name])})")
        if replaced and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"adi_lightning: typed over the checkpoint's settings: {', '.join(replaced)}", file=sys.stderr)


def read_stored(path: str) -> tuple[dict[str, dict[str, Any]], int | None]:
    """``({"model": ..., "data": ...}, global_step)`` from a checkpoint file. The stored
    ``identifier_path`` is dropped: on resume the identifier comes from the checkpoint."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line message
        first = (str(err).splitlines() or [""])[0][:160]
        raise ValueError(f"ckpt_path={path!r} is not a readable checkpoint ({type(err).__name__}: {first})") from err
    stored = {}
    for group, key in (("model", "hyper_parameters"), ("data", "datamodule_hyper_parameters")):
        values = {k: v for k, v in dict(ckpt.get(key) or {}).items() if not k.startswith("_")}
        if values:
            stored[group] = values
    if "model" in stored:
        stored["model"]["identifier_path"] = None
    return stored, ckpt.get("global_step")


def newest_checkpoint(folder: str | os.PathLike, pattern: str = "*.ckpt") -> Path | None:
    """The most recently written checkpoint (``pattern``) anywhere under ``folder``, or None.
    Hidden files (an atomic writer's temp files) are skipped; equal times go to the later name."""
    found = [p for p in Path(folder).rglob(pattern) if p.is_file() and not p.name.startswith(".")]
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name), default=None)


def resolve_named(name: str, run_dir: str | os.PathLike, root: str | os.PathLike) -> Path:
    """The checkpoint Lightning's ``name`` (``last``, ``hpc``) means in ``run_dir``: its newest
    one. ValueError for ``best``, and for a run folder without such a checkpoint (every command
    gets a new folder, so that is the usual case), naming the newest checkpoint under ``root``."""
    pattern = "hpc_ckpt_*.ckpt" if name == "hpc" else "*.ckpt"
    found = newest_checkpoint(run_dir, pattern) if name != "best" else None
    if found is not None:
        return found
    others = [p for p in Path(root).glob("*") if p.is_dir() and p.resolve() != Path(run_dir).resolve()]
    candidates = [c for c in (newest_checkpoint(p) for p in others) if c is not None]
    newest = max(candidates, key=lambda p: (p.stat().st_mtime_ns, p.name), default=None)
    why = (f"this command's run folder {run_dir} is new and holds no {pattern}" if name != "best" else
           "each command runs in a new process and run folder, so no best checkpoint is known")
    hint = (f"give a checkpoint file or a run folder, e.g. the newest under {root}: --ckpt_path {newest}"
            if newest is not None else f"give a checkpoint file or a run folder (there is none under {root})")
    raise ValueError(f"--ckpt_path {name} is ambiguous here: {why}; {hint}")


def _in_folder(path: str) -> str:
    """``path``, or the newest checkpoint in it when it is a folder (said in one line)."""
    if not Path(path).is_dir():
        return path
    found = newest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"ckpt_path={path!r} is a folder without a checkpoint (*.ckpt) in it")
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"adi_lightning: --ckpt_path {path}: using its newest checkpoint, {found}", file=sys.stderr)
    return str(found)


def find(argv: list[str], ckpt_path: str | None = None) -> CheckpointSettings | None:
    """The checkpoint settings of a command line: from its ``--ckpt_path``, or ``ckpt_path``
    when a config file gave it. None without one, or for Lightning's named checkpoints. A run
    folder is replaced by its newest checkpoint, in the returned settings' command line too."""
    options = split_options(list(argv))
    at = next((i for i, o in enumerate(options) if len(o) == 1 and o[0] in SUBCOMMANDS), None)
    if at is None:
        return None
    before, sub, rest = options[:at], options[at][0], options[at + 1 :]
    path = ckpt_path
    for option in rest:
        if option_name(option) == "--ckpt_path":
            path = option_value(option)
    if not path or path in ("null", "None") or path in LIGHTNING_CKPT_NAMES or path.startswith("registry"):
        return None
    resolved = _in_folder(path)
    if resolved != path:
        rest = [o for o in rest if option_name(o) != "--ckpt_path"] + [["--ckpt_path", resolved]]
        path = resolved
    if not Path(path).is_file():
        raise FileNotFoundError(f"ckpt_path={path!r}: no such checkpoint file")
    settings = CheckpointSettings(path, sub, before, rest)
    settings.stored, settings.global_step = read_stored(path)
    return settings


def check_identifier_fits(checkpoint: dict, identifier) -> None:
    """Refuse a checkpoint whose identifier does not fit this model (another backbone's layers or
    width, or another ``model.layerwise`` / ``model.row_groups``), naming the difference."""
    table = checkpoint.get("state_dict", {}).get("identifier.embedding")
    if table is None:
        raise ValueError("the checkpoint holds no identifier ('identifier.embedding'): not an adi-lightning checkpoint")
    saved = checkpoint.get("adi_identifier", {}).get("layer_paths")
    if saved is not None and saved != identifier.layer_paths:
        raise ValueError(f"checkpoint was made for a pipeline with different cross-attention layers or joint blocks "
                         f"(its identifier's {len(saved)} layers begin {saved[0]!r}; this pipeline's "
                         f"{len(identifier.layer_paths)} begin {identifier.layer_paths[0]!r}): resume it on the "
                         "backbone it was trained on")
    if tuple(table.shape) != (identifier.num_rows, identifier.dim):
        raise ValueError(f"the checkpoint's identifier is {tuple(table.shape)} (rows, width) but this pipeline and "
                         f"model.row_groups need {(identifier.num_rows, identifier.dim)}")


def rng_states_for_checkpoint() -> dict:
    """Global RNG states (Lightning's ``_collect_rng_states``) in types that
    ``torch.load(weights_only=True)`` accepts; a checkpoint stores them as ``adi_rng_states``."""
    from lightning.fabric.utilities.seed import _collect_rng_states

    states = _collect_rng_states()
    # Training randomness is keyed per triple; CUDA states would only break a resume on fewer GPUs.
    states.pop("torch.cuda", None)
    kind, keys, pos, has_gauss, cached = states["numpy"]
    states["numpy"] = (kind, keys.tolist(), int(pos), int(has_gauss), float(cached))
    return states
