"""Privacy modes, their validated config, output-level DP and cumulative DP accounting.

Building blocks only: which mode a run uses is decided by the run config, and the
ServerApp/ClientApp wire these functions in. Written against what the reference examples
got wrong (shared/notes/reference-examples.md, defects 4-8):

* epsilon is *cumulative*: a node's DP-SGD history is persisted (``NodeAccountant``),
  because every ClientApp message runs in a fresh process and a new accountant per round
  would report one round's epsilon only;
* output-level DP clips the *update* (node adapter minus the global adapter it started
  from), not the weights, with the norm that matches the mechanism (L2 for Gaussian, L1 for
  Laplace), and calibrates the noise to the clip and the per-round (epsilon, delta);
* SecAgg+ parameters are checked against what Flower would accept but mishandle silently.

Import-light: numpy and stdlib only at module level; opacus (and with it torch) is
imported inside the accounting functions, since a SuperNode starts a process per message.

Neighbouring relation. Output DP and central DP use the add/remove-one-contribution
convention of DP-FedAvg and of Flower's ``LocalDpMod``: the L2 (L1) sensitivity of a clipped
update is the clip C. Under replace-one adjacency (any two datasets of a node) two clipped
updates can differ by 2C; pass ``adjacency="replace"`` to ``privatize_update`` for that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsd.atomic import write_file
from fedsd.config import ConfigError

# -- modes --------------------------------------------------------------------------------

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


# -- typed config -------------------------------------------------------------------------

OUTPUT_MECHANISMS = ("gaussian", "laplace")
#: How many noise scales past the clip one value of a noised update may reach, per
#: mechanism, before the chance of it is below ~1e-13 (Gaussian 7.5 sigma, Laplace 30 b).
OUTPUT_NOISE_TAILS = {"gaussian": 7.5, "laplace": 30.0}
#: Flower documents ``modulus_range`` up to 2**32 (its default) for SecAgg+ masks.
MAX_MODULUS_RANGE = 2**32


def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"invalid run config: {key}={value!r}; expected {allowed}")


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise _fail(key, value, "a number")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise _fail(key, value, "a number") from None
    if not math.isfinite(out):
        raise _fail(key, value, "a finite number")
    return out


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise _fail(key, value, "an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value.strip())
    raise _fail(key, value, "an integer")


def _as_int_or_fraction(key: str, value: Any) -> int | float:
    """Keep the int/float distinction: Flower reads an int as a count, a float as a fraction."""
    if isinstance(value, bool):
        raise _fail(key, value, "an integer count or a fraction in (0, 1]")
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value.strip())
        return _as_float(key, value)
    raise _fail(key, value, "an integer count or a fraction in (0, 1]")


def _as_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(key, value, "a string")
    return value.strip().lower()


#: Opacus grad-sample modes fedsd supports (ghost clipping needs a per-sample criterion,
#: which fedsd's training loop does not use). Default chosen by ``bench/dp_modes.py``.
GRAD_SAMPLE_MODES = ("hooks", "ew", "functorch")
DEFAULT_GRAD_SAMPLE_MODE = "hooks"

# Keys without a default: pyproject.toml declares them as 0 (TOML has no null), read as unset.
_ZERO_IS_UNSET = frozenset(
    {
        "dp-output-clip",
        "dp-output-epsilon",
        "dp-output-delta",
        "dp-central-noise-multiplier",
        "dp-central-clip",
        "secagg-num-shares",
        "secagg-reconstruction-threshold",
    }
)

# kebab key -> (field name, coercion)
_KEYS = {
    "privacy": ("privacy", _as_str),
    "dp-target-epsilon": ("dp_target_epsilon", _as_float),
    "dp-delta": ("dp_delta", _as_float),
    "dp-noise-multiplier": ("dp_noise_multiplier", _as_float),
    "dp-max-grad-norm": ("dp_max_grad_norm", _as_float),
    "dp-grad-sample-mode": ("dp_grad_sample_mode", _as_str),
    "dp-output-mechanism": ("dp_output_mechanism", _as_str),
    "dp-output-clip": ("dp_output_clip", _as_float),
    "dp-output-epsilon": ("dp_output_epsilon", _as_float),
    "dp-output-delta": ("dp_output_delta", _as_float),
    "dp-central-noise-multiplier": ("dp_central_noise_multiplier", _as_float),
    "dp-central-clip": ("dp_central_clip", _as_float),
    "secagg-num-shares": ("secagg_num_shares", _as_int_or_fraction),
    "secagg-reconstruction-threshold": ("secagg_reconstruction_threshold", _as_int_or_fraction),
    "secagg-clipping-range": ("secagg_clipping_range", _as_float),
    "secagg-quantization-range": ("secagg_quantization_range", _as_int),
    "secagg-modulus-range": ("secagg_modulus_range", _as_int),
    "secagg-max-weight": ("secagg_max_weight", _as_float),
}
# which component(s) each key configures (for ``ignored_keys``)
_KEY_COMPONENT = {
    "dp-target-epsilon": ("dp-sample",),
    "dp-delta": ("dp-sample", "dp-central"),
    "dp-noise-multiplier": ("dp-sample",),
    "dp-max-grad-norm": ("dp-sample",),
    "dp-grad-sample-mode": ("dp-sample",),
    **{k: ("dp-output",) for k in _KEYS if k.startswith("dp-output-")},
    **{k: ("dp-central",) for k in _KEYS if k.startswith("dp-central-")},
    **{k: ("secagg",) for k in _KEYS if k.startswith("secagg-")},
}


@dataclass(frozen=True)
class PrivacyConfig:
    """The privacy part of the run config, typed and validated once.

    ``None`` means "not given"; values whose right scale depends on the model's update size
    (clips) or that set the guarantee (per-round output epsilon) have no default and are
    required when their component is on, so no run gets an arbitrary guarantee silently.
    """

    privacy: str = "none"
    # DP-SGD on each node (Opacus), sample-level. With both a target and a noise multiplier
    # the multiplier is used and the target is the hard stop (NodeAccountant.budget_spent).
    # dp-delta is also the delta of dp-central's accounting.
    dp_target_epsilon: float = 0.0  # 0 = not given
    dp_delta: float = 1e-5
    dp_noise_multiplier: float = 0.0  # 0 = derive from dp-target-epsilon
    dp_max_grad_norm: float = 1.0
    dp_grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE
    # output-level DP on each node's update, per round
    dp_output_mechanism: str = "gaussian"
    dp_output_clip: float | None = None
    dp_output_epsilon: float | None = None
    dp_output_delta: float | None = None
    # central DP: server-side noise on the aggregate of clipped updates (user-level)
    dp_central_noise_multiplier: float | None = None
    dp_central_clip: float | None = None
    # SecAgg+ (Flower's SecAggPlusWorkflow); shares/threshold None = secagg_defaults()
    secagg_num_shares: int | float | None = None
    secagg_reconstruction_threshold: int | float | None = None
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 2**22
    secagg_modulus_range: int = 2**32
    secagg_max_weight: float = 1000.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "privacy", canonical_privacy(self.privacy))
        self.validate()

    @property
    def components(self) -> frozenset[str]:
        """The enabled components (empty for ``none``)."""
        return parse_privacy(self.privacy)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> PrivacyConfig:
        """Build from a run-config mapping (kebab-case; the whole run config or ``cfg.extra``).

        Keys that are not privacy keys are ignored; an unknown ``dp-*``/``secagg-*`` key is
        refused (a typo there would silently drop a protection).
        """
        values: dict[str, Any] = {}
        for key, value in raw.items():
            spec = _KEYS.get(key)
            if spec is None:
                if key.startswith(("dp-", "secagg-")):
                    close = difflib.get_close_matches(key, list(_KEYS), n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ConfigError(
                        f"invalid run config: unknown privacy key {key}={value!r}{hint}; "
                        f"known: {', '.join(_KEYS)}"
                    )
                continue
            name, coerce = spec
            if key in _ZERO_IS_UNSET and value in (0, 0.0) and not isinstance(value, bool):
                continue  # TOML has no null: the app config declares these keys as 0
            values[name] = coerce(key, value)
        return cls(**values)

    def to_mapping(self) -> dict[str, Any]:
        """The kebab-case mapping (round-trips through ``from_mapping``; None left out)."""
        out: dict[str, Any] = {}
        for key, (name, _) in _KEYS.items():
            value = getattr(self, name)
            if value is not None:
                out[key] = value
        return out

    def ignored_keys(self) -> list[str]:
        """Keys set away from their default for a component that is off (worth a warning)."""
        default = PrivacyConfig()
        comps = self.components
        out = []
        for key, (name, _) in _KEYS.items():
            owner = _KEY_COMPONENT.get(key)
            if owner is None or getattr(self, name) == getattr(default, name):
                continue
            if not any(c in comps for c in owner):
                out.append(key)
        return out

    def validate(self) -> None:
        """Ranges per key, then the rules across keys."""
        comps = parse_privacy(self.privacy)
        _check(
            self.dp_target_epsilon >= 0,
            "dp-target-epsilon",
            self.dp_target_epsilon,
            "> 0, or 0 for not given",
        )
        _check(0 < self.dp_delta < 1, "dp-delta", self.dp_delta, "in (0, 1)")
        _check(
            self.dp_noise_multiplier >= 0,
            "dp-noise-multiplier",
            self.dp_noise_multiplier,
            ">= 0 (0 = derive it from dp-target-epsilon)",
        )
        _check(self.dp_max_grad_norm > 0, "dp-max-grad-norm", self.dp_max_grad_norm, "> 0")
        _check(
            self.dp_grad_sample_mode in GRAD_SAMPLE_MODES,
            "dp-grad-sample-mode",
            self.dp_grad_sample_mode,
            " or ".join(GRAD_SAMPLE_MODES),
        )
        _check(
            self.dp_output_mechanism in OUTPUT_MECHANISMS,
            "dp-output-mechanism",
            self.dp_output_mechanism,
            " or ".join(OUTPUT_MECHANISMS),
        )
        _check_opt(self.dp_output_clip, lambda v: v > 0, "dp-output-clip", "> 0")
        _check_opt(
            self.dp_output_epsilon,
            lambda v: v > 0,
            "dp-output-epsilon",
            "> 0 (the per-round epsilon)",
        )
        _check_opt(self.dp_output_delta, lambda v: 0 < v < 1, "dp-output-delta", "in (0, 1)")
        _check_opt(
            self.dp_central_noise_multiplier,
            lambda v: v > 0,
            "dp-central-noise-multiplier",
            "> 0 (the server noise std over dp-central-clip)",
        )
        _check_opt(self.dp_central_clip, lambda v: v > 0, "dp-central-clip", "> 0")
        self._validate_secagg()

        if "dp-sample" in comps and not (
            self.dp_target_epsilon > 0 or self.dp_noise_multiplier > 0
        ):
            raise ConfigError(
                f"invalid run config: privacy={self.privacy!r} needs dp-target-epsilon > 0 "
                "(the noise multiplier is then derived for the planned training) or "
                "dp-noise-multiplier > 0; got dp-target-epsilon="
                f"{self.dp_target_epsilon!r}, dp-noise-multiplier={self.dp_noise_multiplier!r}"
            )
        if self.dp_output_mechanism == "laplace" and self.dp_output_delta is not None:
            raise ConfigError(
                f"invalid run config: dp-output-delta={self.dp_output_delta!r} with "
                "dp-output-mechanism='laplace'; the Laplace mechanism is pure epsilon-DP "
                "(delta = 0): remove dp-output-delta, or use dp-output-mechanism='gaussian'"
            )
        if "dp-output" in comps:
            for key, value in (
                ("dp-output-clip", self.dp_output_clip),
                ("dp-output-epsilon", self.dp_output_epsilon),
            ):
                if value is None:
                    raise ConfigError(
                        f"invalid run config: privacy={self.privacy!r} needs {key} "
                        "(no default: it sets the guarantee or depends on the update's scale)"
                    )
            if self.dp_output_mechanism == "gaussian" and self.dp_output_delta is None:
                raise ConfigError(
                    f"invalid run config: privacy={self.privacy!r} with "
                    "dp-output-mechanism='gaussian' needs dp-output-delta in (0, 1)"
                )
        if {"secagg", "dp-output"} <= comps:
            self._check_secagg_covers_output_noise()
        if "dp-central" in comps:
            for key, value in (
                ("dp-central-noise-multiplier", self.dp_central_noise_multiplier),
                ("dp-central-clip", self.dp_central_clip),
            ):
                if value is None:
                    raise ConfigError(f"invalid run config: privacy={self.privacy!r} needs {key}")

    def _check_secagg_covers_output_noise(self) -> None:
        """Output-DP noise is added on the node, before SecAgg+ quantizes: the clipping
        range must hold the clipped update plus the noise's tails, or SecAgg+ would clip
        the noised update (the node would then refuse to send it, every round at random)."""
        clip, eps = float(self.dp_output_clip), float(self.dp_output_epsilon)
        if self.dp_output_mechanism == "gaussian":
            scale = gaussian_sigma(clip, eps, float(self.dp_output_delta))
            tails, what = OUTPUT_NOISE_TAILS["gaussian"], "sigma"
        else:
            scale = laplace_scale(clip, eps)
            tails, what = OUTPUT_NOISE_TAILS["laplace"], "Laplace scale"
        need = clip + tails * scale
        if self.secagg_clipping_range < need:
            raise ConfigError(
                f"invalid run config: secagg-clipping-range={self.secagg_clipping_range!r} is "
                f"too small for privacy={self.privacy!r}: the noised update reaches "
                f"dp-output-clip + {tails:g} x {what} = {need:.4g} (a value beyond the range "
                f"has probability < 1e-13); set secagg-clipping-range >= {need:.4g}"
            )

    def _validate_secagg(self) -> None:
        shares, thr = self.secagg_num_shares, self.secagg_reconstruction_threshold
        if shares is not None:
            if isinstance(shares, int):
                _check(
                    shares > 2,
                    "secagg-num-shares",
                    shares,
                    "an integer > 2 (Flower refuses 2 and reads 1 as 1.0 = all nodes) "
                    "or a fraction of the sampled nodes in (0, 1], e.g. 1.0",
                )
            else:
                _check(
                    0 < shares <= 1,
                    "secagg-num-shares",
                    shares,
                    "a fraction in (0, 1], or an integer count > 2 (a float is read as "
                    "a fraction by Flower)",
                )
        if thr is not None:
            if isinstance(thr, int):
                _check(
                    thr >= 2,
                    "secagg-reconstruction-threshold",
                    thr,
                    "an integer >= 2 (Flower reads 1 as 1.0 = all shares) or a fraction in (0, 1]",
                )
                if isinstance(shares, int):
                    _check(
                        thr < shares,
                        "secagg-reconstruction-threshold",
                        thr,
                        f"< secagg-num-shares={shares}",
                    )
            else:
                _check(
                    0 < thr <= 1,
                    "secagg-reconstruction-threshold",
                    thr,
                    "a fraction in (0, 1] or an integer >= 2",
                )
        _check(
            self.secagg_clipping_range > 0,
            "secagg-clipping-range",
            self.secagg_clipping_range,
            "> 0",
        )
        _check(
            self.secagg_quantization_range > 0,
            "secagg-quantization-range",
            self.secagg_quantization_range,
            "an integer > 0",
        )
        mod = self.secagg_modulus_range
        _check(
            mod > 0 and mod & (mod - 1) == 0 and mod <= MAX_MODULUS_RANGE,
            "secagg-modulus-range",
            mod,
            "a power of two <= 2**32",
        )
        _check(
            mod > self.secagg_quantization_range,
            "secagg-modulus-range",
            mod,
            f"> secagg-quantization-range={self.secagg_quantization_range}",
        )
        _check(self.secagg_max_weight > 0, "secagg-max-weight", self.secagg_max_weight, "> 0")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise _fail(key, value, allowed)


def _check_opt(value: Any, ok: Any, key: str, allowed: str) -> None:
    if value is not None and not ok(value):
        raise _fail(key, value, allowed)


# -- SecAgg+ ------------------------------------------------------------------------------

#: Above this many sampled nodes the default neighbourhood stops growing (odd, as Flower wants).
MAX_DEFAULT_SHARES = 21


def secagg_defaults(num_nodes: int) -> dict[str, int | float]:
    """Default ``secagg-num-shares`` and ``secagg-reconstruction-threshold`` for
    ``num_nodes`` nodes sampled per round.

    Shares: every sampled node (full neighbourhood) up to 21 nodes, then 21 (an odd
    neighbourhood, as SecAgg+ wants, which bounds each node's key-sharing cost).
    Threshold: ``max(2, ceil(0.6 * shares))``, a strict majority, because SecAgg+ is only
    safe against a server that lies about who dropped out when the threshold exceeds half
    the neighbourhood (otherwise it could collect both the self-mask and the mask-key shares
    of one node and unmask its individual update); 0.6 rather than "half + 1" still lets
    ``shares - threshold`` (about 40 %) of a neighbourhood drop out without aborting the
    round. Integers, not fractions: Flower rounds fractions with ``round()``, which can give
    exactly half (0.6 of 4 shares -> 2).

    With 2 nodes the only option is both shares and threshold 2 (Flower refuses integer
    shares <= 2, so 1.0 = all nodes): one dropout aborts the round, and either node can
    recover the other's update by subtracting its own from the aggregate. SecAgg hides
    nothing between two nodes; it still hides each update from the server.
    """
    if num_nodes < 2:
        raise ConfigError(f"SecAgg+ needs at least 2 nodes per round, got {num_nodes}")
    if num_nodes == 2:
        return {"secagg-num-shares": 1.0, "secagg-reconstruction-threshold": 2}
    shares = min(num_nodes, MAX_DEFAULT_SHARES)
    return {
        "secagg-num-shares": shares,
        "secagg-reconstruction-threshold": max(2, math.ceil(0.6 * shares)),
    }


@dataclass(frozen=True)
class SecAggPlan:
    """What Flower's SecAgg+ will actually use for ``num_nodes`` sampled nodes."""

    num_nodes: int
    num_shares: int | float  # as configured (Flower's parameter)
    reconstruction_threshold: int | float  # as configured
    neighbourhood: int  # nodes each node shares its keys with, itself included
    threshold: int  # shares needed to reconstruct, as Flower computes it
    dropouts_tolerated: int  # per neighbourhood, before the round aborts
    warnings: tuple[str, ...] = ()


def check_secagg(num_nodes: int, cfg: PrivacyConfig) -> SecAggPlan:
    """Resolve the SecAgg+ parameters as Flower will for ``num_nodes`` sampled nodes and
    refuse what it would accept but mishandle: a threshold above the neighbourhood (every
    round aborts), a modulus too small for the sum of ``num_nodes`` quantized updates
    (silent wrap-around). Flower's own refusals (integer shares <= 2, integer threshold >=
    integer shares, modulus not a power of two above the quantization range) are refused
    already by ``PrivacyConfig``. Softer problems come back as ``warnings``.
    """
    if num_nodes < 2:
        raise ConfigError(f"SecAgg+ needs at least 2 nodes per round, got {num_nodes}")
    defaults = secagg_defaults(num_nodes)
    shares_cfg = cfg.secagg_num_shares
    thr_cfg = cfg.secagg_reconstruction_threshold
    if shares_cfg is None:
        shares_cfg = defaults["secagg-num-shares"]
    if thr_cfg is None:
        thr_cfg = defaults["secagg-reconstruction-threshold"]
    # Mirrors flwr.server.workflow.SecAggPlusWorkflow.setup_stage (flwr 1.41).
    if isinstance(shares_cfg, float):
        shares = round(shares_cfg * num_nodes)
        if shares < num_nodes and shares & 1 == 0:
            shares += 1
        if shares <= 2:
            shares = num_nodes
    else:
        shares = shares_cfg
    threshold = max(round(thr_cfg * shares), 2) if isinstance(thr_cfg, float) else thr_cfg
    if num_nodes != shares and shares & 1 == 0:
        shares += 1
    neighbourhood = min(num_nodes, 2 * (shares >> 1) + 1)
    if threshold > neighbourhood:
        raise ConfigError(
            f"invalid run config: secagg-reconstruction-threshold={thr_cfg!r} means "
            f"{threshold} shares, but with secagg-num-shares={shares_cfg!r} and {num_nodes} "
            f"nodes a node has only {neighbourhood} (itself included): Flower would abort "
            "every round ('Insufficient available nodes')"
        )
    q, mod = cfg.secagg_quantization_range, cfg.secagg_modulus_range
    if num_nodes * q >= mod:
        raise ConfigError(
            f"invalid run config: secagg-modulus-range={mod} must exceed {num_nodes} nodes x "
            f"secagg-quantization-range={q}, or the masked sum wraps around and the "
            "aggregate is silently wrong"
        )
    warnings = []
    tolerated = neighbourhood - threshold
    if tolerated == 0:
        warnings.append(f"threshold {threshold} = neighbourhood: any dropout aborts the round")
    if num_nodes == 2:
        warnings.append(
            "2 nodes: either node can recover the other's update from the aggregate "
            "(aggregate minus its own); SecAgg only hides the updates from the server"
        )
    if 2 * threshold <= neighbourhood:
        warnings.append(
            f"threshold {threshold} is not a majority of {neighbourhood}: a server that lies "
            "about dropouts could unmask an individual update"
        )
    return SecAggPlan(
        num_nodes=num_nodes,
        num_shares=shares_cfg,
        reconstruction_threshold=thr_cfg,
        neighbourhood=neighbourhood,
        threshold=threshold,
        dropouts_tolerated=tolerated,
        warnings=tuple(warnings),
    )


def check_secagg_weight(num_examples: float, cfg: PrivacyConfig) -> None:
    """Refuse a node weight above ``secagg-max-weight``: Flower only logs an overflow
    warning and the weighted aggregate overflows the quantized range silently."""
    if not num_examples <= cfg.secagg_max_weight:
        raise ConfigError(
            f"invalid run config: secagg-max-weight={cfg.secagg_max_weight!r} is below the "
            f"{num_examples!r} examples this node reports; raise it to at least the largest "
            "node's image count (too large a value costs quantization precision)"
        )


def check_secagg_values(arrays: Mapping[str, np.ndarray], cfg: PrivacyConfig) -> None:
    """Refuse values outside +-``secagg-clipping-range``: SecAgg+ clips them silently
    before quantizing, which changes the aggregate without any error."""
    worst = max((float(np.max(np.abs(a))) for a in arrays.values() if a.size), default=0.0)
    if not worst <= cfg.secagg_clipping_range:
        raise ConfigError(
            f"invalid run config: secagg-clipping-range={cfg.secagg_clipping_range!r} but a "
            f"sent value has magnitude {worst!r}; SecAgg+ would clip it silently"
        )


# -- output-level DP on the update --------------------------------------------------------


def _flat_norm(arrays: Iterable[np.ndarray], norm: str) -> float:
    if norm == "l2":
        total = sum(float(np.sum(np.square(np.asarray(a, dtype=np.float64)))) for a in arrays)
        out = math.sqrt(total)
    elif norm == "l1":
        out = sum(float(np.sum(np.abs(np.asarray(a, dtype=np.float64)))) for a in arrays)
    else:
        raise ValueError(f"norm must be 'l2' or 'l1', got {norm!r}")
    if not math.isfinite(out):
        raise ValueError("the update has non-finite values; refusing to clip or release it")
    return out


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def clip_update(
    update: Mapping[str, np.ndarray], bound: float, norm: str = "l2"
) -> tuple[dict[str, np.ndarray], float]:
    """Clip the update, all tensors taken as one flat vector, to ``norm`` <= ``bound``.

    Returns the clipped update (same dtypes) and the norm before clipping. At or under
    the bound the values are returned unchanged (copies); over it the vector is scaled by
    ``bound / norm`` (in float64), so its norm is the bound up to the dtype's rounding.
    """
    _positive("bound", bound)
    before = _flat_norm(update.values(), norm)
    if before <= bound:
        return {k: np.array(v, copy=True) for k, v in update.items()}, before
    factor = bound / before
    out = {
        k: (np.asarray(v, dtype=np.float64) * factor).astype(np.asarray(v).dtype)
        for k, v in update.items()
    }
    return out, before


def _phi(x: float) -> float:
    """Standard normal CDF."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta(sigma: float, sensitivity: float, epsilon: float) -> float:
    """The exact delta of the Gaussian mechanism at ``epsilon`` (Balle & Wang 2018, Thm 8):
    ``Phi(D/2s - e*s/D) - exp(e) * Phi(-D/2s - e*s/D)``."""
    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    tail = _phi(-a - b)
    second = math.exp(epsilon + math.log(tail)) if tail > 0 else 0.0
    return max(0.0, _phi(a - b) - second)


def gaussian_sigma(clip: float, epsilon: float, delta: float, *, method: str = "analytic") -> float:
    """Noise std for (epsilon, delta)-DP of a release with L2 sensitivity ``clip``.

    ``method="classical"``: ``clip * sqrt(2 ln(1.25/delta)) / epsilon`` (Dwork & Roth 2014,
    Theorem A.1), whose proof holds only for epsilon < 1, so epsilon >= 1 is refused.

    ``method="analytic"`` (default): the analytic Gaussian mechanism (Balle & Wang 2018,
    "Improving the Gaussian Mechanism for Differential Privacy", Algorithm 1 solved by
    bisection): the smallest sigma whose exact privacy profile meets delta at epsilon. It
    is valid for every epsilon (per-round budgets of 1 or more are the usual case in FL)
    and never needs more noise than the classical formula, so it gives the same guarantee
    with less noise. Returned sigma is on the safe side (delta(sigma) <= delta).
    """
    _positive("clip", clip)
    _positive("epsilon", epsilon)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if method == "classical":
        if epsilon >= 1:
            raise ValueError(
                f"the classical Gaussian mechanism is only proven for epsilon < 1, got "
                f"{epsilon!r}; use method='analytic'"
            )
        return clip * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon
    if method != "analytic":
        raise ValueError(f"method must be 'analytic' or 'classical', got {method!r}")
    lo = hi = clip
    while gaussian_delta(hi, clip, epsilon) > delta:
        hi *= 2.0
    while gaussian_delta(lo, clip, epsilon) <= delta and lo > 1e-12 * clip:
        lo /= 2.0
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if gaussian_delta(mid, clip, epsilon) > delta:
            lo = mid
        else:
            hi = mid
        if hi / lo - 1.0 < 1e-12:
            break
    return hi


def laplace_scale(clip_l1: float, epsilon: float) -> float:
    """Laplace scale b = L1 sensitivity / epsilon (pure epsilon-DP, Dwork & Roth Thm 3.6)."""
    _positive("clip_l1", clip_l1)
    _positive("epsilon", epsilon)
    return clip_l1 / epsilon


def noise_rng() -> np.random.Generator:
    """A generator seeded from OS entropy for DP noise.

    Never seed DP noise from the run's seed: the server knows it, could regenerate the
    noise and subtract it.
    """
    return np.random.default_rng(secrets.randbits(128))


@dataclass(frozen=True)
class OutputNoiseReport:
    """What one output-DP release did (for the privacy record)."""

    mechanism: str
    norm: str  # "l2" (Gaussian) or "l1" (Laplace)
    norm_before: float
    clipped: bool
    clip: float
    adjacency: str
    sensitivity: float
    epsilon: float
    delta: float
    sigma: float | None = None  # Gaussian std
    scale: float | None = None  # Laplace scale b
    noise_multiplier: float | None = None  # sigma / sensitivity (Gaussian)
    num_params: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON records."""
        return dataclasses.asdict(self)


def privatize_update(
    update: Mapping[str, np.ndarray],
    mechanism: str,
    clip: float,
    epsilon: float,
    delta: float | None,
    rng: np.random.Generator,
    *,
    adjacency: str = "add-remove",
    calibration: str = "analytic",
) -> tuple[dict[str, np.ndarray], OutputNoiseReport]:
    """Clip the update and add noise calibrated to (epsilon, delta) for one round.

    Gaussian: L2 clip, sigma from ``gaussian_sigma``. Laplace: L1 clip (the L1 norm is the
    Laplace sensitivity, not the L2 bound), scale ``clip / epsilon``, ``delta`` must be
    None or 0. Sensitivity is ``clip`` for add/remove adjacency and ``2 * clip`` for
    ``adjacency="replace"``. float64 internally, float32 out. Use ``noise_rng()``.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError("rng must be a numpy Generator (use noise_rng())")
    if adjacency not in ("add-remove", "replace"):
        raise ValueError(f"adjacency must be 'add-remove' or 'replace', got {adjacency!r}")
    _positive("clip", clip)
    sensitivity = clip * (2.0 if adjacency == "replace" else 1.0)
    sigma = scale = noise_multiplier = None
    if mechanism == "gaussian":
        if delta is None:
            raise ValueError("the Gaussian mechanism needs delta in (0, 1)")
        norm = "l2"
        sigma = gaussian_sigma(sensitivity, epsilon, delta, method=calibration)
        noise_multiplier = sigma / sensitivity
    elif mechanism == "laplace":
        if delta:
            raise ValueError(f"the Laplace mechanism is pure epsilon-DP; got delta={delta!r}")
        delta, norm = 0.0, "l1"
        scale = laplace_scale(sensitivity, epsilon)
    else:
        raise ValueError(f"mechanism must be 'gaussian' or 'laplace', got {mechanism!r}")
    before = _flat_norm(update.values(), norm)
    factor = min(1.0, clip / before) if before > 0 else 1.0
    out: dict[str, np.ndarray] = {}
    for k, v in update.items():
        x = np.asarray(v, dtype=np.float64) * factor
        if sigma is not None:
            x = x + rng.normal(0.0, sigma, size=x.shape)
        else:
            x = x + rng.laplace(0.0, scale, size=x.shape)
        out[k] = x.astype(np.float32)
    report = OutputNoiseReport(
        mechanism=mechanism,
        norm=norm,
        norm_before=before,
        clipped=before > clip,
        clip=clip,
        adjacency=adjacency,
        sensitivity=sensitivity,
        epsilon=float(epsilon),
        delta=float(delta),
        sigma=sigma,
        scale=scale,
        noise_multiplier=noise_multiplier,
        num_params=int(sum(np.asarray(v).size for v in update.values())),
    )
    return out, report


# -- composition and RDP accounting -------------------------------------------------------


def _alphas() -> list[float]:
    from opacus.accountants import RDPAccountant

    return list(RDPAccountant.DEFAULT_ALPHAS)


def _rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """epsilon of ``steps`` subsampled Gaussian steps via Opacus' RDP analysis."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if noise_multiplier < 0 or steps < 0:
        raise ValueError(
            f"need noise_multiplier >= 0 and steps >= 0, got {noise_multiplier}, {steps}"
        )
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = _alphas()
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=orders)
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def compose_basic(epsilon: float, delta: float, rounds: int) -> tuple[float, float]:
    """Basic composition over ``rounds`` releases: (k * epsilon, k * delta)."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    return rounds * epsilon, rounds * delta


def compose_rdp_gaussian(noise_multiplier: float, rounds: int, delta: float) -> float:
    """epsilon after ``rounds`` Gaussian releases with ``noise_multiplier`` = sigma /
    sensitivity, at total ``delta``, by RDP (Opacus ``compute_rdp`` with q = 1)."""
    return _rdp_epsilon(noise_multiplier, 1.0, rounds, delta)


@dataclass(frozen=True)
class ComposedBudget:
    """A node's output-DP budget over the rounds it took part in: the tighter bound, and both."""

    epsilon: float
    delta: float
    method: str  # "basic" or "rdp"
    rounds: int
    basic_epsilon: float
    rdp_epsilon: float | None  # None for Laplace


def compose_rounds(
    mechanism: str,
    epsilon: float,
    delta: float,
    rounds: int,
    noise_multiplier: float | None = None,
) -> ComposedBudget:
    """Compose ``rounds`` per-round (epsilon, delta) releases of one node.

    Both bounds are taken at the same total delta (``rounds * delta``) so they compare like
    with like: basic gives ``rounds * epsilon``; for Gaussian, RDP on ``noise_multiplier``
    (from the ``OutputNoiseReport``) usually gives much less after a few rounds. Laplace:
    basic only (pure epsilon, total delta 0).
    """
    basic_eps, basic_delta = compose_basic(epsilon, delta, rounds)
    if mechanism == "laplace":
        return ComposedBudget(basic_eps, basic_delta, "basic", rounds, basic_eps, None)
    if mechanism != "gaussian" or noise_multiplier is None:
        raise ValueError("Gaussian composition needs mechanism='gaussian' and noise_multiplier")
    if rounds == 0:
        return ComposedBudget(0.0, 0.0, "basic", 0, 0.0, 0.0)
    rdp_eps = (
        compose_rdp_gaussian(noise_multiplier, rounds, basic_delta) if basic_delta < 1 else math.inf
    )
    if rdp_eps < basic_eps:
        return ComposedBudget(rdp_eps, basic_delta, "rdp", rounds, basic_eps, rdp_eps)
    return ComposedBudget(basic_eps, basic_delta, "basic", rounds, basic_eps, rdp_eps)


