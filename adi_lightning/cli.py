"""``python -m adi_lightning {fit,validate,test,predict} --config experiments/X.yaml``.

Model and data classes are fixed, so every switch is a flat key (``--model.mask_threshold``).
``parser_mode="omegaconf+"`` resolves interpolations after command-line overrides, so a swept
value reaches every key that interpolates it. Each run gets its own, exclusively created folder
under ``trainer.default_root_dir``; the config, run info, identifier and grids land there.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
import time
import warnings
from pathlib import Path

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from adi_lightning import resume
from adi_lightning.data import ActionTripleDataModule
from adi_lightning.io import atomic_write_text
from adi_lightning.module import ADIModule

RUN_DIR_ENV = "ADI_RUN_DIR"
DEFAULT_ROOT = "outputs"


def make_run_dir(root: str | os.PathLike, subcommand: str) -> Path:
    """Create a new run folder exclusively (never reuse another run's), and return it.

    DDP child processes (LOCAL_RANK > 0) re-run the command: they join the folder that rank 0
    created, which it passes down through the environment.
    """
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited and int(os.environ.get("LOCAL_RANK", "0")) > 0:
        return Path(inherited)
    root = Path(root)
    shared = _launch_id()
    if shared:  # torchrun / SLURM start every rank at once: they agree on the name instead
        run_dir = root / f"{subcommand}-{shared}"
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"trainer.default_root_dir={str(root)!r} cannot be created: {err.strerror or err}") from err
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
    """An id that every process of one multi-process launch shares, when a launcher other than
    Lightning's own started them (torchrun, SLURM with several tasks); None otherwise."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and os.environ.get("SLURM_JOB_ID"):
        step = os.environ.get("SLURM_STEP_ID", "0")
        return f"slurm{os.environ['SLURM_JOB_ID']}.{step}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"torchrun-{run_id}"
    return None


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

    def parse_arguments(self, parser, args) -> None:
        """Parse with the checkpoint's settings under typed flags (see :mod:`adi_lightning.resume`)."""
        if isinstance(args, dict) or (args is not None and not isinstance(args, (list, tuple))):
            return super().parse_arguments(parser, args)
        argv = list(sys.argv[1:] if args is None else args)
        self.ckpt_settings = resume.find(argv)
        if self.ckpt_settings is None:
            super().parse_arguments(parser, args)
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

    def _parse_ckpt_path(self) -> None:
        """Off: Lightning 2.6 merges the checkpoint's hyperparameters over the parsed config, typed
        flags included; :meth:`parse_arguments` has merged them under the typed flags already.
        (A private LightningCLI method: lightning is pinned below 2.7, and tests cover it.)"""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.mask_threshold", "data.with_partners", compute_fn=lambda beta: beta < 1.0)

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
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"adi_lightning: run directory {run_dir}", file=sys.stderr)


class _DropTorchvisionNotice(logging.Filter):
    """transformers warns on import that torchvision is missing; we never use its image processors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


def main(args=None) -> None:
    """Entry point; known input errors print one clear line instead of a traceback."""
    logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionNotice())
    # The frozen backbone is in eval mode on purpose (ADIModule.train keeps it there).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    from adi_lightning.backbone import BackboneError
    from adi_lightning.data import DataLayoutError

    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        os.environ.pop(RUN_DIR_ENV, None)  # a fresh command never joins an earlier run's folder
    known = (BackboneError, DataLayoutError, OSError, FloatingPointError, ValueError)
    try:
        ADICLI(args=args)
    except known as err:
        if os.environ.get("ADI_DEBUG"):
            raise
        print(f"adi_lightning: error: {err}", file=sys.stderr)
        _remove_if_empty(os.environ.get(RUN_DIR_ENV))
        raise SystemExit(1) from err


def _remove_if_empty(run_dir: str | None) -> None:
    """A run that failed before producing anything (at most its config and run info) leaves no
    folder behind."""
    if not run_dir or not Path(run_dir).is_dir():
        return
    files = [p for p in Path(run_dir).rglob("*") if p.is_file()]
    if all(p.parent == Path(run_dir) and p.name in ("config.yaml", "run_info.json") for p in files):
        shutil.rmtree(run_dir)
