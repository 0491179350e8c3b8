"""What a value must satisfy, said in words: its type (read from a settings annotation), the `Rule`s that settings
and command options are checked against, and the commands' argument parser that applies them (one line and exit code 2 for a bad option, defaults in
`--help`)."""
from __future__ import annotations

import argparse
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from fastdino.errors import UsageError

Switch = Union[bool, str]  # True, False or "auto" (on where the device supports it)
INVALID = object()  # what `convert` returns for a value of the wrong type


def convert(value: Any, annotation: Any) -> Any:
    """`value` as the type `annotation` describes, or INVALID."""
    if annotation == Switch:
        return value if isinstance(value, bool) or value == "auto" else INVALID
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(annotation):
            return None
        for option in typing.get_args(annotation):
            if option is not type(None) and (converted := convert(value, option)) is not INVALID:
                return converted
        return INVALID
    if origin is tuple:
        item_types = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
            return INVALID
        items = tuple(convert(item, item_type) for item, item_type in zip(value, item_types))
        return INVALID if any(item is INVALID for item in items) else items
    if annotation is bool:
        return value if isinstance(value, bool) else INVALID
    if annotation is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else INVALID
    if annotation is float:
        return _finite_float(value)
    if annotation is str:
        if isinstance(value, str):
            return value
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else INVALID
    raise TypeError(f"config annotation {annotation} has no conversion")


def _finite_float(value: Any) -> Any:
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            return INVALID
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return INVALID
    return float(value)


def expected_type(annotation: Any) -> str:
    """The type `annotation` describes, in words."""
    if annotation == Switch:
        return "true, false or auto"
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        words = " or ".join(expected_type(option) for option in options if option is not type(None))
        return f"{words} or null" if type(None) in options else words
    if origin is tuple:
        return f"a list of {len(typing.get_args(annotation))} numbers"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}[annotation]


def show(value: Any) -> str:
    """A value as it is typed in a `key=value` override (true, null, [0.4, 1.0], '' for the empty string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {show(item)}" for key, item in value.items()) + "}"
    return "''" if value == "" else str(value)


@dataclass(frozen=True)
class Rule:
    """What one value must satisfy: `allows` decides, `allowed` says it in words (the tail of the message)."""

    allowed: str
    allows: Callable[[Any], bool]

    def problem(self, name: str, value: Any) -> str | None:
        """`name=value: allowed` when `value` breaks the rule, else None."""
        return None if self.allows(value) else f"{name}={show(value)}: {self.allowed}"


def between(low: float, high: float, *, high_open: bool = False, low_open: bool = False) -> Rule:
    """low <= value <= high; an open end excludes that bound."""

    def allows(value: float) -> bool:
        return (low < value if low_open else low <= value) and (value < high if high_open else value <= high)

    return Rule(f"must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}", allows)


def choices(*options: str) -> Rule:
    """One of `options`, spelt exactly."""
    return Rule(f"must be one of {', '.join(options)}", lambda value: value in options)


def optional(rule: Rule, meaning: str) -> Rule:
    """`rule`, or null standing for `meaning`."""
    return Rule(f"{rule.allowed}, or null ({meaning})", lambda value: value is None or rule.allows(value))


def multiple_of(unit: int, name: str) -> Rule:
    """A whole number of `unit`s (`name` says what the unit is, e.g. model.patch_size)."""
    return Rule(f"must be a multiple of {name} ({unit})", lambda value: value % unit == 0)


def or_auto(rule: Rule, meaning: str) -> Rule:
    """`rule`, or "auto" standing for `meaning` (an int | str setting: any other string is refused)."""
    return Rule(f"{rule.allowed}, or auto ({meaning})",
                lambda value: value == "auto" or (isinstance(value, int) and rule.allows(value)))


def zero_means(meaning: str) -> Rule:
    """>= 0, where 0 has a meaning of its own that the message says."""
    return Rule(f"must be >= 0 (0: {meaning})", lambda value: value >= 0)


positive = Rule("must be > 0", lambda value: value > 0)
non_negative = Rule("must be >= 0", lambda value: value >= 0)
zero_is_off = zero_means("off")
unit_interval = between(0, 1)
area_fractions = Rule("must be [low, high] area fractions with 0 < low <= high <= 1",
                      lambda value: 0 < value[0] <= value[1] <= 1)
existing_folder = Rule("must be an existing folder", lambda value: Path(value).expanduser().is_dir())
existing_file = Rule("must be an existing file", lambda value: Path(value).expanduser().is_file())
existing_path = Rule("must be an existing file or folder", lambda value: Path(value).expanduser().exists())
not_a_file = Rule("must be a folder (created if missing), not a file",
                  lambda value: not Path(value).expanduser().is_file())


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; each option's help ends with its default, when it has one and does not
    already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        shown = action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
        said = "default" in action.help.lower()  # the help already says it in words
        return action.help if said or not shown else f"{action.help} (default: %(default)s)"


class CheckedArgumentParser(argparse.ArgumentParser):
    """The commands' argument parser: parsed options are checked against `rules` (option -> Rule, e.g.
    `{"--batch-size": positive}`; list values item by item; None, an option not given, passes), and every
    error, argparse's own included, is a UsageError: one line and exit code 2 under `report_usage_errors`.
    `--help` shows every option's default (`HelpFormatter`)."""

    def __init__(self, *args: Any, rules: Mapping[str, Rule] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, formatter_class=kwargs.pop("formatter_class", HelpFormatter), **kwargs)
        self.rules = dict(rules or {})

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        options, extras = super().parse_known_args(args, namespace)
        for option, rule in self.rules.items():
            value = getattr(options, option.lstrip("-").replace("-", "_"))
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if item is not None and (problem := rule.problem(option, item)):
                    raise UsageError(problem)
        return options, extras

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{message} (see --help)")
