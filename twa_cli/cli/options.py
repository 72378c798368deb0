"""Option groups: a set of flags declared once, added to every command that takes them, and handed to the
command's function as one typed object (as mergekit generates its click options from one model).

    SELECTION = OptionGroup(Selection, [Flag("start", int, 0, "First checkpoint ..."), ...])

    @app.command()
    @with_groups(selection=SELECTION)
    def swa(ckpts: ..., selection: Selection): ...

The command's signature, as Typer sees it, holds the group's flags in place of `selection`; the wrapper builds
the object from them. Config files and `--config-from` see the flags one by one, as on the command line.
"""

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer


@dataclass(frozen=True)
class Flag:
    """One flag: its parameter name, type, default and help; `decls` overrides the flag's spelling."""

    name: str
    type: Any
    default: Any
    help: str
    decls: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    panel: str | None = None  # the help panel, when not the group's

    def parameter(self, panel: str | None) -> inspect.Parameter:
        option = typer.Option(*self.decls, help=self.help, rich_help_panel=self.panel or panel, **self.extra)
        return inspect.Parameter(self.name, inspect.Parameter.KEYWORD_ONLY, default=self.default,
                                 annotation=Annotated[self.type, option])


@dataclass(frozen=True)
class OptionGroup:
    """Flags that together make one object (`build` takes them as keyword arguments)."""

    build: Callable[..., Any]
    flags: Sequence[Flag]
    panel: str | None = None

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.flags]

    def only(self, *names: str) -> "OptionGroup":
        """The same group with fewer flags (the others take the object's defaults)."""
        return OptionGroup(self.build, [f for f in self.flags if f.name in names], self.panel)

    def without(self, *names: str) -> "OptionGroup":
        return OptionGroup(self.build, [f for f in self.flags if f.name not in names], self.panel)


def with_groups(**groups: OptionGroup) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Replace each parameter named like a group by the group's flags (see the module docstring)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(fn)
        params: list[inspect.Parameter] = []
        for param in signature.parameters.values():
            if param.name in groups:
                group = groups[param.name]
                params.extend(f.parameter(group.panel) for f in group.flags)
            else:
                params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY))

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            for name, group in groups.items():
                kwargs[name] = group.build(**{k: kwargs.pop(k) for k in group.names})
            return fn(**kwargs)

        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate
