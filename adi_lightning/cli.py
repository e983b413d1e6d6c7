"""``python -m adi_lightning {fit,validate,test,predict} --config jump.yaml``.

A bare config name resolves to the path as given, then ``experiments/<name>`` here, then the
project's own experiments (``adi_lightning.paths``), so commands run from any working directory.

Model and data classes are fixed, so every switch is a flat key (``--model.mask_threshold``).
``parser_mode="omegaconf+"`` resolves interpolations after command-line overrides, so a swept
value reaches every key that interpolates it. Each run gets its own, exclusively created folder
under ``trainer.default_root_dir``; the config, run info, identifier and grids land there. A SLURM
job names its folder by job id, so a requeued ``fit`` rejoins it and resumes from its newest
checkpoint (:func:`make_run_dir`).

A run stopped by SIGTERM exits with status 143 (SIGINT: 1) and one line naming the checkpoint to
resume from (:func:`stop_line`; the checkpoint is written by
:class:`~adi_lightning.callbacks.PreemptionCallback`).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
from jsonargparse import ArgumentError, Namespace, set_parsing_settings
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from adi_lightning.arguments import explain_unknown_key, parser_keys, resolve_argv, split_options
from adi_lightning.checks import inert_settings
from adi_lightning.console import default_progress_bar, quiet_libraries, run_summary
from adi_lightning import resume
from adi_lightning.data import ActionTripleDataModule
from adi_lightning.io import atomic_write_text
from adi_lightning.module import ADIModule

RUN_DIR_ENV = "ADI_RUN_DIR"
DEFAULT_ROOT = "outputs"
PROG = "python -m adi_lightning"
DESCRIPTION = ("adi-lightning: learn an action identifier <A> (ADI, Huang et al., CVPR 2024) for a text-to-image "
               "diffusion model, then judge and sample it. Start with: fit --config jump.yaml")
SUBCOMMAND_HELP = {
    "fit": "Train the identifier (resume with --ckpt_path), validating on unseen subjects when a judge is set.",
    "validate": "Generate and judge the validation prompts with a trained identifier (--model.identifier_path).",
    "test": "Generate and judge the test prompts (every test seed) with a trained identifier.",
    "predict": "Generate image grids for data.predict_prompts with a trained identifier.",
}


def callbacks_header() -> list[str]:
    """The comment that heads every dumped config (``--print_config``, the run's ``config.yaml``): the
    callbacks a run uses beside ``trainer.callbacks``, which the method adds in code."""
    from adi_lightning.module import METHOD_CALLBACKS

    return ["Callbacks every run adds in code, besides trainer.callbacks (ADIModule.configure_callbacks;",
            "their settings are model.* keys):",
            *(f"  adi_lightning.callbacks.{name}" for name in METHOD_CALLBACKS),
            f"  {default_progress_bar()} (unless trainer.callbacks names a progress bar or",
            "    trainer.enable_progress_bar is false)",
            "Add your own beside them with --trainer.callbacks+=CLASS_PATH; a list given with '=' replaces",
            "the config files' trainer.callbacks (ModelCheckpoint), never the ones above."]


class ConfigKeyError(ValueError):
    """A key that no parser accepts, explained in one line (see ``adi_lightning.arguments``)."""


def make_run_dir(root: str | os.PathLike, subcommand: str) -> Path:
    """Create a new run folder exclusively (never reuse another run's), and return it.

    DDP child processes (LOCAL_RANK > 0) re-run the command: they join the folder that rank 0
    created, which it passes down through the environment. Processes that a launcher started
    together (torchrun, a SLURM job) agree on a name instead (:func:`_launch_id`). A single-task
    SLURM job creates its ``<subcommand>-slurm<job>`` folder exclusively, and rejoins it only when
    SLURM restarted the job (``SLURM_RESTART_COUNT`` > 0, a requeue); a second command in the same
    job gets a new timestamped folder.
    """
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited and int(os.environ.get("LOCAL_RANK", "0")) > 0:
        return Path(inherited)
    root = Path(root)
    shared = _launch_id()
    if shared:  # torchrun / SLURM start every rank at once: they agree on the name instead
        run_dir = root / f"{subcommand}-{shared}"
        single = _slurm_single_task()
        try:
            root.mkdir(parents=True, exist_ok=True)
            run_dir.mkdir(exist_ok=not single or _slurm_restarts() > 0)
        except FileExistsError:
            shared = None  # another command of this job made it: fall through to a fresh folder
        except OSError as err:
            raise OSError(f"trainer.default_root_dir={str(root)!r} cannot be created: {err.strerror or err}") from err
        else:
            os.environ[RUN_DIR_ENV] = str(run_dir)
            return run_dir
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"trainer.default_root_dir={str(root)!r} cannot be created: {err.strerror or err}") from err
    if not os.access(root, os.W_OK):
        raise PermissionError(f"trainer.default_root_dir={str(root)!r} is not writable")
    for _ in range(100):
        run_dir = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{subcommand}-{secrets.token_hex(3)}"
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        os.environ[RUN_DIR_ENV] = str(run_dir)
        return run_dir
    raise RuntimeError(f"could not create a fresh run folder under {root}")


def _launch_id() -> str | None:
    """An id that every process of one launch shares, when a launcher other than Lightning's own
    started them (torchrun, SLURM with several tasks), or that a requeued single-task SLURM job
    keeps (its job id, or array job and task id); None otherwise."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and os.environ.get("SLURM_JOB_ID"):
        step = os.environ.get("SLURM_STEP_ID", "0")
        return f"slurm{os.environ['SLURM_JOB_ID']}.{step}"
    if _slurm_single_task():
        array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm{array}_{task}" if array and task else f"slurm{os.environ['SLURM_JOB_ID']}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"torchrun-{run_id}"
    return None


def _slurm_single_task() -> bool:
    """A SLURM batch job of one task, as Lightning's ``SLURMEnvironment.detect`` sees one
    (interactive allocations, job name ``bash`` or ``interactive``, are not)."""
    return (bool(os.environ.get("SLURM_JOB_ID")) and int(os.environ.get("SLURM_NTASKS", "0") or 0) == 1
            and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"))


def _slurm_restarts() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


class RunDirConfigCallback(SaveConfigCallback):
    """Saves the resolved config atomically into the run's own folder (rank zero only)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        atomic_write_text(Path(trainer.default_root_dir) / self.config_filename, text)


class ADICLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf+"})
        kwargs.setdefault("save_config_callback", RunDirConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"save_to_log_dir": False})
        kwargs.setdefault("auto_configure_optimizers", False)  # the identifier is the only parameter
        kwargs.setdefault("seed_everything_default", 0)
        super().__init__(ADIModule, ActionTripleDataModule, *args, **kwargs)

    def init_parser(self, **kwargs):
        kwargs.setdefault("exit_on_error", False)  # parse errors become one line (main), not 90 lines of usage
        kwargs.setdefault("prog", PROG)
        # No prefix matching: --trainer.max_step=10 is an unknown key, not max_steps (argparse's
        # abbreviations; jsonargparse 5 turns them off too). Subcommand parsers inherit it.
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)

    def setup_parser(self, add_subcommands, main_kwargs, subparser_kwargs) -> None:
        main_kwargs.setdefault("description", DESCRIPTION)
        for name, text in SUBCOMMAND_HELP.items():
            subparser_kwargs.setdefault(name, {}).setdefault("description", text)
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        action = getattr(self.parser, "_subcommands_action", None)
        for choice in getattr(action, "_choices_actions", []):  # the subcommand list in the top-level --help
            choice.help = SUBCOMMAND_HELP.get(choice.dest, choice.help)
        # --print_config and the saved config.yaml (without subcommands, run=False, the one parser dumps)
        for subparser in getattr(self, "_subcommand_parsers", {}).values() or [self.parser]:
            subparser.dump_header = callbacks_header()

    def parse_arguments(self, parser, args) -> None:
        """Parse with config names resolved (:mod:`adi_lightning.arguments`) and the checkpoint's
        settings under typed flags (:mod:`adi_lightning.resume`); an unknown key is one line."""
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args)
            return
        argv = resolve_argv(list(sys.argv[1:] if args is None else args))
        try:
            self._parse_with_checkpoint(parser, argv)
            self._check_inert_keys(parser, argv)
        except ArgumentError as err:
            subcommands = getattr(parser._subcommands_action, "_name_parser_map", {})
            subcommand = next((a for a in argv if a in subcommands), None)
            keys = parser_keys(subcommands[subcommand] if subcommand else parser)
            raise ConfigKeyError(explain_unknown_key(str(err), argv, keys) or " ".join(str(err).split())) from err

    def _parse_with_checkpoint(self, parser, argv: list[str]) -> None:
        # LightningCLI.parse_arguments, minus its warning about args given beside sys.argv
        self.ckpt_settings = resume.find(argv)
        if self.ckpt_settings is None:
            self.config = parser.parse_args(argv)
            sub = self.config.get("subcommand")
            if not sub or not self.config[sub].get("ckpt_path"):
                return
            self.ckpt_settings = resume.find(argv, self.config[sub].ckpt_path)  # a config file gave ckpt_path
            if self.ckpt_settings is None:
                return
        self.ckpt_settings.check_before_parsing()
        sub_parser = self._subcommand_parsers[self.ckpt_settings.subcommand]
        defaults = sub_parser.get_defaults()
        accepted = {group: set(defaults[group].keys()) for group in ("model", "data")}
        self.config = parser.parse_args(self.ckpt_settings.argv(accepted))
        self.ckpt_settings.check_parsed(self.config[self.ckpt_settings.subcommand])

    def _check_inert_keys(self, parser, argv: list[str]) -> None:
        """Refuse a ``model.*`` / ``data.*`` key typed for ``fit`` that the other settings make inert
        (:func:`adi_lightning.checks.inert_settings`), and name in one console line those that config
        files set. Other subcommands train nothing, so they are not audited."""
        sub = self.config.get("subcommand")
        if sub != "fit":
            return
        config = self.config[sub]
        inert = inert_settings(config.model, config.data)
        if not inert:
            return
        typed = resume.typed_keys(split_options(argv))
        refused = [key for key in inert if key in typed]
        if refused:
            said = "; ".join(f"--{key}={_shown(config[key])} has no effect: {inert[key]}" for key in refused)
            raise ValueError(f"{said}: drop {' and '.join('--' + key for key in refused)}")
        # What files (and flags) set, without the defaults. β is given again so that its link
        # (data.with_partners) resolves when no file sets it; β is never inert.
        explicit = parser.parse_args([*argv, f"--model.mask_threshold={config.model.mask_threshold}"],
                                     defaults=False)[sub]
        from_files = [key for key in inert if _has_key(explicit, key)]
        if from_files and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            reasons = {inert[key]: [k for k in from_files if inert[k] == inert[key]] for key in from_files}
            print("adi_lightning: note: set by config files but without effect in this run: "
                  + "; ".join(f"{', '.join(keys)} ({why})" for why, keys in reasons.items()), file=sys.stderr)

    def _parse_ckpt_path(self) -> None:
        """Off: Lightning 2.6 merges the checkpoint's hyperparameters over the parsed config, typed
        flags included; :meth:`parse_arguments` has merged them under the typed flags already.
        (A private LightningCLI method: lightning is pinned below 2.7, and tests cover it.)"""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.mask_threshold", "data.with_partners", compute_fn=lambda beta: beta < 1.0)
        # A link is not a key a user can set: keep jsonargparse's "Linked arguments" group
        # ("<lambda>(model.mask_threshold) --> data.with_partners") out of --help. Help only: the link still applies.
        for link in getattr(parser, "_links_group", argparse.ArgumentParser())._group_actions:
            link.help = argparse.SUPPRESS

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        run_dir = make_run_dir(trainer.default_root_dir or DEFAULT_ROOT, self.subcommand or "run")
        trainer.default_root_dir = str(run_dir)
        loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
        for logger in loggers:
            init_args = getattr(logger, "init_args", None)
            if init_args is not None and "save_dir" in init_args and init_args.save_dir in (None, ".", "./"):
                init_args.save_dir = str(run_dir)
        _add_progress_bar(trainer)
        _place_checkpoints(trainer, run_dir)
        _add_checkpoint_io(trainer)
        rank_zero = int(os.environ.get("LOCAL_RANK", "0")) == 0
        if rank_zero:
            print(f"adi_lightning: run directory {run_dir}", file=sys.stderr)
        self._checkpoint_of_named(config, run_dir, rank_zero)

    def _checkpoint_of_named(self, config, run_dir: Path, rank_zero: bool) -> None:
        """Resolve ``--ckpt_path last|best|hpc`` in this run's folder or refuse it
        (:func:`adi_lightning.resume.resolve_named`); a requeued SLURM ``fit`` without one resumes
        from its folder's newest checkpoint. Either is said in one line."""
        name = config.get("ckpt_path")
        if name in resume.LIGHTNING_CKPT_NAMES:
            config.ckpt_path = str(resume.resolve_named(name, run_dir, run_dir.parent))
            if rank_zero:
                print(f"adi_lightning: --ckpt_path {name}: {config.ckpt_path}", file=sys.stderr)
        elif name is None and self.subcommand == "fit" and _slurm_restarts() > 0:
            found = resume.newest_checkpoint(run_dir)
            if found is not None:
                config.ckpt_path = str(found)
            if rank_zero:
                print(f"adi_lightning: SLURM restarted this job ({_slurm_restarts()} time(s)): "
                      + (f"resuming from {found}" if found else f"no checkpoint in {run_dir}, starting over"),
                      file=sys.stderr)


def _shown(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _has_key(namespace, key: str) -> bool:
    group, name = key.split(".", 1)
    part = namespace.get(group)
    return part is not None and any(k == name or k.startswith(name + ".") for k in part.keys())


def _add_progress_bar(trainer) -> None:
    """Lightning's bar, configured for step-bounded runs (adi_lightning.console), unless the config
    disables the bar or names its own."""
    if trainer.enable_progress_bar is False:
        return
    callbacks = trainer.callbacks if isinstance(trainer.callbacks, list) else [] if trainer.callbacks is None else None
    if callbacks is None or any("ProgressBar" in str(getattr(c, "class_path", type(c).__name__)) for c in callbacks):
        return
    trainer.callbacks = [*callbacks, Namespace(class_path=default_progress_bar(), init_args=Namespace())]


#: Where every ModelCheckpoint without its own ``dirpath`` writes, under any logger (docs/outputs.md).
CHECKPOINT_DIR = "checkpoints"


def _place_checkpoints(trainer, run_dir: Path) -> None:
    """Checkpoints in ``<run>/checkpoints/`` whatever the logger (Lightning would nest them under the
    logger's own folder: ``lightning_logs/version_0/`` for CSV, ``<project>/<id>/`` for W&B). A
    ModelCheckpoint that names its ``dirpath`` keeps it; without any, Lightning's default checkpoint
    callback is added here with this folder (unless ``enable_checkpointing`` is false)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = trainer.callbacks if isinstance(trainer.callbacks, list) else [] if trainer.callbacks is None else None
    if callbacks is None:
        return
    folder = str(run_dir / CHECKPOINT_DIR)
    found = False
    for callback in callbacks:
        path = getattr(callback, "class_path", None)
        cls = _import_class(path) if path else type(callback)
        if not (isinstance(cls, type) and issubclass(cls, ModelCheckpoint)):
            continue
        found = True
        if path is None:  # an instance (Python callers)
            if callback.dirpath is None:
                callback.dirpath = folder
        elif callback.init_args is None or callback.init_args.get("dirpath") is None:
            if callback.init_args is None:
                callback.init_args = Namespace()
            callback.init_args.dirpath = folder
    if not found and trainer.enable_checkpointing is not False:
        path = f"{ModelCheckpoint.__module__}.{ModelCheckpoint.__name__}"
        trainer.callbacks = [*callbacks, Namespace(class_path=path, init_args=Namespace(dirpath=folder))]


def _add_checkpoint_io(trainer) -> None:
    """Checkpoints are written atomically beside their target (:mod:`adi_lightning.checkpoint_io`),
    unless the config names its own CheckpointIO plugin."""
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

    from adi_lightning.checkpoint_io import AtomicCheckpointIO

    plugins = trainer.plugins if isinstance(trainer.plugins, list) else [] if trainer.plugins is None else [trainer.plugins]
    for plugin in plugins:
        path = plugin if isinstance(plugin, str) else getattr(plugin, "class_path", None)
        cls = type(plugin) if path is None else _import_class(path)
        if isinstance(cls, type) and issubclass(cls, CheckpointIO):
            return
    path = f"{AtomicCheckpointIO.__module__}.{AtomicCheckpointIO.__name__}"
    trainer.plugins = [*plugins, Namespace(class_path=path, init_args=Namespace())]


def _import_class(path: str):
    from importlib import import_module

    module, _, name = path.rpartition(".")
    try:
        return getattr(import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None  # not a class path (a precision name such as "bf16-mixed"): Lightning decides


def main(args=None) -> None:
    """Entry point; known input errors print one clear line instead of a traceback, a failed run
    keeps its folder only when the folder holds a result (:func:`settle_failed_run`), and a finished
    command prints what it wrote (adi_lightning.console.run_summary)."""
    quiet_libraries()
    from adi_lightning.backbone import BackboneError
    from adi_lightning.data import DataLayoutError

    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        os.environ.pop(RUN_DIR_ENV, None)  # a fresh command never joins an earlier run's folder
    known = (BackboneError, DataLayoutError, OSError, FloatingPointError, ValueError)
    started = time.time()
    try:
        cli = ADICLI(args=args)
    except BaseException as err:
        stopped = _stop_signal(err)
        if stopped:
            run_dir = os.environ.get(RUN_DIR_ENV)
            kept = settle_failed_run(run_dir)
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                print(stop_line(stopped, kept, list(sys.argv[1:] if args is None else args)), file=sys.stderr)
            raise SystemExit(128 + signal.SIGTERM if stopped == "SIGTERM" else 1) from err
        if isinstance(err, SystemExit) and err.code in (0, None):
            raise
        report = isinstance(err, known) and not os.environ.get("ADI_DEBUG")
        if report:
            print(f"adi_lightning: error: {err}", file=sys.stderr)
        settle_failed_run(os.environ.get(RUN_DIR_ENV))
        if report:
            raise SystemExit(1) from err
        raise  # not an input error (a bug, Ctrl+C): keep the traceback
    if cli.subcommand and cli.trainer.is_global_zero:
        print("\n".join(run_summary(cli.subcommand, cli.trainer.default_root_dir, time.time() - started)))


def _stop_signal(err: BaseException) -> str | None:
    """``"SIGTERM"`` for Lightning's SIGTERMException, ``"SIGINT"`` for Ctrl+C (Lightning turns a
    KeyboardInterrupt during a run into ``SystemExit(1)``), else None."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if isinstance(err, SIGTERMException):
        return "SIGTERM"
    if isinstance(err, KeyboardInterrupt) or (isinstance(err, SystemExit) and err.code == 1
                                              and isinstance(err.__context__, KeyboardInterrupt)):
        return "SIGINT"
    return None


def stop_line(stopped: str, run_dir: Path | None, argv: list[str]) -> str:
    """One line: what stopped the command and, for ``fit``, the command that resumes it from the
    run folder's newest checkpoint (``argv`` with its ``--ckpt_path`` replaced)."""
    from adi_lightning.arguments import option_name, split_options
    from adi_lightning.callbacks import STOPPED_NAME

    options = split_options(argv)
    subcommand = next((o[0] for o in options if len(o) == 1 and o[0] in resume.SUBCOMMANDS), None)
    ckpt = None
    if run_dir is not None and subcommand == "fit":  # the checkpoint written at the signal, else the newest
        ckpt = resume.newest_checkpoint(run_dir, STOPPED_NAME.format(step="*")) or resume.newest_checkpoint(run_dir)
    if ckpt is None:
        what = "the run wrote no checkpoint to resume from" if subcommand == "fit" else "nothing to resume"
        return f"adi_lightning: stopped by {stopped}; {what}: rerun the command to start over"
    step = torch.load(ckpt, map_location="cpu", weights_only=True).get("global_step")
    kept = [tok for o in options if option_name(o) != "--ckpt_path" for tok in o]
    command = " ".join([PROG, shlex.join([*kept, "--ckpt_path", str(ckpt)])])
    return f"adi_lightning: stopped by {stopped} at step {step}; resume with: {command}"


def settle_failed_run(run_dir: str | None) -> Path | None:
    """Apply the failed-run rule (:mod:`adi_lightning.callbacks.failed_run`) on rank zero: keep
    the folder when it holds a result and say so on stderr, remove it otherwise. Returns the
    kept folder, or None."""
    from adi_lightning.callbacks import run_results

    first = int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
    if not run_dir or not Path(run_dir).is_dir() or not first:
        return None
    results = [str(p.relative_to(run_dir)) for p in run_results(run_dir)]
    if not results:
        shutil.rmtree(run_dir)
        return None
    shown = ", ".join(results[:5]) + (f" and {len(results) - 5} more" if len(results) > 5 else "")
    print(f"adi_lightning: the failed run's folder is kept: {run_dir} (it holds {shown})", file=sys.stderr)
    return Path(run_dir)