def central_dp_epsilon(
    noise_multiplier: float, sample_rate: float, rounds: int, delta: float
) -> float:
    """User-level epsilon of central DP after ``rounds`` rounds.

    Each node's clipped update is one "sample" of the sum the server noises;
    ``sample_rate`` is the fraction of nodes sampled per round, ``noise_multiplier`` the
    server noise std over the clip. The amplification by sampling assumes Poisson
    sampling of nodes; Flower (and this ServerApp) sample a fixed number, for which this is
    an approximation: pass ``sample_rate=1.0`` for a bound that assumes no amplification.
    """
    return _rdp_epsilon(noise_multiplier, sample_rate, rounds, delta)


def sample_rate_for(num_images: int, batch_size: int) -> float:
    """Poisson sampling rate of DP-SGD as Opacus sets it: ``1 / ceil(num_images /
    batch_size)`` (``1 / len(DataLoader)``), which is ``batch_size / num_images`` when the
    batch size divides the data, and at most 1."""
    if num_images < 1 or batch_size < 1:
        raise ValueError(
            f"need num_images >= 1 and batch_size >= 1, got {num_images}, {batch_size}"
        )
    return 1.0 / math.ceil(num_images / batch_size)


def planned_steps(
    rounds: int, local_epochs: int, num_images: int, batch_size: int, participation: float = 1.0
) -> int:
    """Expected DP-SGD steps of one node over the whole run.

    Steps per epoch under Poisson sampling with rate q = batch_size / num_images: 1 / q,
    rounded up (never fewer than Opacus' sampler takes), times local epochs, times the
    rounds the node is expected to join (``rounds * participation``, rounded up). A node
    sampled more often than expected spends more: ``NodeAccountant.budget_spent`` is the
    hard stop; plan with ``participation=1.0`` to be safe.
    """
    if rounds < 0 or local_epochs < 1 or not 0 < participation <= 1:
        raise ValueError(
            f"need rounds >= 0, local_epochs >= 1, participation in (0, 1]; got {rounds}, "
            f"{local_epochs}, {participation}"
        )
    q = sample_rate_for(num_images, batch_size)
    per_epoch = 1 if q >= 1 else math.ceil(num_images / batch_size)
    joined = math.ceil(round(rounds * participation, 9))
    return joined * local_epochs * per_epoch


