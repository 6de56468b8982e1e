"""fedsd.common.coerce: the one set of config coercers (run config and privacy keys)."""

from __future__ import annotations

import math

import pytest

from fedsd.common.coerce import as_float, as_int, as_int_or_fraction, as_names, as_str, coerce
from fedsd.common.errors import ConfigError


@pytest.mark.parametrize("value", [True, 3.5, "3.5", "x", None, [3]])
def test_as_int_refuses_lossy_or_foreign_values(value):
    with pytest.raises(ConfigError, match=r"invalid run config: k=.*; expected an integer"):
        as_int("k", value)


def test_as_int_accepts_ints_integral_floats_and_digit_strings():
    assert [as_int("k", v) for v in (3, 3.0, " 3 ")] == [3, 3, 3]


def test_as_float_finite_unless_asked():
    assert as_float("k", "1e-4") == 1e-4
    with pytest.raises(ConfigError, match="a finite number"):
        as_float("k", "inf")
    assert math.isinf(as_float("k", "inf", finite=False))
    with pytest.raises(ConfigError, match="a number"):
        as_float("k", False)


def test_int_or_fraction_keeps_flowers_distinction():
    assert as_int_or_fraction("k", "3") == 3 and isinstance(as_int_or_fraction("k", "3"), int)
    assert as_int_or_fraction("k", "0.5") == 0.5


def test_strings_names_and_field_types():
    assert as_str("k", " SecAgg ", normalize=True) == "secagg"
    assert as_str("k", " SecAgg ") == " SecAgg "
    assert as_names("k", "to_q, to_k,,") == ("to_q", "to_k")
    assert coerce("k", "2", "int") == 2
    assert coerce("k", ["a"], "tuple[str, ...]") == ("a",)
    with pytest.raises(ConfigError, match="a string"):
        coerce("k", 3, "str")
