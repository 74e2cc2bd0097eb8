"""Flags and environment variables from one frozen dataclass: how every paramserver program is configured.

Each field becomes a flag (``--lease-seconds``) whose default comes from an environment variable
(named by the program's ``env_name``) and then the field's default; the field's ``help`` metadata
is the flag's help text, with the variable's name. ``Parser`` reports a bad value in one line, as
every start-up error of these programs is reported, and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

__all__ = ["LOG_LEVELS", "Parser", "opt", "parse_dataclass", "yes_or_no"]

T = TypeVar("T")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, no usage block: what is wrong, where help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def opt(default: Any, help: str, *, env_only: bool = False, choices: Sequence[str] = ()) -> Any:
    """A dataclass field with a default and its help text; ``env_only``: no flag (secrets);
    ``choices``: the values allowed (matched without regard to case)."""
    return dataclasses.field(default=default, repr=not env_only,
                             metadata={"help": help, "env_only": env_only, "choices": tuple(choices)})


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def yes_or_no(text: str) -> bool:
    """An environment variable's yes or no; ValueError for anything else (a typo such as "ture"
    would otherwise mean no)."""
    word = text.strip().lower()
    if word not in _TRUE + _FALSE:
        raise ValueError(f"{text!r} is neither yes ({'/'.join(_TRUE)}) nor no ({'/'.join(w for w in _FALSE if w)})")
    return word in _TRUE


def _converter(f: dataclasses.Field[Any]) -> Callable[[str], Any]:
    if f.metadata.get("choices"):
        return str.upper
    kind = str(f.type)
    if kind == "bool":
        return yes_or_no
    if kind == "int":
        return int
    if kind == "float":
        return float
    return str


def parse_dataclass(
    cls: type[T],
    parser: argparse.ArgumentParser,
    argv: Sequence[str],
    env: Mapping[str, str],
    env_name: Callable[[str], str],
) -> T:
    """Parse ``argv`` over ``env`` into ``cls``; bad values exit through ``parser.error``."""
    parser.allow_abbrev = False  # "--token" must not silently mean "--token-file"
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    # --help lists every variable, those without a flag too (a secret: never in argv)
    unflagged = [f"{env_name(f.name)}: {f.metadata['help']}" for f in fields if f.metadata.get("env_only")]
    if unflagged:
        parser.add_argument_group("environment only", " ".join(unflagged))
    for f in fields:
        var = env_name(f.name)
        convert = _converter(f)
        default = f.default
        choices = f.metadata.get("choices") or None
        if var in env:
            try:
                default = convert(env[var])
            except ValueError:
                kind = "yes or no (1/true/yes/on, 0/false/no/off)" if str(f.type) == "bool" else f"a valid {f.type}"
                parser.error(f"environment variable {var}={env[var]!r} is not {kind}")
            if choices and default not in choices:
                parser.error(f"environment variable {var}={env[var]!r} is not one of {', '.join(choices)}")
        if f.metadata.get("env_only"):
            parser.set_defaults(**{f.name: default})
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} [{var}]"
        if str(f.type) == "bool":
            # (argparse 3.11 says no default for these: the table's true/false, as the variable takes it)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{help_text} (default: {'true' if default else 'false'})")
        else:
            parser.add_argument(flag, type=convert, default=default, choices=choices, metavar=f.name.upper(),
                                help=f"{help_text} (default: {'none' if default == '' else default})")
    ns = parser.parse_args(list(argv))
    return cls(**{f.name: getattr(ns, f.name) for f in fields})
