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
from twa_cli.tasks.hooks import is_code_name

# Options that say how to run, not what to compute: never recorded, never taken from a recorded run.
NOT_RECORDED = frozenset({"config", "config_from", "json_out", "quiet", "force", "resume", "dry_run", "debug"})
# Options whose value may name the user's code: taken from the user's own config file, never from a result.
CODE_OPTIONS = {"model": "--model", "data": "--data", "task": "--task"}
# Options a result file never sets for `--config-from`: where to write (the user chooses), and downloads.
NEVER_RECORDED_INTO = frozenset({"out", "output", "download"})


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TwaError(f"{path}: no such config file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TwaError(f"{path}: not a text file (it is not UTF-8); a config file is YAML, TOML or JSON") from exc
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            loaded = _yaml_once(text)
        elif suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib

            loaded = tomllib.loads(text)
        elif suffix == ".json":
            loaded = json.loads(text, object_pairs_hook=_once)
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


class _GivenTwice(ValueError):
    pass


def _once(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A mapping whose keys are each given once (YAML and JSON parsers keep the last silently)."""
    out: dict[Any, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _GivenTwice(f"'{key}' is given twice")
        out[key] = value
    return out


def _yaml_once(text: str) -> Any:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        # The keys written in this mapping (a merged-in `<<: *defaults` may be overridden, as YAML says).
        own = [(loader.construct_object(k, deep=True), None) for k, _ in node.value
               if k.tag != "tag:yaml.org,2002:merge"]
        try:
            _once(own)
        except _GivenTwice as exc:
            raise _GivenTwice(f"{exc} in the mapping at line {node.start_mark.line + 1}") from None
        return yaml.SafeLoader.construct_mapping(loader, node, deep=True)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=Loader)  # a SafeLoader with its mapping constructor checking keys


def options_for(command: str, loaded: Mapping[str, Any], names: Mapping[str, str], commands: Iterable[str],
                source: str) -> dict[str, Any]:
    """The options `loaded` gives `command`, keyed by parameter name. `names` maps every spelling of an option
    (`batch-size`, `batch_size`, `json`) to its parameter name; `commands` are the section names to expect."""
    commands = set(commands)
    for key, value in loaded.items():
        if key in commands and not isinstance(value, Mapping):
            raise TwaError(f"{source}: the section '{key}' is {'empty (null)' if value is None else repr(value)}, "
                           "not a table of options")
    sections = {k: v for k, v in loaded.items() if k in commands}
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
            if value is None:
                raise TwaError(f"{source}: '{key}' has no value (null); give one, or leave the key out for the default")
            out[name] = _plain(value, source, key)
    return out


def recorded_options(path: str | Path) -> tuple[str, dict[str, Any]]:
    """(command, options) recorded in a result file's metadata."""
    from twa_cli.io.checkpoints import read_checkpoint

    invocation = read_checkpoint(path).json_field("invocation")
    if not isinstance(invocation, dict) or not isinstance(invocation.get("options"), dict):
        raise TwaError(f"{path}: records no configuration (it was not written by this version of twa)")
    return str(invocation.get("command")), dict(invocation["options"])


def code_refusal(path: str | Path, key: str, value: Any) -> str:
    flag = CODE_OPTIONS[key]
    if not isinstance(value, str):
        return f"{path}: --config-from: the recorded {flag} is {value!r}, not a name; give {flag} yourself"
    return (f"{path}: --config-from: the recorded {flag} {value} is Python code; the tool runs code only when you "
            f"name it: repeat it as {flag} {value} if you trust it")


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
    ctx.meta["twa_options_from"] = str(path)  # a value the option cannot take is this file's error
    return path


def options_file(exc: Any) -> str | None:
    """The file that gave the value a usage error `exc` is about (a config file, a --config-from result), when it
    came from one and not from the command line."""
    ctx, param = getattr(exc, "ctx", None), getattr(exc, "param", None)
    if ctx is None or param is None or param.name is None or "twa_options_from" not in ctx.meta:
        return None
    source = ctx.get_parameter_source(param.name)
    return ctx.meta["twa_options_from"] if getattr(source, "name", None) == "DEFAULT_MAP" else None


def apply_recorded(ctx: Any, path: Path) -> Path:
    """The same with the options recorded in a result file, those the command knows (a code-naming option
    given on the command line too is the user's, and wins)."""
    _, options = recorded_options(path)
    known = {p.name for p in ctx.command.params}
    taken = {}
    for key, value in options.items():
        if key not in known or key in NOT_RECORDED or key in NEVER_RECORDED_INTO or value is None:
            continue
        if key in CODE_OPTIONS and (not isinstance(value, str) or is_code_name(value)):
            # Never the user's word: refused unless they give the flag themselves (checked once parsed).
            ctx.meta.setdefault("twa_refused", []).append((key, code_refusal(path, key, value)))
            continue
        taken[key] = value
    ctx.default_map = {**(ctx.default_map or {}), **taken}
    ctx.meta["twa_options_from"] = str(path)
    return path


def check_refused(ctx: Any) -> None:
    """After parsing: a code-naming option `--config-from` left out, and the command line did not give."""
    for key, message in ctx.meta.get("twa_refused", []):
        source = ctx.get_parameter_source(key)
        if getattr(source, "name", None) != "COMMANDLINE":
            raise TwaError(message)


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


def _plain(value: Any, source: str, key: str) -> Any:
    # click converts defaults itself; numbers and booleans pass, nested tables are not options
    if isinstance(value, Mapping):
        raise TwaError(f"{source}: '{key}' is a table; options take single values or lists")
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