def noise_multiplier_for(
    target_epsilon: float, delta: float, sample_rate: float, total_steps: int
) -> float:
    """The smallest noise multiplier (to 0.5 % of epsilon) with which ``total_steps``
    DP-SGD steps at ``sample_rate`` stay within (target_epsilon, delta), by Opacus'
    ``get_noise_multiplier(accountant="rdp")``. Plan for the whole run, not per round."""
    _positive("target_epsilon", target_epsilon)
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 < sample_rate <= 1 or not 0 < delta < 1:
        raise ValueError(f"need sample_rate in (0, 1] and delta in (0, 1): {sample_rate}, {delta}")
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # the search visits sigmas where alpha=63 is optimal
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=int(total_steps),
            accountant="rdp",
            epsilon_tolerance=0.005 * target_epsilon,
        )
    return float(sigma)


# -- DP-SGD accounting that survives process restarts -------------------------------------

_ACCOUNTANT_FORMAT = "fedsd-rdp-accountant/1"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock beside ``path`` (POSIX), so two processes never lose a record."""
    try:
        import fcntl
    except ImportError:  # not POSIX: single writer assumed
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class NodeAccountant:
    """A node's cumulative DP-SGD history, in the shape of Opacus ``RDPAccountant.history``
    (``[(noise_multiplier, sample_rate, steps), ...]``), kept in a JSON file.

    Every ClientApp message is a fresh process, so the history lives on disk and epsilon is
    always recomputed from all of it (cumulative over rounds, not per round). ``record``
    re-reads the file under a lock, appends and saves atomically (temp file + rename), so a
    crash never leaves a half-written file and never forgets spent budget. A missing file is
    an empty history; a corrupt one is an error, never a silent reset.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Read the history stored at ``path`` (empty if there is no file yet)."""
        self.path = Path(path)
        self.history: list[tuple[float, float, int]] = _read_history(self.path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NodeAccountant:
        """The accountant stored at ``path`` (empty if there is no file yet)."""
        return cls(path)

    @property
    def steps(self) -> int:
        """DP-SGD steps recorded so far."""
        return sum(s for _, _, s in self.history)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Add ``steps`` steps at (noise_multiplier, sample_rate) and save."""
        self.extend([(noise_multiplier, sample_rate, steps)])

    def extend(self, history: Iterable[Any]) -> None:
        """Add entries (e.g. an Opacus accountant's ``history`` for this round) and save."""
        new = [_entry(h) for h in history]
        with _file_lock(self.path):
            self.history = _read_history(self.path)
            for nm, q, s in new:
                if s == 0:
                    continue
                if self.history and self.history[-1][:2] == (nm, q):
                    self.history[-1] = (nm, q, self.history[-1][2] + s)
                else:
                    self.history.append((nm, q, s))
            self.save()

    def save(self) -> None:
        """Write the history atomically and durably (``fedsd.atomic``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": _ACCOUNTANT_FORMAT, "history": [list(h) for h in self.history]}
        write_file(self.path, json.dumps(payload))

    def epsilon(self, delta: float) -> float:
        """Cumulative epsilon at ``delta``, from a fresh Opacus ``RDPAccountant``."""
        return history_epsilon(self.history, delta)

    def budget_spent(
        self,
        target_epsilon: float,
        delta: float,
        next_steps: int,
        noise_multiplier: float,
        sample_rate: float,
    ) -> bool:
        """Whether taking ``next_steps`` more steps would push epsilon above the target."""
        planned = [*self.history, _entry((noise_multiplier, sample_rate, next_steps))]
        return history_epsilon(planned, delta) > target_epsilon


def _entry(h: Any) -> tuple[float, float, int]:
    try:
        nm, q, steps = h
        nm, q = float(nm), float(q)
        if isinstance(steps, bool) or int(steps) != steps:
            raise ValueError
        steps = int(steps)
    except (TypeError, ValueError):
        raise ValueError(
            f"history entry must be (noise_multiplier, sample_rate, steps): {h!r}"
        ) from None
    if not (math.isfinite(nm) and nm >= 0 and 0 < q <= 1 and steps >= 0):
        raise ValueError(f"need noise_multiplier >= 0, sample_rate in (0, 1], steps >= 0: {h!r}")
    return nm, q, steps


def _read_history(path: Path) -> list[tuple[float, float, int]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    try:
        data = json.loads(text)
        if data.get("format") != _ACCOUNTANT_FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        return [_entry(h) for h in data["history"]]
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable privacy accountant file ({exc})") from exc


def history_epsilon(history: Iterable[Any], delta: float) -> float:
    """epsilon at ``delta`` of an Opacus-style history ``[(noise_multiplier, sample_rate,
    steps), ...]``, by a fresh ``RDPAccountant`` (for what-if questions; inf if unnoised)."""
    history = [_entry(h) for h in history]
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    live = [h for h in history if h[2] > 0]
    if not live:
        return 0.0
    if any(nm == 0 for nm, _, _ in live):
        return math.inf
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(live)
    return float(acc.get_epsilon(delta=delta))


# -- the record ---------------------------------------------------------------------------


@dataclass
class PrivacyRecord:
    """One privacy statement for a node or round, whatever the mechanism.

    ``mechanism`` e.g. "dp-sgd", "output-gaussian", "output-laplace", "central-gaussian",
    "secagg"; the DP numbers are cumulative (epsilon spent so far at delta).
    """

    mechanism: str
    noise_multiplier: float | None
    clip: float | None
    sample_rate: float | None
    steps: int | None
    epsilon: float | None
    delta: float | None
    node_id: int | None = None
    round: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # The data owner's ledger (``fedsd.node_privacy``): whose shard, and what everything
    # that shard was ever trained on has spent with this mechanism (``steps``/``epsilon``
    # above are this run's share). ``prior_*``: the same before this message, which the
    # server compares with what the owner reported last (a wiped ledger goes backwards).
    owner: str | None = None
    lifetime_steps: int | None = None
    lifetime_epsilon: float | None = None
    prior_steps: int | None = None
    prior_epsilon: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON (infinite epsilon stays ``inf``: no guarantee)."""
        out = dataclasses.asdict(self)
        out["extra"] = dict(self.extra)
        for key in _LEDGER_FIELDS:  # only records of a data owner's ledger carry them
            if out[key] is None:
                del out[key]
        return out


