"""Privacy modes: which components (SecAgg+, DP-SGD, output DP, central DP) a run uses."""

from __future__ import annotations

from typing import Any

from fedsd.common.errors import ConfigError

#: Components in canonical order (the canonical spelling joins them in this order).
COMPONENTS = ("secagg", "dp-sample", "dp-output", "dp-central")
#: Every accepted value of the ``privacy`` key, canonically spelled.
ALLOWED_MODES = (
    "none",
    "secagg",
    "dp-sample",
    "dp-output",
    "dp-central",
    "secagg+dp-sample",
    "secagg+dp-output",
    "secagg+dp-central",
    "dp-sample+dp-output",
    "secagg+dp-sample+dp-output",
)


def _mode_error(mode: Any, reason: str) -> ConfigError:
    return ConfigError(
        f"invalid run config: privacy={mode!r}; {reason}. "
        f"Allowed (components in any order): {', '.join(ALLOWED_MODES)}"
    )


def parse_privacy(mode: str) -> frozenset[str]:
    """The set of privacy components in ``mode`` (empty for ``none``).

    Components are joined with ``+`` in any order. Refused: unknown or repeated
    components, ``none`` with anything, dp-central with dp-sample or dp-output, and any
    combination not in ``ALLOWED_MODES``; the error names the value and lists the allowed.
    """
    if not isinstance(mode, str):
        raise _mode_error(mode, "expected a string")
    parts = [p.strip().lower() for p in mode.split("+")]
    if any(not p for p in parts):
        raise _mode_error(mode, "empty component")
    unknown = [p for p in parts if p not in COMPONENTS and p != "none"]
    if unknown:
        raise _mode_error(mode, f"unknown component(s) {', '.join(unknown)}")
    dups = sorted({p for p in parts if parts.count(p) > 1})
    if dups:
        raise _mode_error(mode, f"component(s) given more than once: {', '.join(dups)}")
    if "none" in parts:
        if len(parts) > 1:
            raise _mode_error(mode, "'none' cannot be combined with other components")
        return frozenset()
    comps = frozenset(parts)
    if "dp-central" in comps and comps & {"dp-sample", "dp-output"}:
        other = "+".join(
            c for c in COMPONENTS if c in comps and c != "dp-central" and c != "secagg"
        )
        raise _mode_error(
            mode,
            f"dp-central together with {other} adds noise twice, and there is no accounting "
            "here that composes the two guarantees into one; pick one",
        )
    if _canonical(comps) not in ALLOWED_MODES:  # unreachable with today's list; kept as a guard
        raise _mode_error(mode, "not a supported combination")
    return comps


def _canonical(comps: frozenset[str]) -> str:
    return "+".join(c for c in COMPONENTS if c in comps) or "none"


def canonical_privacy(mode: str) -> str:
    """The canonical spelling of ``mode`` (so equal modes compare and log equally)."""
    return _canonical(parse_privacy(mode))
