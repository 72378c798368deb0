"""Options from a file: `--config run.yaml` (or .toml, .json), and `--config-from RESULT` to repeat a run.

A config file is a mapping of option names (as on the command line, `batch-size` or `batch_size`) to values;
it may also hold one section per command (`[train-subspace]` in TOML), whose values win over the shared
ones. Flags given on the command line win over both. Every file the tool writes records the command and
its full resolved options (`invocation` in the metadata), which `--config-from` reads back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any

from twa_cli.errors import TwaError

# Options that say how to run, not what to compute: never recorded, never taken from a recorded run.
NOT_RECORDED = frozenset({"config", "config_from", "json_out", "quiet", "force", "resume", "dry_run", "debug"})


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TwaError(f"{path}: no such config file")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            loaded = yaml.safe_load(text)
        elif suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib

            loaded = tomllib.loads(text)
        elif suffix == ".json":
            loaded = json.loads(text)
        else:
            raise TwaError(f"{path}: a config file ends in .yaml, .yml, .toml or .json")
    except TwaError:
        raise
    except Exception as exc:  # each parser has its own error types; all mean the same to the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TwaError(f"{path}: cannot parse ({first})") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, Mapping):
        raise TwaError(f"{path}: must hold a mapping of option names to values")
    return dict(loaded)


def options_for(command: str, loaded: Mapping[str, Any], names: Mapping[str, str], commands: Iterable[str],
                source: str) -> dict[str, Any]:
    """The options `loaded` gives `command`, keyed by parameter name. `names` maps every spelling of an option
    (`batch-size`, `batch_size`, `json`) to its parameter name; `commands` are the section names to expect."""
    commands = set(commands)
    sections = {k: v for k, v in loaded.items() if k in commands and isinstance(v, Mapping)}
    shared = {k: v for k, v in loaded.items() if k not in sections}
    own = dict(sections.get(command, {}))
    out: dict[str, Any] = {}
    for layer, strict in ((shared, not sections), (own, True)):
        for key, value in layer.items():
            name = names.get(_spelling(key))
            if name is None:
                if strict:
                    raise TwaError(f"{source}: '{key}' is not an option of `twa {command}`")
                continue
            out[name] = _plain(value)
    return out


def recorded_options(path: str | Path) -> tuple[str, dict[str, Any]]:
    """(command, options) recorded in a result file's metadata."""
    from twa_cli.checkpoints import read_checkpoint

    invocation = read_checkpoint(path).json_field("invocation")
    if not isinstance(invocation, dict) or "options" not in invocation:
        raise TwaError(f"{path}: records no configuration (it was not written by this version of twa)")
    return str(invocation.get("command")), dict(invocation["options"])


def resolved(params: Mapping[str, Any]) -> dict[str, Any]:
    """A command's parameters as plain JSON values, without the ones that only say how to run."""
    return {k: _jsonable(v) for k, v in params.items() if k not in NOT_RECORDED}


def apply_config_file(ctx: Any, path: Path) -> Path:
    """Make a config file's options the defaults of the command being parsed (a click context): flags given on
    the command line are read after, and win."""
    group = ctx.parent.command if ctx.parent is not None else None
    commands = list(getattr(group, "commands", {}) or [])
    options = options_for(ctx.command.name or "", load_config_file(path), _option_names(ctx), commands, str(path))
    ctx.default_map = {**(ctx.default_map or {}), **options}
    return path


def apply_recorded(ctx: Any, path: Path) -> Path:
    """The same with the options recorded in a result file, those the command knows."""
    _, options = recorded_options(path)
    known = {p.name for p in ctx.command.params}
    ctx.default_map = {**(ctx.default_map or {}),
                       **{k: v for k, v in options.items() if k in known and k not in NOT_RECORDED}}
    return path


def _option_names(ctx: Any) -> dict[str, str]:
    """Every spelling of every option (`batch-size`, `batch_size`, `json` for --json) -> parameter name."""
    names: dict[str, str] = {}
    for p in ctx.command.params:
        if p.name is None:
            continue
        names[p.name] = p.name
        for opt in p.opts:
            names[_spelling(opt)] = p.name
    return names


def _spelling(key: str) -> str:
    return str(key).lstrip("-").replace("-", "_")


def _plain(value: Any) -> Any:
    # click converts defaults itself; numbers and booleans pass, nested tables are not options
    if isinstance(value, Mapping):
        raise TwaError(f"option value {dict(value)!r} is a table; options take single values or lists")
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
