"""A user's own code, named as `package.module:callable` on the command line (`--model`, `--data`, `--task`).

Only names the user typed reach this module: a name read from a checkpoint, a basis, an index or
`--config-from` is refused before anything is imported (`twa_cli.tasks.resolve`). A hook that cannot be
imported, raises, or returns the wrong kind of thing is named in one line with what was expected.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any

from twa_cli.errors import TwaError
from twa_cli.units import first_line

# Prefixes of registry names that contain a colon but name no user code: the registries they point into
# look a name up in their own tables and never import what a name says.
REGISTRY_PREFIXES = ("torchvision:", "timm:", "hf:")


def is_code_name(name: str) -> bool:
    """Whether `name` names Python code to import (`package.module:callable`) rather than a registry entry."""
    return ":" in name and not name.startswith(REGISTRY_PREFIXES)


DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def import_callable(name: str, flag: str) -> Callable[..., Any]:
    module_name, _, attr = name.partition(":")
    if not (DOTTED.match(module_name) and DOTTED.match(attr)):
        raise TwaError(f"{flag} {name}: expected package.module:callable")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except Exception as exc:  # ImportError, AttributeError, or whatever the module raises while importing
        raise TwaError(f"{flag} {name}: cannot import ({type(exc).__name__}: {first_line(exc)})") from exc
    if not callable(target):
        raise TwaError(f"{flag} {name}: is a {type(target).__name__}, not a callable")
    return target


def call_hook(fn: Callable[..., Any], name: str, flag: str, expected: str, *args: Any, **kwargs: Any) -> Any:
    """Call a user's hook; any exception it raises becomes one line naming the hook and what it should do."""
    try:
        return fn(*args, **kwargs)
    except TwaError:
        raise
    except Exception as exc:
        raise TwaError(f"{flag} {name}: raised {type(exc).__name__} ({first_line(exc)}); it should {expected}") from exc


def accepted_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments `fn` takes (all of them when it takes **kwargs)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


DATA_HOOK_RETURNS = "return (train_set, test_set) or (train_set, val_set, test_set)"


def hook_splits(factory: Callable[..., Any], name: str, args: tuple[Any, ...]) -> tuple[Any, Any, Any]:
    """(train, val or None, test) from a `--data` hook, which returns two sets, or three with a validation set."""
    result = call_hook(factory, name, "--data", DATA_HOOK_RETURNS, *args)
    if not (isinstance(result, tuple) and len(result) in (2, 3)):
        raise TwaError(f"--data {name}: returned {type(result).__name__}; it should {DATA_HOOK_RETURNS}")
    return (result[0], None, result[1]) if len(result) == 2 else result
