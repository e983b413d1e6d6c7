"""Command-line arguments before and after jsonargparse sees them.

- :func:`resolve_argv`: ``--config jump.yaml`` and other YAML values (``--model configs/model/ti.yaml``,
  ``--trainer.logger=configs/logger/wandb.yaml``) that do not exist as typed are looked up among the
  project's files (:mod:`adi_lightning.paths`), so every command runs from any working directory.
  Each config file (and the group files it names) is checked to be a YAML mapping
  (:func:`check_config_file`), so a broken file is named with its line. A value written ``None``
  (``--model.identifier_path=None``: what W&B's ``${args}`` writes for a sweep's ``null``) means
  null, as YAML's ``null``; a key that cannot be null then refuses it by name.
  A group file a config names (``trainer: ../configs/trainer/toy.yaml``) is read relative to that
  config's folder; one that is not there is refused by name, with the layering idiom
  (``--config jump.yaml --config mine.yaml``) that builds on a project experiment from anywhere.
- :func:`explain_unknown_key`: jsonargparse 4.x reports an unknown key without suggestions and without
  the file it came from; this turns it into one line naming the key, its source (the command line, or
  the YAML file and line: a ``--config`` file, a group file it names, or a group file typed on the
  command line, ``--model configs/model/ti.yaml``) and the closest valid keys (:mod:`difflib` over the parser's own keys).
  LightningCLI's ``--optimizer`` / ``--lr_scheduler`` are not keys here: the optimizer is AdamW,
  configured by ``model.learning_rate`` and ``model.weight_decay`` only, and the line says so.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import yaml

from adi_lightning.paths import CONFIG_SUFFIXES, resolve_config, resolve_project_path

_GROUPS = ("model", "data", "trainer")
_UNKNOWN = (re.compile(r"unrecognized arguments: (?P<arg>\S+)"),
            re.compile(r"does not accept option '(?P<arg>[^']+)'"),
            re.compile(r'Key "(?P<arg>[^"]+)" is not expected'),
            re.compile(r"No action for key \"(?P<arg>[^\"]+)\""))


# LightningCLI's optimizer keys, which this CLI leaves out (auto_configure_optimizers=False).
FIXED_OPTIMIZER_KEYS = ("optimizer", "lr_scheduler")
FIXED_OPTIMIZER = ("the optimizer is AdamW on the identifier, configured by --model.learning_rate and "
                   "--model.weight_decay (no optimizer or lr_scheduler keys)")


class ConfigFileError(ValueError):
    """A config file that is not a YAML mapping; the message names the file (and line)."""


def resolve_argv(argv: list[str]) -> list[str]:
    """``argv`` with config values resolved and checked, and ``--key=None`` as ``--key=null`` (see
    the module docstring); other values untouched.

    Raises:
        ConfigNotFoundError: a ``--config`` name that matches no file.
        ConfigFileError: a config file that is not a YAML mapping (:func:`check_config_file`).
    """
    out = []
    for option in split_options(argv):
        name, joined = option_name(option), len(option) == 1 and "=" in option[0]
        if len(option) == 1 and not joined:
            out += option
            continue
        value = option_value(option)
        if name in ("--config", "-c"):
            value = _checked(resolve_config(value))
        elif name.startswith("--") and _is_yaml_path(value):
            value = _checked(resolve_project_path(value))
        elif name.startswith("--") and joined and value == "None":
            value = "null"
        else:
            out += option
            continue
        out += [f"{name}={value}"] if joined else [name, value]
    return out


def split_options(tokens: list[str]) -> list[list[str]]:
    """Command-line tokens as options, each with its value when given as a separate token
    (``["--config", "x.yaml"]``; ``["--model.lr=0.1"]``; ``["fit"]``). One reading of the command
    line for config resolution here and checkpoint precedence (:mod:`adi_lightning.resume`)."""
    out, i = [], 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("-") and "=" not in tok and i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            out.append(tokens[i : i + 2])
            i += 2
        else:
            out.append([tok])
            i += 1
    return out


def option_name(option: list[str]) -> str:
    return option[0].split("=", 1)[0]


def option_value(option: list[str]) -> str:
    return option[1] if len(option) > 1 else option[0].split("=", 1)[1]


def _checked(path: str) -> str:
    if Path(path).is_file():
        check_config_file(path)
    return path


def check_config_file(path: str | Path, depth: int = 0) -> None:
    """Refuse a config file that is not UTF-8 YAML holding a mapping, naming the file (and the line
    and column of a syntax error); group files it names (``trainer: ../configs/trainer/cpu.yaml``)
    must exist relative to it and are checked too.

    Raises:
        ConfigFileError: the file cannot be read, is not UTF-8, is not YAML, is not a mapping, or
            names a group file that does not exist.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise ConfigFileError(f"{path}: cannot be read: {err.strerror or err}") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigFileError(f"{path}: not a YAML config: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
                              f"{err.start})") from err
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark, context = err.problem_mark, ""
        if err.context and err.context_mark is not None:
            context = f" ({err.context} at line {err.context_mark.line + 1})"
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigFileError(f"{path}{where}: invalid YAML: {err.problem}{context}") from err
    except yaml.YAMLError as err:
        raise ConfigFileError(f"{path}: invalid YAML: {' '.join(str(err).split())}") from err
    if data is not None and not isinstance(data, dict):
        raise ConfigFileError(f"{path}: a config holds keys (model:, data:, trainer: ...), but this file "
                              f"holds a {type(data).__name__}")
    for key, value in (data or {}).items():
        nested = Path(path).parent / value if isinstance(value, str) and _is_yaml_path(value) else None
        if nested is not None and not nested.is_file():
            raise ConfigFileError(missing_group_file(path, text, key, value, nested))
        if nested is not None and depth < 4:
            check_config_file(nested, depth + 1)


