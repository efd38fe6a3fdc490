"""attnprec.attention: reference implementations of every attention method.

Parallel (quadratic or chunked) and causal forms of each method, and for the linearizable
ones a recurrent form with explicit state: pass ``causal=True, return_state=True`` to get
the state after the last token and ``state=`` to continue from it; one token per call is
the recurrence, at constant cost per token.
"""

from attnprec.attention._feature import FeatureState
from attnprec.attention.favor import favor_attention, favor_features, favor_projection
from attnprec.attention.gated import GatedState, gated_linear_attention
from attnprec.attention.h3 import H3State, h3_attention
from attnprec.attention.linear import elu1, linear_attention
from attnprec.attention.log import LogState, log_attention
from attnprec.attention.semiring import (
    LogExpMean,
    MixtureLSE,
    Semiring,
    SoftMaxPlus,
    Tropical,
    semiring_attention,
)
from attnprec.attention.softmax import softmax_attention
from attnprec.attention.ssm import (
    SelectiveScanState,
    SSDState,
    selective_scan_attention,
    selective_scan_log,
    ssd_attention,
    ssm_attention,
)
from attnprec.attention.taylor import (
    polynomial_attention,
    taylor_attention,
    taylor_features,
    taylor_multinomials,
)

__all__ = [
    "softmax_attention",
    "log_attention",
    "taylor_attention",
    "polynomial_attention",
    "taylor_features",
    "taylor_multinomials",
    "linear_attention",
    "elu1",
    "favor_attention",
    "favor_features",
    "favor_projection",
    "semiring_attention",
    "Semiring",
    "LogExpMean",
    "SoftMaxPlus",
    "MixtureLSE",
    "Tropical",
    "gated_linear_attention",
    "selective_scan_attention",
    "selective_scan_log",
    "ssd_attention",
    "ssm_attention",
    "h3_attention",
    "SelectiveScanState",
    "SSDState",
    "FeatureState",
    "GatedState",
    "H3State",
    "LogState",
]
