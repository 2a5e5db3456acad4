"""Checks of kfh_probe.settings: constraints declared at a dataclass field, checked and described in one place."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kfh_probe import Interval, NonEmpty, OneOf, Relation, SettingError, check_settings, coerce_setting, help_of, setting

REGISTRY: dict[str, object] = {"a": object()}


@dataclass
class Example:
    count: int = setting(2, "How many.", Interval(1, None))
    share: float = setting(0.5, "Which part.", Interval(0, 1, closed="right"))
    name: str = setting("a", "Registered name.", OneOf(lambda: tuple(REGISTRY)))
    label: str = setting("x", "A label.", NonEmpty())
    path: str | None = setting(
        None, "Needed when count > 2.", Relation(lambda path, config: path is not None or config.count <= 2,
                                                 "given when count > 2"),
    )
    limit: int | None = setting(None, "Upper limit, or none.", Interval(0, 10, closed="neither"))

    def __post_init__(self) -> None:
        check_settings(self)


@pytest.mark.parametrize(
    "interval, text",
    [
        (Interval(0, 1), "in [0, 1]"),
        (Interval(0, 1, closed="left"), "in [0, 1)"),
        (Interval(0, 1, closed="right"), "in (0, 1]"),
        (Interval(0.5, 2.5, closed="neither"), "in (0.5, 2.5)"),
        (Interval(2, None), ">= 2"),
        (Interval(0, None, closed="neither"), "> 0"),
        (Interval(None, 3), "<= 3"),
        (Interval(None, 3, closed="neither"), "< 3"),
    ],
)
def test_an_interval_describes_its_bounds(interval, text):
    assert interval.describe(None) == text


def test_an_interval_includes_only_the_closed_ends():
    assert [Interval(0, 1, closed="right").holds(v, None) for v in (0, 0.5, 1)] == [False, True, True]
    assert [Interval(0, 1, closed="left").holds(v, None) for v in (0, 0.5, 1)] == [True, True, False]


def test_the_first_broken_constraint_raises_one_message_shape():
    with pytest.raises(SettingError, match=r"^setting 'count' must be >= 1; got 0$"):
        Example(count=0)
    with pytest.raises(SettingError, match=r"^setting 'share' must be in \(0, 1\]; got 0$"):
        Example(share=0)
    with pytest.raises(SettingError, match=r"^setting 'label' must be a non-empty string; got ''$"):
        Example(label="")


def test_one_of_a_function_reads_the_registry_when_the_check_runs(monkeypatch):
    with pytest.raises(SettingError, match=r"^setting 'name' must be one of a; got 'b'$"):
        Example(name="b")
    monkeypatch.setitem(REGISTRY, "b", object())
    assert Example(name="b").name == "b"


def test_a_relation_can_require_an_optional_setting():
    assert Example(count=2).path is None
    with pytest.raises(SettingError, match=r"^setting 'path' must be given when count > 2; got None$"):
        Example(count=3)
    assert Example(count=3, path="p").path == "p"


def test_an_optional_setting_may_be_none_and_says_so_when_it_is_out_of_range():
    assert Example(limit=None).limit is None
    with pytest.raises(SettingError, match=r"^setting 'limit' must be in \(0, 10\) or null; got 10$"):
        Example(limit=10)


def test_none_in_a_required_setting_is_refused():
    with pytest.raises(SettingError, match=r"^setting 'count' must be of type int, not null; got None$"):
        Example(count=None)


def test_extra_constraints_are_checked_after_the_declared_ones():
    config = Example()
    with pytest.raises(SettingError, match=r"^setting 'count' must be in \[1, 1\]; got 2$"):
        check_settings(config, {"count": (Interval(1, 1),)})  # the default, 2, is outside
    config.count = 1
    check_settings(config, {"count": (Interval(1, 1),)})


def test_a_renamed_error_keeps_the_requirement_and_the_value():
    with pytest.raises(SettingError) as caught:
        Example(count=0)
    renamed = caught.value.renamed("prefix_count")
    assert str(renamed) == "setting 'prefix_count' must be >= 1; got 0"
    assert (renamed.name, renamed.requirement, renamed.value) == ("prefix_count", ">= 1", 0)


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("count", "3", 3), ("count", 4.0, 4), ("share", "1e-5", 1e-5), ("share", 1, 1.0),
        ("label", "y", "y"), ("limit", "None", None), ("limit", "null", None), ("limit", None, None),
    ],
)
def test_coercion_converts_to_the_declared_type(name, value, expected):
    result = coerce_setting(Example, name, value)
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("count", 2.5, "setting 'count' must be of type int; got 2.5"),
        ("count", True, "setting 'count' must be of type int; got True"),
        ("count", None, "setting 'count' must be of type int, not null; got None"),
        ("share", "half", "setting 'share' must be of type float; got 'half'"),
        ("label", 3, "setting 'label' must be of type str; got 3"),
        ("limit", "many", "setting 'limit' must be of type int or null; got 'many'"),
    ],
)
def test_coercion_refuses_a_value_of_another_type(name, value, message):
    with pytest.raises(SettingError) as caught:
        coerce_setting(Example, name, value)
    assert str(caught.value) == message


def test_help_is_read_from_the_field():
    from dataclasses import fields

    assert [help_of(f) for f in fields(Example)][:2] == ["How many.", "Which part."]
