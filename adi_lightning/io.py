"""Atomic output files: write to a temp file beside the target, fsync, then rename.

A crash or kill mid-write leaves either the old file or the new one, never a truncated one. A
write that fails (disk full, read-only or failing filesystem) removes its temp file and raises
:class:`WriteError`, one line naming the target: ``could not write <path>: <strerror>``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# What a failing disk raises (atomic_dir converts only these: its body also reads inputs).
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO})


class WriteError(OSError):
    """An output that could not be written; ``str()`` is ``could not write <path>: <strerror>``.
    ``errno`` is the underlying error's (ENOSPC, EROFS, ...)."""

    def __init__(self, target: str | Path, err: BaseException) -> None:
        reason = (getattr(err, "strerror", None) or str(err)) if isinstance(err, OSError) else str(err)
        super().__init__(getattr(err, "errno", None), reason)
        self.target = str(target)

    def __str__(self) -> str:
        return f"could not write {self.target}: {self.strerror}"


TEMP_SUFFIX = ".tmp"  # atomic_path's temp files: .<name>.<random>.tmp beside the target


def is_temp_file(path: str | Path) -> bool:
    """Whether ``path`` is one of :func:`atomic_path`'s temp files (left only by a killed writer)."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


@contextmanager
def atomic_path(target: str | Path):
    """Yield a temp path in the target's folder; on success rename it over ``target``.

    Raises:
        WriteError: any OSError while creating, writing (the ``with`` body) or renaming the temp
            file; the temp file is removed and ``target`` is left as it was.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    except OSError as err:
        raise WriteError(target, err) from err
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600 and some writers (safetensors) recreate the file 0600: outputs get the
        # user's usual permissions, set after the writer is done.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(target, err) from err
        raise


@contextmanager
def atomic_dir(target: str | Path, what: str = "output folder"):
    """Yield a temp folder beside ``target``; on success swap it into place, on failure remove it.
    A crash never leaves a half-built folder at ``target``.

    The folder gets this project's ownership marker (``adi_lightning.paths.OWNER_MARKER``), and an
    existing ``target`` is replaced only when it carries one: a folder this project did not write
    (or wrote before markers existed) is refused with FileExistsError naming what it holds, before
    anything is built. Files get the usual modes (mkdtemp makes 0700 and safetensors writes 0600).
    A failing disk (:data:`DISK_ERRNOS`) raises :class:`WriteError` naming ``target``.
    """
    from adi_lightning.paths import describe_contents, is_owned, write_owner_marker

    target = Path(target)
    if target.exists() and not (target.is_dir() and is_owned(target)):
        raise FileExistsError(f"{target} exists and was not written by adi_lightning (it holds "
                              f"{describe_contents(target) if target.is_dir() else 'a file'}); it is never "
                              "replaced: choose another output path, or move it away yourself")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as err:
        raise WriteError(target, err) from err
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
    except OSError as err:
        if err.errno in DISK_ERRNOS and not isinstance(err, WriteError):
            raise WriteError(target, err) from err
        raise
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
    """Serialised in memory and written by Python, so a full disk is an OSError (WriteError), not
    safetensors' own error."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
    return Path(target)


def atomic_torch_save(obj: Any, target: str | Path) -> Path:
    """``torch.save`` through a Python file handle, so a full disk is an OSError (WriteError)."""
    import torch

    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)
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
