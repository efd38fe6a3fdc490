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
    # q and k are the features (the bound's convention; absent, the method's default elu + 1
    # applies, which the bound refuses): the examples draw features (strategies, runner)
    return {"feature_map": None}


def linear_draw(draw: Any, d_k: int, n: int, batch: Any, g: Any, degrees: Any) -> dict:
    return linear_defaults(d_k, n, g)


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

    from attnprec.attention.semiring import LogExpMean, MixtureLSE, SoftMaxPlus

    # (not Tropical: it has no rounding bound, ties can flip, so its examples could not be
    # checked against one; its references are tested on their own)
    choices = (
        LogExpMean(0.5),
        LogExpMean(2.0),
        SoftMaxPlus(0.5),
        MixtureLSE((0.5, 0.5), (0.5, 1.0)),
    )
    return {"semiring": draw(st.sampled_from(choices))}


def gated_defaults(d_k: int, n: int, g: torch.Generator) -> dict[str, Any]:
    return {"log_g": -torch.rand(n, generator=g, dtype=torch.float64)}


def gated_draw(draw: Any, d_k: int, n: int, batch: Any, g: Any, degrees: Any) -> dict:
    # Gates in (e^-2, 1], some exactly 1 (log 0): decays and pass-throughs.
    log_g = -2.0 * torch.rand(*batch, n, generator=g, dtype=torch.float64)
    log_g[..., ::3] = 0.0
    if batch and batch[-1] == n == d_k > 1:  # [B, n] would read as per channel too: refused
        log_g = log_g[..., None].expand(*log_g.shape, d_k)
    return {"log_g": log_g}


# --- state-space models: parameters on the common grid of fp16 and bf16 ------------------------


def _grid(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float64) rounded to bf16 then to fp16: at most 8 significant bits, in fp16's
    range, so exactly representable in fp16, bf16 and fp32 (the audit's storage formats
    see the parameters as given: no quantization hides in them)."""
    from attnprec.analysis.precision import round_to

    return round_to(round_to(x, "bf16"), "fp16")


#: Regimes of the step and the decay (``lambda = exp(delta A)``): moderate (Mamba's
#: initialization), long memory (``1 - lambda`` in ``[1e-7, 1e-4]``), fast decay
#: (``delta |A|`` up to 60), large steps with small ``|A|``, tiny steps.
SSM_REGIMES = ("moderate", "long", "fast", "large", "tiny")


def _regime(name: str, shape: tuple[int, ...], g: torch.Generator) -> tuple:
    """(delta, |A|) float64 tensors of ``shape`` in regime ``name``."""

    def uni(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)

    if name == "moderate":
        return 10 ** uni(-3, -1), uni(0.5, 8)
    if name == "long":  # delta |A| = 1 - lambda in [1e-7, 1e-4]
        a = 10 ** uni(-4, -1)
        return 10 ** uni(-7, -4) / a, a
    if name == "fast":
        return uni(0.5, 2), uni(5, 30)
    if name == "large":
        return uni(10, 100), uni(0.01, 1)
    if name == "tiny":
        return 2.0**-14 * uni(1, 4), uni(0.5, 4)
    raise AssertionError(name)


def selective_scan_defaults(d_k: int, n: int, g: torch.Generator) -> dict[str, Any]:
    """The audit's selective scan (D = d_v = d_k channels, N = d_k states): the channels
    cycle through :data:`SSM_REGIMES` (a regime per channel: step per token and channel,
    ``A`` per channel and state), a skip ``D`` in ``[-1, 1]``, Euler's ``B_bar``."""
    delta = torch.empty(n, d_k, dtype=torch.float64)
    A = torch.empty(d_k, d_k, dtype=torch.float64)
    for c in range(d_k):
        name = SSM_REGIMES[c % len(SSM_REGIMES)]
        delta[:, c] = _regime(name, (n,), g)[0]
        A[c] = -_regime(name, (d_k,), g)[1]
    D = 2 * torch.rand(d_k, generator=g, dtype=torch.float64) - 1
    return {"delta": _grid(delta), "A": _grid(A), "D": _grid(D)}


def selective_scan_draw(draw: Any, d_k: int, n: int, batch: Any, g: Any, degrees: Any) -> dict:
    """One regime (or a mix over the tokens), one step per token shared by the channels
    (``delta [..., n, 1]``: the value width is not known here), ``A [1, d_k]``, both
    discretizations, with or without a skip."""
    from hypothesis import strategies as st

    name = draw(st.sampled_from(("mixed", *SSM_REGIMES)))
    if name == "mixed":
        picks = torch.randint(len(SSM_REGIMES), (n,), generator=g)
        delta = torch.stack([_regime(SSM_REGIMES[int(i)], tuple(batch), g)[0] for i in picks], -1)
        A = -_regime("moderate", (1, d_k), g)[1]
    else:
        delta = _regime(name, (*batch, n), g)[0]
        A = -_regime(name, (1, d_k), g)[1]
    out: dict[str, Any] = {
        "delta": _grid(delta.reshape(*batch, n, 1)),
        "A": _grid(A),
        "discretization": draw(st.sampled_from(("euler", "zoh"))),
    }
    if draw(st.booleans()):
        out["D"] = _grid(2 * torch.rand(1, generator=g, dtype=torch.float64) - 1)
    return out


#: The regimes whose decays keep a state across chunks (per step at most ``e^-0.8``), in
#: blocks of four tokens: every 16 tokens end on moderate steps, so a chunk of 16 (or of a
#: multiple) passes on a state that its last decays move.
CARRYING = ("long", "tiny", "moderate", "moderate")


