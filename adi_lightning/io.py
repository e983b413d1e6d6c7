"""Atomic output files: write to a temp file beside the target, fsync, then rename.

A crash or kill mid-write leaves either the old file or the new one, never a truncated one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(target: str | Path):
    """Yield a temp path in the target's folder; on success rename it over ``target``."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as err:
        raise OSError(f"cannot write {target}: {err.strerror or err}") from err
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600 and some writers (safetensors) recreate the file 0600: outputs get the
        # user's usual permissions, set after the writer is done.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@contextmanager
def atomic_dir(target: str | Path, what: str = "output folder"):
    """Yield a temp folder beside ``target``; on success swap it into place, on failure remove it.
    A crash never leaves a half-built folder at ``target``.

    The folder gets this project's ownership marker (``adi_lightning.paths.OWNER_MARKER``), and an
    existing ``target`` is replaced only when it carries one: a folder this project did not write
    (or wrote before markers existed) is refused with FileExistsError naming what it holds, before
    anything is built. Files get the usual modes (mkdtemp makes 0700 and safetensors writes 0600).
    """
    from adi_lightning.paths import describe_contents, is_owned, write_owner_marker

    target = Path(target)
    if target.exists() and not (target.is_dir() and is_owned(target)):
        raise FileExistsError(f"{target} exists and was not written by adi_lightning (it holds "
                              f"{describe_contents(target) if target.is_dir() else 'a file'}); it is never "
                              "replaced: choose another output path, or move it away yourself")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        yield tmp
        write_owner_marker(tmp, what)
        umask = _umask()
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_text(target: str | Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def atomic_write_json(target: str | Path, data: Any) -> Path:
    return atomic_write_text(target, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_save_safetensors(tensors: dict, target: str | Path, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(target)


def atomic_save_image(image, target: str | Path) -> Path:
    """Save a PIL image; the format comes from the target's suffix."""
    target = Path(target)
    with atomic_path(target) as tmp:
        image.save(tmp, format=target.suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG")
    return target


def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on, for provenance."""
    from importlib.metadata import PackageNotFoundError, version

    names = ("adi-lightning", "torch", "lightning", "diffusers", "transformers", "safetensors")
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def git_revision(path: str | Path | None = None) -> str:
    """The source tree's git revision (with ``-dirty``), or ``unknown`` outside a checkout."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")
