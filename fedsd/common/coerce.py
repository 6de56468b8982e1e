"""One set of coercers for config values (run config, node config): TOML, CLI and environment
values become typed values, and a bad one is a ``ConfigError`` naming the key, the value and
what is allowed. Lossy conversions are refused (3.5 is not an integer, True is not a number).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

from fedsd.common.errors import ConfigError


def config_error(key: str, value: Any, allowed: str) -> ConfigError:
    """The error for ``key=value``, saying what is allowed."""
    return ConfigError(f"invalid run config: {key}={value!r}; expected {allowed}")


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ``config_error`` unless ``ok``."""
    if not ok:
        raise config_error(key, value, allowed)


def as_int(key: str, value: Any) -> int:
    """An int, an integral float or a string of digits; never a bool."""
    if isinstance(value, bool):
        raise config_error(key, value, "an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value.strip())
    raise config_error(key, value, "an integer")


def as_float(key: str, value: Any, *, finite: bool = True) -> float:
    """A number (or its string); ``finite`` refuses inf and nan here, otherwise a range
    check later names them."""
    if isinstance(value, bool):
        raise config_error(key, value, "a number")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise config_error(key, value, "a number") from None
    if finite and not math.isfinite(out):
        raise config_error(key, value, "a finite number")
    return out


def as_int_or_fraction(key: str, value: Any) -> int | float:
    """Keep the int/float distinction: Flower reads an int as a count, a float as a fraction."""
    if isinstance(value, bool):
        raise config_error(key, value, "an integer count or a fraction in (0, 1]")
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value.strip())
        return as_float(key, value)
    raise config_error(key, value, "an integer count or a fraction in (0, 1]")


def as_str(key: str, value: Any, *, normalize: bool = False) -> str:
    """A string; ``normalize`` strips and lower-cases it (mode names, mechanisms)."""
    if not isinstance(value, str):
        raise config_error(key, value, "a string")
    return value.strip().lower() if normalize else value


def as_names(key: str, value: Any) -> tuple[str, ...]:
    """A comma-separated string or a list, as a tuple of non-empty names."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value)
    raise config_error(key, value, "a comma-separated list")


def coerce(key: str, value: Any, typ: str) -> Any:
    """Convert to a dataclass field's type (``int``, ``float``, ``str``, ``tuple[...]``)."""
    if typ == "int":
        return as_int(key, value)
    if typ == "float":
        return as_float(key, value, finite=False)
    if typ == "str":
        return as_str(key, value)
    if typ.startswith("tuple"):
        return as_names(key, value)
    return value
