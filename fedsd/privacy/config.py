"""The validated privacy config of a run (the privacy keys of the run config)."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedsd.common.coerce import as_float, as_int, as_int_or_fraction, as_str, config_error, require
from fedsd.common.errors import ConfigError
from fedsd.privacy.mechanisms import gaussian_sigma, laplace_scale
from fedsd.privacy.modes import canonical_privacy, parse_privacy

OUTPUT_MECHANISMS = ("gaussian", "laplace")
#: How many noise scales past the clip one value of a noised update may reach, per
#: mechanism, before the chance of it is below ~1e-13 (Gaussian 7.5 sigma, Laplace 30 b).
OUTPUT_NOISE_TAILS = {"gaussian": 7.5, "laplace": 30.0}
#: Flower documents ``modulus_range`` up to 2**32 (its default) for SecAgg+ masks.
MAX_MODULUS_RANGE = 2**32


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


def _name(key: str, value: Any) -> str:
    return as_str(key, value, normalize=True)


# kebab key -> (field name, coercion)
_KEYS = {
    "privacy": ("privacy", _name),
    "dp-target-epsilon": ("dp_target_epsilon", as_float),
    "dp-delta": ("dp_delta", as_float),
    "dp-noise-multiplier": ("dp_noise_multiplier", as_float),
    "dp-max-grad-norm": ("dp_max_grad_norm", as_float),
    "dp-grad-sample-mode": ("dp_grad_sample_mode", _name),
    "dp-output-mechanism": ("dp_output_mechanism", _name),
    "dp-output-clip": ("dp_output_clip", as_float),
    "dp-output-epsilon": ("dp_output_epsilon", as_float),
    "dp-output-delta": ("dp_output_delta", as_float),
    "dp-central-noise-multiplier": ("dp_central_noise_multiplier", as_float),
    "dp-central-clip": ("dp_central_clip", as_float),
    "secagg-num-shares": ("secagg_num_shares", as_int_or_fraction),
    "secagg-reconstruction-threshold": ("secagg_reconstruction_threshold", as_int_or_fraction),
    "secagg-clipping-range": ("secagg_clipping_range", as_float),
    "secagg-quantization-range": ("secagg_quantization_range", as_int),
    "secagg-modulus-range": ("secagg_modulus_range", as_int),
    "secagg-max-weight": ("secagg_max_weight", as_float),
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
        require(
            self.dp_target_epsilon >= 0,
            "dp-target-epsilon",
            self.dp_target_epsilon,
            "> 0, or 0 for not given",
        )
        require(0 < self.dp_delta < 1, "dp-delta", self.dp_delta, "in (0, 1)")
        require(
            self.dp_noise_multiplier >= 0,
            "dp-noise-multiplier",
            self.dp_noise_multiplier,
            ">= 0 (0 = derive it from dp-target-epsilon)",
        )
        require(self.dp_max_grad_norm > 0, "dp-max-grad-norm", self.dp_max_grad_norm, "> 0")
        require(
            self.dp_grad_sample_mode in GRAD_SAMPLE_MODES,
            "dp-grad-sample-mode",
            self.dp_grad_sample_mode,
            " or ".join(GRAD_SAMPLE_MODES),
        )
        require(
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
                require(
                    shares > 2,
                    "secagg-num-shares",
                    shares,
                    "an integer > 2 (Flower refuses 2 and reads 1 as 1.0 = all nodes) "
                    "or a fraction of the sampled nodes in (0, 1], e.g. 1.0",
                )
            else:
                require(
                    0 < shares <= 1,
                    "secagg-num-shares",
                    shares,
                    "a fraction in (0, 1], or an integer count > 2 (a float is read as "
                    "a fraction by Flower)",
                )
        if thr is not None:
            if isinstance(thr, int):
                require(
                    thr >= 2,
                    "secagg-reconstruction-threshold",
                    thr,
                    "an integer >= 2 (Flower reads 1 as 1.0 = all shares) or a fraction in (0, 1]",
                )
                if isinstance(shares, int):
                    require(
                        thr < shares,
                        "secagg-reconstruction-threshold",
                        thr,
                        f"< secagg-num-shares={shares}",
                    )
            else:
                require(
                    0 < thr <= 1,
                    "secagg-reconstruction-threshold",
                    thr,
                    "a fraction in (0, 1] or an integer >= 2",
                )
        require(
            self.secagg_clipping_range > 0,
            "secagg-clipping-range",
            self.secagg_clipping_range,
            "> 0",
        )
        require(
            self.secagg_quantization_range > 0,
            "secagg-quantization-range",
            self.secagg_quantization_range,
            "an integer > 0",
        )
        mod = self.secagg_modulus_range
        require(
            mod > 0 and mod & (mod - 1) == 0 and mod <= MAX_MODULUS_RANGE,
            "secagg-modulus-range",
            mod,
            "a power of two <= 2**32",
        )
        require(
            mod > self.secagg_quantization_range,
            "secagg-modulus-range",
            mod,
            f"> secagg-quantization-range={self.secagg_quantization_range}",
        )
        require(self.secagg_max_weight > 0, "secagg-max-weight", self.secagg_max_weight, "> 0")


def _check_opt(value: Any, ok: Any, key: str, allowed: str) -> None:
    if value is not None and not ok(value):
        raise config_error(key, value, allowed)