def ssd_defaults(d_k: int, n: int, g: torch.Generator) -> dict[str, Any]:
    """The audit's SSD head: ``A = -0.5``, steps (scaled to that ``A``) cycling in blocks of
    four tokens through :data:`CARRYING` over the first three quarters of the sequence,
    then through all of :data:`SSM_REGIMES`; a skip ``D [d_v = d_k]``. (Cycling through all
    of them from the start reset the state every 20 tokens: a kernel that dropped the
    state between its chunks was exact, a review; carrying over the first half only, or
    ending chunks on long-memory steps, a state decayed short of its chunk's last gates
    was exact or ok at n = 64 in chunks of 16, two more.)"""
    a = 0.5
    dt = torch.empty(n, dtype=torch.float64)
    for t in range(n):
        regimes = CARRYING if t < 3 * n // 4 else SSM_REGIMES
        d, amag = _regime(regimes[(t // 4) % len(regimes)], (1,), g)
        dt[t] = d[0] * amag[0] / a  # the regime's delta |A| at this A
    D = 2 * torch.rand(d_k, generator=g, dtype=torch.float64) - 1
    return {"dt": _grid(dt), "A": -a, "D": _grid(D)}


def ssd_draw(draw: Any, d_k: int, n: int, batch: Any, g: Any, degrees: Any) -> dict:
    """One regime for the steps, ``A`` one scalar, with or without a scalar skip."""
    from hypothesis import strategies as st

    name = draw(st.sampled_from(SSM_REGIMES))
    d, amag = _regime(name, (*batch, n), g)
    a = float(_grid(amag.flatten()[:1])[0])
    out: dict[str, Any] = {"dt": _grid(d * amag / a), "A": -a}
    if draw(st.booleans()):
        out["D"] = float(_grid(2 * torch.rand(1, generator=g, dtype=torch.float64) - 1)[0])
    return out


def ssm_defaults(d_k: int, n: int, g: torch.Generator) -> dict[str, Any]:
    """The audit's LTI SSM: S4D-real's ``A[d, n] = -(n + 1)/2``, one step per channel
    log-uniform in ``[1e-3, 1e-1]`` (S4D's initialization) with every third channel in the
    long-memory regime, a skip ``D``, the zero-order hold."""
    A = -0.5 * torch.arange(1, d_k + 1, dtype=torch.float64).expand(d_k, d_k).clone()
    dt = 10 ** (-3 + 2 * torch.rand(d_k, generator=g, dtype=torch.float64))
    dt[::3] = 1e-6 * (1 + torch.rand(len(range(0, d_k, 3)), generator=g, dtype=torch.float64))
    D = 2 * torch.rand(d_k, generator=g, dtype=torch.float64) - 1
    return {"A": _grid(A), "dt": _grid(dt), "D": _grid(D)}


def ssm_draw(draw: Any, d_k: int, n: int, batch: Any, g: Any, degrees: Any) -> dict:
    """``A [d_k]`` shared by the channels, one step ``dt`` (a regime), either
    discretization."""
    from hypothesis import strategies as st

    name = draw(st.sampled_from(SSM_REGIMES))
    d, amag = _regime(name, (d_k,), g)
    a = _grid(amag)
    step = float(_grid(d[:1] * amag[:1] / a[:1])[0])
    return {
        "A": -a,
        "dt": step,
        "discretization": draw(st.sampled_from(("zoh", "euler"))),
    }


# --- H3: a shift kernel and per-channel decays, on the common grid -----------------------------

#: H3's decay regimes (``log_decay``): moderate, long memory (``1 - lambda`` in ``[1e-7,
#: 1e-4]``), fast, and none (``lambda = 1``: the diagonal SSM accumulates).
H3_REGIMES = ("moderate", "long", "fast", "none")


def _h3_log_decay(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    if name == "moderate":
        return -(10 ** (-2 + 2 * u))
    if name == "long":
        return -(10 ** (-7 + 3 * u))
    if name == "fast":
        return -(1 + 4 * u)
    return torch.zeros(shape, dtype=torch.float64)


def h3_defaults(d_k: int, n: int, g: torch.Generator) -> dict[str, Any]:
    """The audit's H3 head: a shift kernel of 4 taps per key channel in ``[-1, 1]`` (the
    current key's tap in ``[1/2, 1]``), one decay per key channel cycling through
    :data:`H3_REGIMES`."""
    shift = 2 * torch.rand(d_k, 4, generator=g, dtype=torch.float64) - 1
    shift[:, 0] = 0.5 + 0.5 * shift[:, 0].abs()
    log_decay = torch.empty(d_k, dtype=torch.float64)
    for c in range(d_k):
        log_decay[c] = _h3_log_decay(H3_REGIMES[c % len(H3_REGIMES)], (1,), g)[0]
    return {"shift": _grid(shift), "log_decay": _grid(log_decay)}


def h3_draw(draw: Any, d_k: int, n: int, batch: Any, g: Any, degrees: Any) -> dict:
    """A shift kernel of 1 to 4 taps (shared, or per key channel), one decay regime (or a
    mix over the channels), per channel ``[..., d_k, 1]`` (per head when batched)."""
    from hypothesis import strategies as st

    m = draw(st.integers(1, 4))
    rows = draw(st.sampled_from((1, d_k)))
    shift = 2 * torch.rand(rows, m, generator=g, dtype=torch.float64) - 1
    name = draw(st.sampled_from(("mixed", *H3_REGIMES)))
    if name == "mixed":
        picks = torch.randint(len(H3_REGIMES), (d_k,), generator=g)
        ld = torch.stack([_h3_log_decay(H3_REGIMES[int(i)], tuple(batch), g) for i in picks], -1)
    else:
        ld = _h3_log_decay(name, (*batch, d_k), g)
    return {"shift": _grid(shift), "log_decay": _grid(ld.reshape(*batch, d_k, 1))}