_LEDGER_FIELDS = ("owner", "lifetime_steps", "lifetime_epsilon", "prior_steps", "prior_epsilon")


def secagg_error_bound(weights: Iterable[float], cfg: PrivacyConfig, max_abs: float) -> float:
    """Largest per-value difference between SecAgg+'s aggregate and the exact weighted mean
    of values bounded by ``max_abs`` (<= ``secagg-clipping-range``), from quantization.

    Each node sends ``round(w/W * T)/T * x`` (W = max weight, T = quantization range)
    stochastically rounded to a grid of step ``2C/T``; the server divides the sum by the sum
    of the rounded weight ratios ``S``. So each value is off by less than ``n * 2C/T / S``
    from rounding, plus ``n * max_abs / (T * S)`` from the rounded weights.
    """
    w = [float(x) for x in weights]
    t = cfg.secagg_quantization_range
    ratios = [round(x / cfg.secagg_max_weight * t) / t for x in w]
    total = sum(ratios)
    if total <= 0:
        raise ValueError("SecAgg+ weights sum to zero after quantization")
    n = len(w)
    return n * (2.0 * cfg.secagg_clipping_range + max_abs) / (t * total)


# -- output-level DP across rounds --------------------------------------------------------

_LEDGER_FORMAT = "fedsd-output-dp-ledger/1"


