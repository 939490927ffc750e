"""Runs a Typer app so that a user's mistake is one line on stderr and a documented exit code, never a traceback.

Exit codes shared by `fer-sim`, `fer-server` and `fer-client`:
    0  success
    1  a user error (bad path, bad data, bad option value, exhausted privacy budget); one line names the cause
    2  a usage error (unknown option, missing argument), as click reports it
    130 interrupted (Ctrl-C)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import typing
from collections.abc import Callable, Mapping

import click
import typer


_KEYWORD = inspect.Parameter.KEYWORD_ONLY


def cli_app(name: str, help: str, *, no_args_is_help: bool = True) -> typer.Typer:
    """The Typer app of one `fer-*` command, with the settings all three share.

    No shell-completion options (`--install-completion` would clutter every `--help`), and Typer's rich
    traceback handler off: `run_cli` reports the expected errors in one line itself.
    """
    return typer.Typer(
        name=name, help=help, no_args_is_help=no_args_is_help, add_completion=False, pretty_exceptions_enable=False
    )


def add_commands(app: typer.Typer, commands: Mapping[str, Callable[..., object]]) -> None:
    """Adds `commands` (sub-command name -> function) to `app`, in order: `--help` lists them in this order."""
    for name, command in commands.items():
        app.command(name)(command)


def option_group(group: type, *, into: str) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """Gives a command the options declared as the fields of the dataclass `group`, as one `group` object.

    Commands that share a set of options (`fer-server start` and `resume` the listening ones, `fer-server start`
    and `fer-sim run` the privacy ones) declare it once, as a dataclass whose fields are the parameters Typer
    would otherwise read from each command's signature: the name, the `Annotated[..., typer.Option(...)]` type and
    the default. The command names one parameter `into` (typed `group`); Typer sees the group's options in its
    place, so `--help` lists them where that parameter stands, and the command receives them as one `group`.
    """
    hints = typing.get_type_hints(group, include_extras=True)
    options = [
        inspect.Parameter(field.name, _KEYWORD, default=field.default, annotation=hints[field.name])
        for field in dataclasses.fields(group)
    ]

    def decorate(command: Callable[..., object]) -> Callable[..., object]:
        signature = inspect.signature(command, eval_str=True)
        if into not in signature.parameters:
            raise TypeError(f"{command.__name__} has no parameter {into!r} to take the {group.__name__} options")
        params: list[inspect.Parameter] = []
        for param in signature.parameters.values():
            # Keyword-only throughout: Typer passes every option by name, and the group may then sit between
            # parameters with defaults and without.
            params.extend(options if param.name == into else [param.replace(kind=_KEYWORD)])

        @functools.wraps(command)
        def with_group(**kwargs: object) -> object:
            values = {option.name: kwargs.pop(option.name) for option in options}
            return command(**kwargs, **{into: group(**values)})

        with_group.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        with_group.__annotations__ = {param.name: param.annotation for param in params}
        return with_group

    return decorate


def run_cli(app: typer.Typer, prog_name: str, argv: list[str] | None = None) -> int:
    """Runs `app` with `argv` and returns the process exit code."""
    try:
        result = app(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.UsageError as err:
        # Usage errors keep click's hint line ("Try 'fer-sim run --help'") because it tells the fix.
        err.show(file=sys.stderr)
        return err.exit_code
    except click.ClickException as err:
        print(f"{prog_name}: error: {err.format_message()}", file=sys.stderr)
        return err.exit_code
    except click.exceptions.Exit as err:
        return err.exit_code
    except click.exceptions.Abort:
        print(f"{prog_name}: aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"{prog_name}: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0
