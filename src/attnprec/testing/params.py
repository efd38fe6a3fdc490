"""Each method's parameters for audits and property tests, found through the method table.

Per method two functions, named in its record (:mod:`attnprec.methods`): ``defaults`` —
the fixed, documented keywords the ``attnprec audit`` command uses — and ``strategy`` — the
keywords a Hypothesis example draws. :func:`default_params` and :func:`draw_params` look
the method up and call them.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from attnprec.methods import method as method_record

__all__ = ["default_params", "draw_params"]


def default_params(method: str, d_k: int, n: int, seed: int = 0) -> dict[str, Any]:
    """The keywords the default audit of ``method`` uses (one fixed choice per method)."""
    rec = method_record(method)
    g = torch.Generator().manual_seed(seed)
    params = dict(rec.resolve("defaults")(d_k, n, g))
    if rec.default_causal():
        params["causal"] = True
    return params


def draw_params(
    draw: Any,
    method: str,
    d_k: int,
    n: int,
    batch: tuple[int, ...],
    g: torch.Generator,
    degrees: tuple[int, ...],
) -> dict[str, Any]:
    """The keywords one Hypothesis example of ``method`` draws."""
    return dict(method_record(method).resolve("strategy")(draw, d_k, n, batch, g, degrees))


# --- per method (named in the table) -----------------------------------------------------------


def no_params(*_: Any) -> dict[str, Any]:
    """Methods without keywords of their own."""
    return {}


def taylor_defaults(d_k: int, n: int, g: torch.Generator) -> dict[str, Any]:
    return {"degree": 2}


def taylor_draw(draw: Any, d_k: int, n: int, batch: Any, g: Any, degrees: Any) -> dict:
    from hypothesis import strategies as st

    return {"degree": draw(st.sampled_from(tuple(degrees)))}


def polynomial_defaults(d_k: int, n: int, g: torch.Generator) -> dict[str, Any]:
    return {"coeffs": (1.0, 0.5, 0.5)}  # positive definite: 0.5^2 < 4 * 1 * 0.5


def polynomial_draw(draw: Any, d_k: int, n: int, batch: Any, g: Any, degrees: Any) -> dict:
    from hypothesis import strategies as st

    # c0 + c1 s + c2 s^2 with c1^2 < 4 c0 c2: positive for every s, so the normalizer is.
    c2 = draw(st.floats(0.25, 1.0))
    c1 = draw(st.floats(-0.9, 0.9)) * math.sqrt(4 * c2)
    return {"coeffs": (1.0, c1, c2)}


def linear_defaults(d_k: int, n: int, g: torch.Generator) -> dict[str, Any]:
    return {"feature_map": None}  # q and k are the features (the kernel's convention)


def favor_defaults(d_k: int, n: int, g: torch.Generator) -> dict[str, Any]:
    from attnprec.attention.favor import favor_projection

    return {"projection": favor_projection(32, d_k, generator=g)}


def favor_draw(draw: Any, d_k: int, n: int, batch: Any, g: Any, degrees: Any) -> dict:
    from hypothesis import strategies as st

    from attnprec.attention.favor import favor_projection

    m = draw(st.sampled_from((8, 32)))
    return {"projection": favor_projection(m, d_k, generator=g)}


def semiring_defaults(d_k: int, n: int, g: torch.Generator) -> dict[str, Any]:
    from attnprec.attention.semiring import SoftMaxPlus

    return {"semiring": SoftMaxPlus(0.5)}


def semiring_draw(draw: Any, d_k: int, n: int, batch: Any, g: Any, degrees: Any) -> dict:
    from hypothesis import strategies as st

    from attnprec.attention.semiring import LogExpMean, MixtureLSE, SoftMaxPlus, Tropical

    choices = (
        LogExpMean(0.5),
        LogExpMean(2.0),
        SoftMaxPlus(0.5),
        MixtureLSE((0.5, 0.5), (0.5, 1.0)),
        Tropical(),
    )
    return {"semiring": draw(st.sampled_from(choices))}


def gated_defaults(d_k: int, n: int, g: torch.Generator) -> dict[str, Any]:
    return {"log_g": -torch.rand(n, generator=g, dtype=torch.float64)}


def gated_draw(draw: Any, d_k: int, n: int, batch: Any, g: Any, degrees: Any) -> dict:
    # Gates in (e^-2, 1], some exactly 1 (log 0): decays and pass-throughs.
    log_g = -2.0 * torch.rand(*batch, n, generator=g, dtype=torch.float64)
    log_g[..., ::3] = 0.0
    return {"log_g": log_g}