class OutputLedger:
    """A node's output-DP releases in one run (one per round it sent an update), on disk.

    Like ``NodeAccountant``: every ClientApp is a fresh process, so the per-round releases
    are appended under a lock and composed from the whole ledger each time.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Read the ledger at ``path`` (empty if there is no file yet)."""
        self.path = Path(path)
        self.releases: list[dict[str, Any]] = self._read()

    def _read(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except ValueError as exc:
            raise ValueError(f"{self.path}: not a readable output-DP ledger ({exc})") from exc
        if data.get("format") != _LEDGER_FORMAT:
            raise ValueError(f"{self.path}: not a readable output-DP ledger")
        return list(data["releases"])

    def record(self, server_round: int, report: OutputNoiseReport) -> None:
        """Append one release and save atomically."""
        with _file_lock(self.path):
            self.releases = self._read()
            self.releases.append(
                {
                    "round": server_round,
                    "mechanism": report.mechanism,
                    "epsilon": report.epsilon,
                    "delta": report.delta,
                    "noise_multiplier": report.noise_multiplier,
                }
            )
            self.path.parent.mkdir(parents=True, exist_ok=True)
            payload = {"format": _LEDGER_FORMAT, "releases": self.releases}
            write_file(self.path, json.dumps(payload))

    def composed(self) -> ComposedBudget:
        """The cumulative budget of all releases (they share one mechanism and setting)."""
        return compose_releases(self.releases)


def compose_releases(releases: list[dict[str, Any]]) -> ComposedBudget:
    """The budget of output-DP releases (``OutputLedger`` entries): RDP or basic composition
    when they share one setting, basic composition of each otherwise."""
    if not releases:
        return ComposedBudget(0.0, 0.0, "basic", 0, 0.0, 0.0)
    settings = {(r["mechanism"], r["epsilon"], r["delta"]) for r in releases}
    if len(settings) != 1:  # a changed setting (mid-run, or across runs of one shard)
        eps = sum(r["epsilon"] for r in releases)
        delta = sum(r["delta"] for r in releases)
        return ComposedBudget(eps, delta, "basic", len(releases), eps, None)
    first = releases[0]
    return compose_rounds(
        first["mechanism"],
        first["epsilon"],
        first["delta"],
        len(releases),
        first["noise_multiplier"],
    )
