"""Reading and validating an action folder (Hugging Face ``imagefolder`` convention).

A folder holds images plus ``metadata.jsonl`` (UTF-8, with or without a BOM; LF or CRLF line
ends) with one JSON object per image::

    {"file_name": "run/001.png", "action": "jumping", "subject": "alice",
     "context": "beach", "pair_id": "alice-beach", "caption": "...",
     "attributes": {"colour": "yellow", "background": "beach"}, "context_pool": false}

``file_name``, ``action`` and ``subject`` are required non-empty strings; ``context``,
``pair_id`` and ``caption`` are optional strings; ``attributes`` is an optional object of
appearance factors (string values) that the leak metrics compare with a judge's verdicts;
``context_pool: true`` marks an image of the action that is a *context-different partner only*:
never an anchor, never a training target (see ``ActionTripleDataset``). Any other key is ignored. Every malformed case
raises a single :class:`DataLayoutError` naming the file (and ``metadata.jsonl:<line>``
where a line is at fault), so a bad folder fails at setup and never mid-training. An image may
be a symbolic link, to a file inside the folder or outside it: links are followed (``file_name``
must stay inside the folder; where a link points is the user's choice), and a dangling link is
refused naming the link and its target.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps

METADATA_FILE = "metadata.jsonl"
REQUIRED_KEYS = ("file_name", "action", "subject")
OPTIONAL_KEYS = ("context", "pair_id", "caption", "attributes", "context_pool")

__all__ = [
    "METADATA_FILE",
    "DataLayoutError",
    "ImageRecord",
    "UnsupportedImageMode",
    "open_rgb",
    "read_action_folder",
    "records_of_action",
    "verify_images",
]


class DataLayoutError(ValueError):
    """A data folder does not follow the expected layout; the message says where and why."""


class UnsupportedImageMode(ValueError):
    """An image whose pixel values have no agreed meaning as RGB (e.g. 32-bit float)."""


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grey PNGs open as I;16 (older Pillow: I)


def open_rgb(path: str | Path) -> Image.Image:
    """The image at ``path`` as 8-bit RGB, upright: the one place images are converted.

    - EXIF orientation is applied (``ImageOps.exif_transpose``): a phone's portrait is upright.
    - Transparency (RGBA, LA, PA, palette with a transparent colour) is composited on white, so
      transparent pixels do not show whatever colour they happen to store.
    - 16-bit greyscale (``I;16``, ``I``) is scaled to 8 bits (``round(v / 257)``), not clipped to white.
    - Other modes (L, P, 1, CMYK, YCbCr, ...) are converted by Pillow.

    Raises:
        UnsupportedImageMode: modes with no agreed range (32-bit float ``F``) or no RGB conversion.
    """
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
    if img.mode == "F":
        raise UnsupportedImageMode("has mode 'F' (32-bit float), whose values have no agreed range; "
                                   "save it as an 8- or 16-bit image")
    if img.mode in _SIXTEEN_BIT:
        grey = np.clip(np.rint(np.asarray(img, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(grey, "L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    try:
        return img.convert("RGB")
    except ValueError as err:
        raise UnsupportedImageMode(f"has mode {img.mode!r}, which Pillow cannot convert to RGB ({err})") from err


@dataclass(frozen=True)
class ImageRecord:
    """One image of the folder, as described by its ``metadata.jsonl`` line.

    Attributes:
        file_name: Path relative to the folder, as written in the metadata.
        path: Absolute path of the image file.
        action: The action the image shows.
        subject: Who (or what) performs it; action-different partners share it.
        context: Optional scene / setting label.
        pair_id: Optional id grouping images that differ only in the action.
        caption: Optional free-text caption.
        line: 1-based line number in ``metadata.jsonl`` (for error messages).
        attributes: Optional appearance factors (e.g. colour, pattern, background).
        context_pool: A context-different partner only, never an anchor.
    """

    file_name: str
    path: Path
    action: str
    subject: str
    context: str | None
    pair_id: str | None
    caption: str | None
    line: int
    attributes: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    context_pool: bool = False

    def appearance(self) -> dict[str, str]:
        """What a judge could see of this image besides the action: subject, context, attributes."""
        out = {"subject": self.subject}
        if self.context is not None:
            out["context"] = self.context
        out.update(self.attributes)
        return out

    @property
    def where(self) -> str:
        """``<metadata path>:<line>``, used as the prefix of error messages."""
        return f"{self.path_of_metadata}:{self.line}"

    @property
    def path_of_metadata(self) -> Path:
        # file_name may contain sub-folders; strip them to reach the folder root.
        depth = len(PurePosixPath(self.file_name).parts)
        return self.path.parents[depth - 1] / METADATA_FILE


def _optional_str(obj: dict, key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataLayoutError(f"{where}: optional key {key!r} must be a string or null, "
                              f"got {type(value).__name__} {value!r}")
    return value if value.strip() else None


def _attributes(obj: dict, where: str) -> dict[str, str]:
    value = obj.get("attributes")
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise DataLayoutError(f"{where}: optional key 'attributes' must be an object of strings "
                              f"(e.g. {{\"colour\": \"red\"}}), got {value!r}")
    return dict(value)


def _flag(obj: dict, key: str, where: str) -> bool:
    value = obj.get(key, False)
    if not isinstance(value, bool):
        raise DataLayoutError(f"{where}: optional key {key!r} must be true or false, got {value!r}")
    return value


def _check_file_name(root: Path, file_name: str, where: str) -> tuple[str, Path]:
    """Normalise ``file_name`` and refuse paths that leave the folder."""
    posix = PurePosixPath(file_name.replace("\\", "/"))
    if posix.is_absolute() or ".." in posix.parts:
        raise DataLayoutError(f"{where}: file_name {file_name!r} must be a relative path "
                              f"inside the folder {root}")
    normalised = posix.as_posix()
    return normalised, root.joinpath(*posix.parts)


def read_action_folder(root: str | Path) -> list[ImageRecord]:
    """Read ``root/metadata.jsonl`` into records, checking structure and that images exist.

    Images are only checked for existence here; decoding is done by :func:`verify_images`
    on the records that are actually used (so an unused corrupt image does not block a run).

    Args:
        root: The action folder.

    Returns:
        One :class:`ImageRecord` per non-blank metadata line, in file order.

    Raises:
        DataLayoutError: On any layout problem, naming the file and line.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataLayoutError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataLayoutError(f"data folder {root} is not a directory")
    root = root.resolve()
    meta = root / METADATA_FILE
    if not meta.is_file():
        raise DataLayoutError(f"{meta}: missing; an action folder needs a {METADATA_FILE} with "
                              f"one JSON object per image (file_name, action, subject)")
    try:
        raw_bytes = meta.read_bytes()
    except OSError as err:
        raise DataLayoutError(f"{meta}: cannot be read: {err}") from err
    try:  # utf-8-sig: a BOM (Windows editors) is dropped; CRLF line ends are split by splitlines
        text = raw_bytes.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw_bytes.count(b"\n", 0, err.start) + 1
        column = err.start - (raw_bytes.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataLayoutError(f"{meta}:{line}: not UTF-8 text (byte 0x{raw_bytes[err.start]:02x} at column "
                              f"{column}); save the file as UTF-8") from err

    records: list[ImageRecord] = []
    seen: dict[str, int] = {}
    for line_no, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{meta}:{line_no}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataLayoutError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from err
        if not isinstance(obj, dict):
            raise DataLayoutError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key in REQUIRED_KEYS:
            if key not in obj:
                raise DataLayoutError(f"{where}: missing required key {key!r} "
                                      f"(required: {', '.join(REQUIRED_KEYS)})")
            value = obj[key]
            if not isinstance(value, str) or not value.strip():
                raise DataLayoutError(f"{where}: required key {key!r} must be a non-empty "
                                      f"string, got {value!r}")
        file_name, path = _check_file_name(root, obj["file_name"], where)
        if file_name in seen:
            raise DataLayoutError(f"{where}: duplicate file_name {file_name!r} "
                                  f"(first listed at {meta}:{seen[file_name]})")
        seen[file_name] = line_no
        if not path.is_file():
            if path.is_symlink():  # links are followed (README "Data layout"); a dangling one is named
                raise DataLayoutError(f"{where}: image file {file_name!r} at {path} is a symbolic link to "
                                      f"{os.readlink(path)}, which does not exist")
            raise DataLayoutError(f"{where}: image file {file_name!r} not found at {path}")
        records.append(ImageRecord(
            file_name=file_name, path=path, action=obj["action"], subject=obj["subject"],
            context=_optional_str(obj, "context", where),
            pair_id=_optional_str(obj, "pair_id", where),
            caption=_optional_str(obj, "caption", where),
            line=line_no,
            attributes=_attributes(obj, where),
            context_pool=_flag(obj, "context_pool", where),
        ))
    if not records:
        raise DataLayoutError(f"{meta}: no records; add one JSON object per image")
    return records


def records_of_action(records: list[ImageRecord], action: str, pool: bool = False) -> list[ImageRecord]:
    """The exemplars of ``action`` (with ``pool``: its context-pool images instead); raises
    listing the actions present when the action has no exemplar."""
    if pool:
        return [r for r in records if r.action == action and r.context_pool]
    chosen = [r for r in records if r.action == action and not r.context_pool]
    if not chosen:
        present = sorted({r.action for r in records})
        where = records[0].path_of_metadata if records else METADATA_FILE
        raise DataLayoutError(f"{where}: action {action!r} not present; actions in the folder: "
                              f"{', '.join(repr(a) for a in present) or '(none)'}")
    return chosen


def verify_images(records: Iterable[ImageRecord]) -> None:
    """Fully decode every image once, as training will (:func:`open_rgb`), so corrupt files and
    unsupported modes fail at setup, not mid-training."""
    for record in records:
        try:
            open_rgb(record.path)
        except UnsupportedImageMode as err:
            raise DataLayoutError(f"{record.where}: image {record.file_name!r} {err}") from err
        except Exception as err:  # PIL raises many types (OSError, SyntaxError, ...)
            raise DataLayoutError(f"{record.where}: image {record.file_name!r} is unreadable "
                                  f"or corrupt ({type(err).__name__}: {err})") from err
