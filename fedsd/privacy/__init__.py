"""Privacy for fedsd: modes, their validated config, output-level DP and cumulative DP accounting.

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

Layout (one concern per module; this package re-exports the public names):

* ``modes``: the components a run uses and the allowed combinations;
* ``config``: ``PrivacyConfig``, the privacy keys of the run config, validated;
* ``mechanisms``: clipping and Gaussian/Laplace noise on an update;
* ``accounting``: RDP and basic composition, central DP, DP-SGD plans;
* ``central``: the server's central DP noise on the aggregate, and its record;
* ``ledgers``: on-disk DP-SGD and output-DP histories of a node;
* ``record``: ``PrivacyRecord``, the statement a node or round reports;
* ``report``: the terminal lines of a round's records and ``fedsd privacy-report``;
* ``secagg_params``: SecAgg+ parameter checks and their quantization error.
"""

from __future__ import annotations

from fedsd.privacy.accounting import (
    ComposedBudget,
    central_dp_epsilon,
    compose_basic,
    compose_rdp_gaussian,
    compose_releases,
    compose_rounds,
    history_epsilon,
    noise_multiplier_for,
    planned_steps,
    sample_rate_for,
)
from fedsd.privacy.central import central_noise
from fedsd.privacy.config import (
    DEFAULT_GRAD_SAMPLE_MODE,
    GRAD_SAMPLE_MODES,
    OUTPUT_MECHANISMS,
    PrivacyConfig,
)
from fedsd.privacy.ledgers import NodeAccountant, OutputLedger
from fedsd.privacy.mechanisms import (
    OutputNoiseReport,
    clip_update,
    gaussian_delta,
    gaussian_sigma,
    laplace_scale,
    noise_rng,
    privatize_update,
)
from fedsd.privacy.modes import ALLOWED_MODES, COMPONENTS, canonical_privacy, parse_privacy
from fedsd.privacy.record import PrivacyRecord
from fedsd.privacy.secagg_params import (
    SecAggPlan,
    check_secagg,
    check_secagg_values,
    check_secagg_weight,
    secagg_defaults,
    secagg_error_bound,
)

__all__ = [
    "ALLOWED_MODES",
    "COMPONENTS",
    "ComposedBudget",
    "DEFAULT_GRAD_SAMPLE_MODE",
    "GRAD_SAMPLE_MODES",
    "NodeAccountant",
    "OUTPUT_MECHANISMS",
    "OutputLedger",
    "OutputNoiseReport",
    "PrivacyConfig",
    "PrivacyRecord",
    "SecAggPlan",
    "canonical_privacy",
    "central_dp_epsilon",
    "central_noise",
    "check_secagg",
    "check_secagg_values",
    "check_secagg_weight",
    "clip_update",
    "compose_basic",
    "compose_rdp_gaussian",
    "compose_releases",
    "compose_rounds",
    "gaussian_delta",
    "gaussian_sigma",
    "history_epsilon",
    "laplace_scale",
    "noise_multiplier_for",
    "noise_rng",
    "parse_privacy",
    "planned_steps",
    "privatize_update",
    "sample_rate_for",
    "secagg_defaults",
    "secagg_error_bound",
]
