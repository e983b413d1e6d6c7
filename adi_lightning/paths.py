"""Where the project's own files live, independent of the working directory.

- Project files (``experiments/``, ``configs/``, the shipped toy pipeline): a relative path that does
  not exist from the working directory is looked up in the source checkout (the package's parent)
  and then inside the package, where a wheel ships ``experiments/`` and ``configs/`` (in a checkout
  ``adi_lightning/experiments`` and ``adi_lightning/configs`` are links to the top-level folders).
  What exists as typed always wins.
- Bare config names: ``--config jump.yaml`` is the path as given, then ``experiments/jump.yaml`` in
  the working directory, then the project's own ``experiments/jump.yaml``.
- The toy cache (exported toy folders): ``$ADI_LIGHTNING_CACHE``, else
  ``$XDG_CACHE_HOME/adi_lightning``, else ``~/.cache/adi_lightning``. Every folder this project writes
  there carries an ownership marker (:data:`OWNER_MARKER`); only marked folders are ever replaced.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, get_args

PACKAGE_DIR = Path(__file__).resolve().parent
CACHE_ENV = "ADI_LIGHTNING_CACHE"
OWNER_MARKER = ".adi_lightning_owned"  # json: {"written_by": "adi_lightning", "what": ...}
CONFIG_SUFFIXES = (".yaml", ".yml")
# How hard a toy folder is (adi_lightning.toy.export.make_action_folder says what each means).
ToyDifficulty = Literal["shared", "diverse", "shared_no_pool"]
TOY_DIFFICULTIES: tuple[str, ...] = get_args(ToyDifficulty)


#: Project folders that a command builds and the package does not ship (yet): the project-relative path
#: -> that command (with its defaults, the command writes that folder).
BUILT_BY_COMMAND: dict[str, str] = {
    "adi_lightning/toy/assets/pipeline_sd3": "python -m adi_lightning.toy pretrain-sd3  (about 2 hours on a CPU)",
}


class ConfigNotFoundError(FileNotFoundError):
    """A config name that is neither a file nor one of the project's experiments."""


def project_roots() -> list[Path]:
    """Folders a project-relative path is resolved against: the checkout, then the package."""
    return [PACKAGE_DIR.parent, PACKAGE_DIR]


def resolve_project_path(value: str | os.PathLike) -> str:
    """``value`` if it exists as typed; else the first project root that holds it; else ``value``
    unchanged (so the caller's error names what the user typed)."""
    path = Path(os.path.expanduser(str(value)))
    if path.exists() or path.is_absolute():
        return str(value)
    for root in project_roots():
        if (root / path).exists():
            return str(root / path)
    return str(value)


def build_command(value: str | os.PathLike) -> str | None:
    """The command that builds the project folder ``value`` names (:data:`BUILT_BY_COMMAND`; as typed
    relative to a project root, or that folder's absolute path), else None."""
    path = Path(os.path.expanduser(str(value)))
    for relative, command in BUILT_BY_COMMAND.items():
        if path == Path(relative) or any(path == root / relative for root in project_roots()):
            return command
    return None


def experiment_dirs() -> list[Path]:
    """``./experiments`` then the project's own (deduplicated, existing only)."""
    found: list[Path] = []
    for folder in (Path("experiments"), *(root / "experiments" for root in project_roots())):
        if folder.is_dir() and all(folder.resolve() != f.resolve() for f in found):
            found.append(folder)
    return found


def available_experiments() -> list[str]:
    return sorted({p.name for folder in experiment_dirs() for p in folder.glob("*.yaml")})


def resolve_config(value: str) -> str:
    """The file a ``--config`` value names (see the module docstring for the order).

    Raises:
        ConfigNotFoundError: nothing matches; the message lists the available experiments.
    """
    path = Path(os.path.expanduser(value))
    if path.is_file():
        return value
    names = [path] if path.suffix in CONFIG_SUFFIXES else [path, path.with_name(path.name + ".yaml")]
    for name in names:
        for folder in ("", *(str(f) for f in experiment_dirs())):
            candidate = Path(folder) / name if folder else name
            if candidate.is_file():
                return str(candidate)
        resolved = resolve_project_path(name)
        if Path(resolved).is_file():
            return resolved
    raise ConfigNotFoundError(f"--config {value}: no such file, and no experiment of that name; available: "
                              f"{', '.join(available_experiments()) or '(none found)'}")


def cache_dir() -> Path:
    """The project's cache folder (not created here)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.path.expanduser(os.environ[CACHE_ENV]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adi_lightning"


def toy_cache_dir(difficulty: ToyDifficulty, action: str) -> Path:
    """``<cache>/toy/<difficulty>/<action>``: where toy folders are exported on first use."""
    return cache_dir() / "toy" / difficulty / action


def is_in_cache(path: str | os.PathLike) -> bool:
    root = cache_dir().resolve()
    return Path(path).resolve().is_relative_to(root)


def write_owner_marker(folder: str | os.PathLike, what: str) -> None:
    """Mark ``folder`` (being written by this project) as one it may replace later."""
    text = json.dumps({"written_by": "adi_lightning", "what": what}) + "\n"
    (Path(folder) / OWNER_MARKER).write_text(text, encoding="utf-8")


def is_owned(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` carries the marker this project writes into the folders it creates."""
    return (Path(folder) / OWNER_MARKER).is_file()


def describe_contents(folder: str | os.PathLike, limit: int = 3) -> str:
    """'N files, e.g. a.jpg, b.jpg' for a refusal message."""
    names = sorted(p.name for p in Path(folder).iterdir())
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{len(names)} entries ({shown})" if names else "nothing (an empty folder)"