def missing_group_file(path: str | Path, text: str, key: str, value: str, nested: Path) -> str:
    """The error for a group file (``trainer: ../configs/trainer/toy.yaml``) that is not where the
    config file says: jsonargparse reads it relative to the config file's folder only, so a copy of a
    project experiment elsewhere misses it. The message names the file, line and key, and the fix:
    layering the user's changes over a project experiment, which resolves from any directory."""
    node = yaml.compose(text)
    line = next((k.start_mark.line + 1 for k, _ in getattr(node, "value", []) if getattr(k, "value", None) == key), None)
    where = f"{path}, line {line}" if line else str(path)
    nested = Path(os.path.normpath(Path(path).resolve().parent / value))
    return (f"{where}: {key}: {value!r} not found (a path inside a config file is relative to that file's folder: "
            f"{nested}); to build on a project experiment from anywhere, layer a file holding only your changes "
            f"over it: --config jump.yaml --config {Path(path).name}")


def _is_yaml_path(value: str) -> bool:
    return value.endswith(CONFIG_SUFFIXES) and "\n" not in value and ":" not in value


def unknown_key(message: str) -> str | None:
    """The dotted key a jsonargparse error message reports as unknown, or None."""
    for pattern in _UNKNOWN:
        match = pattern.search(message)
        if match:
            return match.group("arg").lstrip("-").partition("=")[0]
    return None


def explain_unknown_key(message: str, argv: list[str], valid_keys: list[str]) -> str | None:
    """One line for an unknown-key error: the key, where it was written, the closest valid keys.

    Returns None when ``message`` is not about an unknown key (the caller keeps jsonargparse's text).
    """
    key = unknown_key(message)
    if key is None:
        return None
    where = "on the command line" if any(a.lstrip("-").partition("=")[0] == key for a in argv) else None
    if where is None:
        found = find_key_in_configs(key, config_files(argv))
        for file, group in group_files(argv):  # typed later on the command line: they win
            if key.startswith(group + "."):
                found = _find(Path(file), key[len(group) + 1:].split("."), depth=0) or found
        where = f"in {found[0]}, line {found[1]}" if found else "in a config file"
    top = key.split(".")[0]
    if top in FIXED_OPTIMIZER_KEYS:
        return f"unknown key {key!r} {where}: {FIXED_OPTIMIZER}"
    close = difflib.get_close_matches(key, valid_keys, n=3, cutoff=0.6)
    group = f" under {top}" if any(k.startswith(top + ".") for k in valid_keys) else ""
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; see --help for the keys{group}"
    return f"unknown key {key!r} {where}{hint}"


def config_files(argv: list[str]) -> list[str]:
    """The ``--config`` files in ``argv``, in order."""
    return [option_value(o) for o in split_options(argv)
            if option_name(o) in ("--config", "-c") and (len(o) == 2 or "=" in o[0]) and option_value(o)]


def group_files(argv: list[str]) -> list[tuple[str, str]]:
    """(file, group) for each YAML file typed as a group's value (``--model configs/model/ti.yaml``:
    group ``model``; ``--trainer.logger=x.yaml``: ``trainer.logger``), in order."""
    return [(option_value(o), option_name(o)[2:]) for o in split_options(argv)
            if option_name(o).startswith("--") and option_name(o) not in ("--config",)
            and (len(o) == 2 or "=" in o[0]) and _is_yaml_path(option_value(o))]


def find_key_in_configs(key: str, files: list[str]) -> tuple[str, int] | None:
    """(file, 1-based line) of the last place a dotted ``key`` is written among ``files``; a group
    given as a file (``trainer: ../configs/trainer/toy.yaml``) is searched relative to its parent."""
    found = None
    for file in files:
        found = _find(Path(file), key.split("."), depth=0) or found
    return found


def _find(path: Path, parts: list[str], depth: int) -> tuple[str, int] | None:
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return _find_in_node(node, parts, path, depth)


def _find_in_node(node, parts, path: Path, depth: int):
    if not isinstance(node, yaml.MappingNode) or not parts:
        return None
    for key_node, value_node in node.value:
        if key_node.value != parts[0]:
            continue
        if len(parts) == 1:
            return str(path), key_node.start_mark.line + 1
        if isinstance(value_node, yaml.ScalarNode) and value_node.value.endswith(CONFIG_SUFFIXES) and depth < 4:
            return _find(path.parent / value_node.value, parts[1:], depth + 1)
        return _find_in_node(value_node, parts[1:], path, depth)
    return None


def parser_keys(parser) -> list[str]:
    """Every dotted key a (sub)command parser accepts (``--help`` entries excluded)."""
    return [a.dest for a in parser._actions if a.dest and not a.dest.endswith(".help") and a.dest != "help"]
