"""The method keywords the bound tests call every normalized method with (one place)."""

from __future__ import annotations

from attnprec.attention.semiring import SoftMaxPlus

#: ``attention_error_bound(method, ..., **METHOD_PARAMS[method])`` (gated adds ``log_g``).
METHOD_PARAMS = {
    "softmax": {},
    "log": {},
    "taylor": {"degree": 2},
    "polynomial": {"coeffs": (1.0, 0.5, 0.5)},
    "linear": {"feature_map": None},  # q and k are the features
    "semiring": {"semiring": SoftMaxPlus(0.5)},
    "gated": {},
}
