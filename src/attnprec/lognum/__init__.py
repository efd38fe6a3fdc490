"""attnprec.lognum: signed numbers in log space and the accurate primitives under them.

Zero is ``log = -inf`` with sign 0; exact cancellation gives an exact zero; NaN
propagates. Everything computes in float64 and rounds once to the output dtype.
See docs/lognum.md for a guide and docs/accuracy.md for the measured errors.
"""

from .elementwise import log1mexp, log1pexp, logaddexp, logsubexp
from .recurrence import linear_recurrence
from .reductions import (
    SIGNED_SUM_C,
    log_matmul_exp,
    logcumsumexp,
    logsumexp,
    signed_sum_error_bound,
)
from .signed import ComplexLog, SignedLog

__all__ = [
    "SIGNED_SUM_C",
    "ComplexLog",
    "SignedLog",
    "linear_recurrence",
    "log1mexp",
    "log1pexp",
    "log_matmul_exp",
    "logaddexp",
    "logcumsumexp",
    "logsubexp",
    "logsumexp",
    "signed_sum_error_bound",
]
