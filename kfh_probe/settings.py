"""Settings declared once, at their dataclass field: default, help and constraints, checked in one place.

A configuration dataclass declares each field with :func:`setting`::

    @dataclass
    class Config:
        group_size: int = setting(8, "Rollouts per prompt.", Interval(2, None))
        credit: str = setting("attention", "Where the step scores come from.", OneOf(CREDITS),
                              Relation(lambda credit, config: credit == "attention" or config.method == "attnpo",
                                       "'attention' unless method is 'attnpo'"))

        def __post_init__(self) -> None:
            check_settings(self)

:func:`check_settings` reads the constraints from the fields' metadata and raises one :class:`SettingError` shape,
``setting 'NAME' must be REQUIREMENT; got VALUE``, for the first one that fails. :func:`coerce_setting` converts a
YAML or command-line value to the field's declared type, and :func:`help_of` returns the help, which
TRL's argument parser also reads from ``metadata["help"]``.

A constraint is any object with ``holds(value, config) -> bool`` and ``describe(config) -> str`` (the
requirement, completing "must be ..."); ``applies_to_none`` says whether it is asked about an unset
(None) optional value. :class:`OneOf` takes a tuple or a function that returns the choices when the
check runs, so a registry filled after import can be the source of the choices.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import InputError

HELP = "help"
CONSTRAINTS = "constraints"
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NULL = {"none", "null"}


class Constraint(Protocol):
    """What a setting's value must satisfy."""

    applies_to_none: bool

    def holds(self, value: Any, config: Any) -> bool: ...

    def describe(self, config: Any) -> str: ...


@dataclass(frozen=True)
class Interval:
    """A number between ``low`` and ``high`` (None: unbounded); ``closed`` says which ends are included:
    ``"both"``, ``"left"``, ``"right"`` or ``"neither"``."""

    low: float | None
    high: float | None
    closed: str = "both"
    applies_to_none = False

    def holds(self, value: Any, config: Any) -> bool:
        left = self.closed in ("both", "left")
        right = self.closed in ("both", "right")
        above = self.low is None or (value >= self.low if left else value > self.low)
        below = self.high is None or (value <= self.high if right else value < self.high)
        return above and below

    def describe(self, config: Any) -> str:
        left = self.closed in ("both", "left")
        right = self.closed in ("both", "right")
        if self.high is None:
            return f"{'>=' if left else '>'} {_number(self.low)}"
        if self.low is None:
            return f"{'<=' if right else '<'} {_number(self.high)}"
        return f"in {'[' if left else '('}{_number(self.low)}, {_number(self.high)}{']' if right else ')'}"


@dataclass(frozen=True)
class OneOf:
    """One of ``choices``: a tuple, or a function returning them when the check runs (a registry)."""

    choices: tuple[Any, ...] | Callable[[], Iterable[Any]]
    applies_to_none = False

    def options(self) -> tuple[Any, ...]:
        return tuple(self.choices() if callable(self.choices) else self.choices)

    def holds(self, value: Any, config: Any) -> bool:
        return value in self.options()

    def describe(self, config: Any) -> str:
        return "one of " + ", ".join(map(str, self.options()))


@dataclass(frozen=True)
class NonEmpty:
    """A non-empty string."""

    applies_to_none = False

    def holds(self, value: Any, config: Any) -> bool:
        return len(value) > 0

    def describe(self, config: Any) -> str:
        return "a non-empty string"


@dataclass(frozen=True)
class Relation:
    """A rule between this setting and others: ``rule(value, config)`` must hold; ``requirement`` says what
    it asks. It is asked about None too, so it can require an optional setting."""

    rule: Callable[[Any, Any], bool]
    requirement: str
    applies_to_none = True

    def holds(self, value: Any, config: Any) -> bool:
        return bool(self.rule(value, config))

    def describe(self, config: Any) -> str:
        return self.requirement


class SettingError(InputError):
    """A setting's value breaks one of its constraints: ``setting 'NAME' must be REQUIREMENT; got VALUE``."""

    def __init__(self, name: str, requirement: str, value: Any) -> None:
        super().__init__(f"setting '{name}' must be {requirement}; got {value!r}", settings=(name,))
        self.name, self.requirement, self.value = name, requirement, value

    def renamed(self, name: str) -> SettingError:
        """The same error about the setting spelled ``name`` (a prefixed copy of the setting)."""
        return SettingError(name, self.requirement, self.value)


def setting(default: Any, help: str, *constraints: Constraint, **field_options: Any) -> Any:
    """A dataclass field with its default, its help and its constraints (checked by :func:`check_settings`)."""
    return dataclasses.field(default=default, metadata={HELP: help, CONSTRAINTS: constraints}, **field_options)


def help_of(field: dataclasses.Field) -> str:
    """The help text a field was declared with ("" when it has none)."""
    return field.metadata.get(HELP, "")


def constraints_of(field: dataclasses.Field) -> tuple[Constraint, ...]:
    """The constraints a field was declared with."""
    return tuple(field.metadata.get(CONSTRAINTS, ()))


def check_settings(config: Any, extra: Mapping[str, tuple[Constraint, ...]] | None = None) -> None:
    """Check every field of the dataclass instance ``config`` against its declared constraints, then
    against ``extra`` (more constraints by field name, from a caller with stricter needs).

    A None value is allowed only in a field typed ``X | None``, and then only constraints that
    ``applies_to_none`` are asked about it.

    Raises:
        SettingError: the first constraint that does not hold, in field order.
    """
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        constraints = (*constraints_of(field), *(extra or {}).get(field.name, ()))
        if not constraints:
            continue
        value = getattr(config, field.name)
        optional = _optional(hints[field.name])
        for constraint in constraints:
            if value is None and not constraint.applies_to_none:
                if not optional:
                    raise SettingError(field.name, f"{_of_type(hints[field.name])}, not null", value)
                continue
            if not constraint.holds(value, config):
                requirement = constraint.describe(config)
                if optional and not constraint.applies_to_none:
                    requirement += " or null"
                raise SettingError(field.name, requirement, value)


def coerce_setting(cls: type, name: str, value: Any) -> Any:
    """``value`` from a YAML file or a ``key=value`` override, converted to the declared type of the field
    ``name`` of the dataclass ``cls``.

    Strings are accepted for numbers, booleans (true/false, yes/no, on/off, 1/0) and null (none/null, in
    a field typed ``X | None``), because command-line overrides arrive as strings and PyYAML reads
    ``1e-5`` (no decimal point) as a string.

    Raises:
        SettingError: the value cannot be read as the field's type.
    """
    declared = typing.get_type_hints(cls)[name]
    optional = _optional(declared)
    base = _base_type(declared)
    if value is None or (optional and isinstance(value, str) and value.lower() in _NULL):
        if optional:
            return None
        raise SettingError(name, f"{_of_type(declared)}, not null", value)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise TypeError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if not isinstance(value, str):
            raise TypeError
        return value
    except (TypeError, ValueError):
        raise SettingError(name, _of_type(declared), value) from None


def _optional(declared: Any) -> bool:
    return type(None) in typing.get_args(declared)


def _base_type(declared: Any) -> Any:
    """``X`` of a field typed ``X`` or ``X | None``."""
    return next((t for t in typing.get_args(declared) if t is not type(None)), declared)


def _of_type(declared: Any) -> str:
    return f"of type {_base_type(declared).__name__}" + (" or null" if _optional(declared) else "")


def _number(value: float | None) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
