"""State-space models in the q, k, v frame: Mamba-1's selective scan, Mamba-2's SSD and the
LTI (S4D-real) SSM, each gated linear attention in disguise (docs/methods/selective_scan.md,
ssd.md, ssm.md).

- ``selective_scan``: ``q = C [.., T, N]``, ``k = B [.., T, N]``, ``v = u [.., T, D]``,
  per channel ``h_t[d] = exp(delta_t[d] A[d]) h_{t-1}[d] + B_bar_t[d] u_t[d]``,
  ``y_t[d] = C_t . h_t[d] + D[d] u_t[d]``: per channel d it is gated linear attention with
  ``q = C``, ``k = B_bar[:, d, :]``, ``v = u[:, d]`` (d_v = 1) and per-state log-gates
  ``delta[:, d] A[d, :]``.
- ``ssd``: ``q = C``, ``k = B``, ``v = x [.., T, P]``, scalar gates ``exp(A dt_t)``:
  ``y_t = sum_{s<=t} (C_t . B_s) exp(A sum_{r=s+1..t} dt_r) dt_s x_s + D x_t``.
- ``ssm``: the selective scan with a fixed step ``dt`` (the dynamics do not depend on
  time), computed by its recurrence, its direct convolution or an FFT.

Every decay is an exponential of a sum of log-gates over its own span (never a difference
of prefix sums, whose rounding grows with the whole prefix): the forms differ in rounding
only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from attnprec._validate import (
    broadcast_shapes,
    check_bool,
    check_causal_only,
    check_finite,
    check_float,
    check_qkv,
    compute_dtype,
    widened,
)
from attnprec.attention._common import (
    DEFAULT_CHUNK,
    check_chunk_size,
    check_state,
    empty_result,
    lower_mask,
)
from attnprec.attention.gated import gated_per_column

__all__ = [
    "DISCRETIZATIONS",
    "SelectiveScanState",
    "SSDState",
    "selective_scan_attention",
    "selective_scan_log",
    "ssd_attention",
    "ssm_attention",
    "ssm_kernel",
    "discretize",
    "check_selective",
    "check_ssd",
    "check_ssm",
]

#: ``"euler"``: ``B_bar = delta B`` (Mamba's reference); ``"zoh"``: the zero-order hold
#: ``B_bar = (exp(delta A) - 1) / (delta A) * delta B``. ``A_bar = exp(delta A)`` in both.
DISCRETIZATIONS = ("euler", "zoh")
#: |x| below which ``expm1(x) / x`` is taken as ``1 + x/2`` (its Taylor polynomial is then
#: exact to < 2^-60 relative, and ``expm1(x) / x`` would divide two subnormal-prone values).
_PHI_SMALL = 2.0**-30


@dataclass(frozen=True)
class SelectiveScanState:
    """Recurrent state of a selective scan: ``h [..., D, N]`` after the tokens seen (the
    gated state ``S`` of each channel d, ``[N, 1]``, squeezed)."""

    h: torch.Tensor


@dataclass(frozen=True)
class SSDState:
    """Recurrent state of SSD: ``h [..., N, P]`` after the tokens seen."""

    h: torch.Tensor


# --- validation (shared with the references and bounds) -----------------------------------


def _param(name: str, x: object) -> torch.Tensor:
    """A float tensor parameter, finite (NaN and inf rejected: they have no sign); one-byte
    floats widened (:func:`attnprec._validate.widened`)."""
    return check_finite(name, widened(check_float(name, x)))


def _check_discretization(discretization: object) -> str:
    if discretization not in DISCRETIZATIONS:
        raise ValueError(
            f"discretization: expected one of {DISCRETIZATIONS}, got {discretization!r}"
        )
    return str(discretization)


def _batch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, name: str, extra: Any) -> torch.Size:
    try:
        return broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2], extra)
    except RuntimeError:
        raise ValueError(
            f"{name}: batch dims {tuple(extra)} do not broadcast with q, k, v "
            f"({tuple(q.shape[:-2])}, {tuple(k.shape[:-2])}, {tuple(v.shape[:-2])})"
        ) from None


def check_selective(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    delta: object,
    A: object,
    D: object,
    discretization: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, str, torch.Size]:
    """Validate the selective scan's operands; return ``delta [..., T, D or 1]``, ``A [D or
    1, N]``, ``D [D or 1]`` (or None) as given, the discretization and the batch shape.

    Raises
    ------
    TypeError
        A non-float ``delta``, ``A`` or ``D`` (or q, k, v).
    ValueError
        Shapes that do not match (naming the argument), ``delta <= 0``, ``A >= 0``,
        non-finite parameters, an unknown discretization.
    """
    _, T, N, Dv = check_qkv(q, k, v, True)
    disc = _check_discretization(discretization)
    dl = _param("delta", delta)
    if dl.dim() < 2 or dl.shape[-2] != T or dl.shape[-1] not in (Dv, 1):
        raise ValueError(
            f"delta: expected shape [..., T={T}, D={Dv}] (or [..., T, 1]), got {tuple(dl.shape)}"
        )
    if bool((dl <= 0).any()):
        raise ValueError("delta: expected step sizes > 0, found a value <= 0")
    a = _param("A", A)
    if a.dim() != 2 or a.shape[-1] != N or a.shape[0] not in (Dv, 1):
        raise ValueError(f"A: expected shape [D={Dv}, N={N}] (or [1, N]), got {tuple(a.shape)}")
    if bool((a >= 0).any()):
        raise ValueError("A: expected a negative real diagonal (A < 0), found a value >= 0")
    d = None
    if D is not None:
        d = _param("D", D)
        if d.dim() != 1 or d.shape[0] not in (Dv, 1):
            raise ValueError(f"D: expected shape [D={Dv}] (or [1]), got {tuple(d.shape)}")
    batch = _batch(q, k, v, "delta", dl.shape[:-2])
    return dl, a, d, disc, batch


def check_ssd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dt: object, A: object, D: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Size]:
    """Validate SSD's operands; return ``dt [..., T]``, ``A`` (a tensor broadcastable to the
    batch dims), ``D`` (broadcastable to ``[..., P]``, or None) and the batch shape.

    Raises
    ------
    TypeError, ValueError
        As :func:`check_selective` (``dt <= 0``, ``A >= 0``, shapes), naming the argument.
    """
    _, T, _, P = check_qkv(q, k, v, True)
    if isinstance(dt, bool) or not isinstance(dt, torch.Tensor):
        raise TypeError(f"dt: expected a float tensor [..., T], got {type(dt).__name__}")
    d_t = _param("dt", dt)
    if d_t.dim() < 1 or d_t.shape[-1] != T:
        raise ValueError(f"dt: expected shape [..., T={T}], got {tuple(d_t.shape)}")
    if bool((d_t <= 0).any()):
        raise ValueError("dt: expected step sizes > 0, found a value <= 0")
    a = _scalar_tensor("A", A, q)
    if bool((a >= 0).any()):
        raise ValueError("A: expected a negative scalar per head (A < 0), found a value >= 0")
    batch = _batch(q, k, v, "dt", d_t.shape[:-1])
    try:
        batch = broadcast_shapes(batch, a.shape)
    except RuntimeError:
        raise ValueError(
            f"A: shape {tuple(a.shape)} does not broadcast with the batch dims {tuple(batch)}"
        ) from None
    d = None
    if D is not None:
        d = _scalar_tensor("D", D, q)
        try:
            broadcast_shapes((*batch, P), d.shape)
        except RuntimeError:
            raise ValueError(
                f"D: shape {tuple(d.shape)} does not broadcast with [..., P] = "
                f"{(*batch, P)} (a scalar per head is [H, 1])"
            ) from None
        if d.dim() > len(batch) + 1:
            raise ValueError(f"D: expected at most {len(batch) + 1} dims, got {tuple(d.shape)}")
    return d_t, a, d, batch


def _scalar_tensor(name: str, x: object, like: torch.Tensor) -> torch.Tensor:
    """A real number or a float tensor, as a finite float tensor."""
    if isinstance(x, bool):
        raise TypeError(f"{name}: expected a real number or a float tensor, got bool")
    if isinstance(x, int | float):
        x = torch.tensor(float(x), dtype=torch.float64)
    return _param(name, x)


def check_ssm(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    A: object,
    dt: object,
    D: object,
    discretization: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, str, torch.Size]:
    """Validate the LTI SSM's operands; return ``delta [T, D or 1]`` (the step ``dt`` on
    every token), ``A [D or 1, N]``, ``D``, the discretization and the batch shape.

    ``A``: ``[D, N]`` or ``[N]`` (shared by the channels); ``dt``: a positive number or a
    tensor ``[D]`` (or ``[1]``) of steps per channel.
    """
    _, T, N, Dv = check_qkv(q, k, v, True)
    a = _param("A", A)
    if a.dim() == 1:
        a = a.unsqueeze(0)
    if a.dim() != 2 or a.shape[-1] != N or a.shape[0] not in (Dv, 1):
        raise ValueError(f"A: expected shape [D={Dv}, N={N}] or [N], got {tuple(a.shape)}")
    step = _scalar_tensor("dt", dt, q)
    if step.dim() == 0:
        step = step.reshape(1)
    if step.dim() != 1 or step.shape[0] not in (Dv, 1):
        raise ValueError(
            f"dt: expected a number or shape [D={Dv}] (or [1]), got {tuple(step.shape)}"
        )
    if bool((step <= 0).any()):
        raise ValueError("dt: expected a step size > 0, found a value <= 0")
    delta = step.unsqueeze(0).expand(T, step.shape[0])
    dl, a, d, disc, batch = check_selective(q, k, v, delta, a, D, discretization)
    return dl, a, d, disc, batch


# --- discretization -----------------------------------------------------------------------


def phi1(x: torch.Tensor) -> torch.Tensor:
    """``expm1(x) / x`` (1 at 0), accurate to a few ulps for every ``x <= 0`` (the Taylor
    polynomial ``1 + x/2`` where ``|x| < 2^-30``, else ``expm1(x) / x``)."""
    small = x.abs() < _PHI_SMALL
    safe = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1 + x / 2, torch.expm1(safe) / safe)


def discretize(
    delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, discretization: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-gates ``delta A`` and ``B_bar`` as ``[..., T, D, N]`` from ``delta [..., T,
    D]``, ``A [D, N]``, ``B [..., T, N]`` (broadcasting): ``B_bar = delta B`` (euler) or
    ``expm1(delta A) / (delta A) * delta B`` (zoh, :func:`phi1` keeps small arguments
    accurate)."""
    L = delta.unsqueeze(-1) * A
    if discretization == "euler":
        Bbar = delta.unsqueeze(-1) * B.unsqueeze(-2)
    else:
        Bbar = (phi1(L) * delta.unsqueeze(-1)) * B.unsqueeze(-2)
    return L, Bbar


# --- selective scan -----------------------------------------------------------------------


def _carried(
    state: object, cls: type, kind: str, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor | None:
    """The carried state's ``h`` (a ``cls`` with ``h`` of ``shape`` and ``dtype``), or None."""
    if state is None:
        return None
    check_state(state, cls, kind, dtype, h=shape)
    return state.h  # type: ignore[attr-defined,no-any-return]


def selective_scan_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    delta: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None = None,
    discretization: str = "euler",
    causal: bool = True,
    chunk_size: int = DEFAULT_CHUNK,
    state: SelectiveScanState | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, SelectiveScanState]:
    """Mamba-1's selective scan in the q, k, v frame (``q = C``, ``k = B``, ``v = u``).

    ``y_t[d] = sum_{s<=t} sum_n C_t[n] exp(sum_{r=s+1..t} delta_r[d] A[d,n]) B_bar_s[d,n]
    u_s[d] + D[d] u_t[d]``, i.e. the recurrence ``h_t = exp(delta_t A) h_{t-1} + B_bar_t
    u_t``, ``y_t = C_t . h_t + D u_t`` per channel d: gated linear attention per channel
    (``q = C``, ``k = B_bar[:, d, :]``, ``v = u[:, d]``, log-gates ``delta[:, d] A[d, :]``,
    scale 1), computed by :func:`~attnprec.attention.gated_linear_attention` on that batch.

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``C [..., T, N]``, ``B [..., T, N]``, ``u [..., T, D]``, one float dtype
        (float16/bfloat16 computed in float32, returned in the input dtype).
    delta : torch.Tensor
        Step sizes ``> 0``, ``[..., T, D]`` (or ``[..., T, 1]``, shared by the channels);
        batch dims broadcast with q, k, v. Any float dtype (converted to the compute dtype).
    A : torch.Tensor
        ``[D, N]`` (or ``[1, N]``), real and ``< 0``.
    D : torch.Tensor, optional
        Skip ``[D]`` (or ``[1]``): adds ``D u_t``.
    discretization : {"euler", "zoh"}
        ``B_bar = delta B`` (Mamba's reference and its default) or the zero-order hold
        ``(exp(delta A) - 1) / (delta A) delta B``; ``A_bar = exp(delta A)`` in both.
    causal : bool
        Must be True (the method is causal only).
    chunk_size : int
        Tokens per chunk of the gated computation (only the rounding depends on it).
    state : SelectiveScanState, optional
        The state after the preceding tokens (one token per call is the recurrence).
    return_state : bool
        Also return the state after the last token.

    Returns
    -------
    torch.Tensor or (torch.Tensor, SelectiveScanState)
        ``[..., T, D]`` in q's dtype, and the state ``h [..., D, N]`` (compute dtype).

    Raises
    ------
    ValueError, TypeError
        Bad shapes, dtypes, ``delta <= 0``, ``A >= 0``, non-finite parameters, an unknown
        discretization, ``causal=False``, a state of the wrong shape (each naming it).

    Notes
    -----
    Error: within ``attention_error_bound("selective_scan", ..., Precision(fmt, compute=c,
    accumulate=c, block=chunk_size))`` of the exact output, ``c`` the compute dtype (the
    gated computation's decays are sums of the log-gates of each span; docs/bounds/ssm.md).
    """
    check_bool("return_state", return_state)
    check_causal_only("the selective scan", causal)
    dl, a, d, disc, batch = check_selective(q, k, v, delta, A, D, discretization)
    chunk_size = check_chunk_size(chunk_size)
    cd = compute_dtype(q)
    T, N = q.shape[-2:]
    Dv = v.shape[-1]
    h = _carried(state, SelectiveScanState, "a SelectiveScanState", cd, (*batch, Dv, N))
    if T == 0:
        return empty_result(q, k, v, q.dtype, state, return_state, batch)  # type: ignore[return-value]
    qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
    L, Bbar = discretize(dl.to(cd), a.to(cd), kc, disc)
    shape = (*batch, T, Dv, N)
    y, h = gated_per_column(
        qc, Bbar.expand(shape), vc.expand(*batch, T, Dv), L.expand(shape), chunk_size, h
    )
    if d is not None:
        y = y + d.to(cd) * vc
    y = y.to(q.dtype)
    return (y, SelectiveScanState(h)) if return_state else y


def selective_scan_log(
    q: Any,
    k: Any,
    v: Any,
    *,
    delta: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None = None,
    discretization: str = "euler",
    state: Any = None,
    return_state: bool = False,
) -> Any:
    """The selective scan in signed log space: every state ``h_t[d, n]`` a
    :class:`~attnprec.lognum.SignedLog` (no complex numbers), scanned by
    :func:`attnprec.lognum.linear_recurrence`.

    ``log A_bar = delta A`` is formed in float64 and never exponentiated, ``B_bar u`` is a
    signed product of logs, and ``y_t = sum_n C_t[n] h_t[., n] + D u_t`` a signed log-space
    sum: states far outside the float range (``exp(+-10^4)``), inputs of any sign and
    exact zeros are represented without overflow, underflow or cancellation to a wrong
    sign.

    Parameters
    ----------
    q, k, v : torch.Tensor or SignedLog
        ``C [..., T, N]``, ``B [..., T, N]``, ``u [..., T, D]``: float tensors or
        :class:`SignedLog` values (magnitudes beyond the float range).
    delta, A, D, discretization
        As in :func:`selective_scan_attention` (float tensors).
    state : SignedLog, optional
        ``h [..., D, N]`` after the preceding tokens.
    return_state : bool
        Also return the state after the last token (a SignedLog ``[..., D, N]``).

    Returns
    -------
    torch.Tensor or SignedLog (and the state)
        ``[..., T, D]``: a SignedLog when any of q, k, v is one, else a float tensor in q's
        dtype (values beyond its range overflow as float arithmetic would).

    Notes
    -----
    Error (float64 inside, ``u = 2^-53``): every term ``C_t[n] exp(sum delta A) B_bar_s u_s``
    reaches ``y_t`` through the scan's ``ceil(log2 T) + 3`` levels
    (:func:`attnprec.lognum.linear_recurrence`), the formation of ``log|B_bar u|`` (three
    logs, two additions), the product with ``C`` and at most ``N + 1`` signed additions,
    each moving its log by at most ``u (4 Lambda + 4)`` with ``Lambda`` the largest
    magnitude of a log on the way (``sum_r |delta_r A|`` plus the largest ``|log|B_bar u||``,
    ``|log|C||``, ``|log|D u||`` and ``1``). Hence, with ``kappa = (ceil(log2 T) + N + 12) u
    (4 Lambda + 4)``,

    ``|y^_t - y_t| <= expm1(kappa) (sum_n |C_t[n]| T_t[n] + |D u_t|) + u_out |y^_t| +
    eta_out``,

    ``T_t`` the recurrence on absolute values and ``u_out``, ``eta_out`` the float output's
    unit roundoff and half its smallest subnormal (none for a SignedLog output). Measured
    against the complex-log recipe in docs/benchmarks.md.
    """
    check_bool("return_state", return_state)
    from attnprec.lognum import SignedLog, linear_recurrence

    signed = any(isinstance(x, SignedLog) for x in (q, k, v))

    def as_log(name: str, x: Any) -> SignedLog:
        if isinstance(x, SignedLog):
            return x
        return SignedLog.from_float(check_float(name, x).to(torch.float64))

    def dense(name: str, x: Any) -> torch.Tensor:
        # shapes and dtypes are checked on stand-ins of the same shape
        if isinstance(x, SignedLog):
            return torch.zeros(x.shape, dtype=torch.float64)
        return check_float(name, x)

    qs, ks, vs = dense("q", q), dense("k", k), dense("v", v)
    dtype = torch.float64 if signed else qs.dtype
    if not signed and not (qs.dtype == ks.dtype == vs.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got {qs.dtype}, {ks.dtype}, {vs.dtype}")
    dl, a, d, disc, batch = check_selective(
        qs.double(), ks.double(), vs.double(), delta, A, D, discretization
    )
    T, N = qs.shape[-2:]
    Dv = vs.shape[-1]
    Cl, Bl, ul = as_log("q", q), as_log("k", k), as_log("v", v)
    dl64, a64 = dl.to(torch.float64), a.to(torch.float64)
    L = (dl64.unsqueeze(-1) * a64).expand(*batch, T, Dv, N)  # log A_bar, exact up to 2^-53
    if disc == "euler":
        logf = torch.log(dl64).unsqueeze(-1).expand(*batch, T, Dv, N)
    else:
        logf = torch.log(phi1(L) * dl64.unsqueeze(-1))
    # B_bar u = f B u with f = delta (euler) or expm1(delta A) / A (zoh), f > 0
    Bu = SignedLog(logf) * Bl.unsqueeze(-2) * ul.unsqueeze(-1)  # [..., T, D, N]
    Bu = Bu.expand(*batch, T, Dv, N)
    if state is not None:
        if not isinstance(state, SignedLog):
            raise TypeError(
                f"state: expected a SignedLog h [..., D, N], got {type(state).__name__}"
            )
        if tuple(state.shape) != (*batch, Dv, N):
            raise ValueError(f"state: expected shape {(*batch, Dv, N)}, got {tuple(state.shape)}")
    if T == 0:
        out: Any = empty_result(qs, ks, vs, dtype, state, return_state, batch)
        if not signed:
            return out
        return (SignedLog.from_float(out[0]), state) if return_state else SignedLog.from_float(out)
    gate = SignedLog(L.contiguous())
    h = linear_recurrence(gate, Bu, state, dim=-3)
    assert isinstance(h, SignedLog)
    y = (Cl.unsqueeze(-2) * h).sum(-1)  # [..., T, D]
    if d is not None:
        y = y + SignedLog.from_float(d.to(torch.float64)) * ul
    res: Any = y if signed else y.to_float(dtype)
    if return_state:
        return res, h[..., -1, :, :]
    return res


# --- SSD ----------------------------------------------------------------------------------


def _ssd_chunk(
    C: torch.Tensor,
    Bd: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    h: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of c tokens: ``C, Bd = dt B [.., c, N]``, ``x [.., c, P]``, log-gates ``a =
    A dt [.., c]``, the state ``h [.., N, P]`` before it. Returns the outputs and the state
    after it.

    The segment sums ``seg[t, s] = sum_{r=s+1..t} a_r`` are cumulative sums over t of
    ``a_t [t > s]`` (each over its own span, no prefix differences); ``exp(-inf) = 0``.
    """
    c = a.shape[-1]
    dev = a.device
    zero = torch.zeros((), dtype=a.dtype, device=dev)
    below, lower = lower_mask(c, -1, dev), lower_mask(c, device=dev)
    seg = torch.where(below, a.unsqueeze(-1), zero).cumsum(-2)  # [.., t, s]
    Lmat = torch.where(lower, torch.exp(seg), zero)
    w = (C @ Bd.transpose(-1, -2)) * Lmat
    w = torch.where(lower, w, zero)  # a NaN in a later key stays out of earlier rows
    y = w @ x
    head = a.cumsum(-1)  # sum_{r <= t}: the decay of the carried state
    inc = a.flip(-1).cumsum(-1).flip(-1)  # sum_{r >= s}
    tail = torch.cat([inc[..., 1:], torch.zeros_like(inc[..., :1])], dim=-1)  # r > s
    h_new = (Bd * torch.exp(tail).unsqueeze(-1)).transpose(-1, -2) @ x
    if h is not None:
        y = y + (C * torch.exp(head).unsqueeze(-1)) @ h
        h_new = h_new + torch.exp(head[..., -1]).unsqueeze(-1).unsqueeze(-1) * h
    return y, h_new


#: The forms of :func:`ssd_attention`.
SSD_FORMS = ("chunked", "quadratic")


def ssd_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    dt: torch.Tensor,
    A: Any,
    D: Any = None,
    causal: bool = True,
    chunk_size: int = DEFAULT_CHUNK,
    form: str = "chunked",
    state: SSDState | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, SSDState]:
    """Mamba-2's state-space dual (SSD) in the q, k, v frame (``q = C``, ``k = B``, ``v = x``).

    ``y_t = sum_{s<=t} (C_t . B_s) exp(A sum_{r=s+1..t} dt_r) dt_s x_s + D x_t``: gated
    linear attention with scalar gates ``log g_t = A dt_t``, ``k = dt B``, scale 1.

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``C [..., T, N]``, ``B [..., T, N]``, ``x [..., T, P]``, one float dtype
        (float16/bfloat16 computed in float32, returned in the input dtype).
    dt : torch.Tensor
        Steps ``> 0``, ``[..., T]`` (batch dims broadcast with q, k, v).
    A : float or torch.Tensor
        ``< 0``, one scalar per head: a number or a tensor broadcastable to the batch dims
        (``[H]`` for batch ``[B, H]``).
    D : float or torch.Tensor, optional
        Skip, broadcastable to ``[..., P]`` (a scalar per head is ``[H, 1]``).
    causal : bool
        Must be True.
    chunk_size : int
        Tokens per chunk of the chunked form.
    form : {"chunked", "quadratic"}
        ``"chunked"``: inside each chunk the quadratic form with the segment sums of the
        chunk, states passed between chunks (Mamba-2's algorithm, O(T c (N + P)));
        ``"quadratic"``: the attention form ``y = (L o C B^T) (dt x)`` over the whole
        sequence (one chunk, O(T^2 (N + P))). Only the rounding differs.
    state : SSDState, optional
        The state ``h [..., N, P]`` after the preceding tokens.
    return_state : bool
        Also return the state after the last token.

    Returns
    -------
    torch.Tensor or (torch.Tensor, SSDState)
        ``[..., T, P]`` in q's dtype (and the state, in the compute dtype).

    Raises
    ------
    ValueError, TypeError
        Bad shapes, dtypes, ``dt <= 0``, ``A >= 0``, an unknown form, ``causal=False``, a
        state of the wrong shape (each naming the argument).

    Notes
    -----
    Error: within ``attention_error_bound("ssd", ..., Precision(fmt, compute=c,
    accumulate=c, block=chunk))`` of the exact output (``chunk = T`` for the quadratic
    form; docs/bounds/ssm.md).
    """
    check_bool("return_state", return_state)
    check_causal_only("SSD", causal)
    if form not in SSD_FORMS:
        raise ValueError(f"form: expected one of {SSD_FORMS}, got {form!r}")
    d_t, a, d, batch = check_ssd(q, k, v, dt, A, D)
    chunk_size = check_chunk_size(chunk_size)
    cd = compute_dtype(q)
    T, N = q.shape[-2:]
    P = v.shape[-1]
    h = _carried(state, SSDState, "an SSDState", cd, (*batch, N, P))
    if T == 0:
        return empty_result(q, k, v, q.dtype, state, return_state, batch)  # type: ignore[return-value]
    C = q.to(cd).expand(*batch, T, N)
    dtc = d_t.to(cd).expand(*batch, T)
    Bd = k.to(cd).expand(*batch, T, N) * dtc.unsqueeze(-1)
    x = v.to(cd).expand(*batch, T, P)
    lg = a.to(cd).unsqueeze(-1) * dtc  # [..., T]: A dt_t
    step = T if form == "quadratic" else chunk_size
    out = []
    for t0 in range(0, T, step):
        sl = slice(t0, t0 + step)
        y, h = _ssd_chunk(C[..., sl, :], Bd[..., sl, :], x[..., sl, :], lg[..., sl], h)
        out.append(y)
    y = torch.cat(out, dim=-2)
    if d is not None:
        # D broadcasts over [..., P]: its leading dims are batch dims, not tokens (a review:
        # a per-head [H, 1] met the tokens' axis, silently wrong where T = H)
        y = y + (d if d.dim() == 0 else d.unsqueeze(-2)).to(cd) * x
    y = y.to(q.dtype)
    assert h is not None
    return (y, SSDState(h)) if return_state else y


# --- LTI SSM ------------------------------------------------------------------------------

#: The forms of :func:`ssm_attention`.
SSM_FORMS = ("recurrent", "convolution", "fft")


def ssm_kernel(
    A: torch.Tensor, dt: Any, C: torch.Tensor, B: torch.Tensor, T: int, discretization: str = "zoh"
) -> torch.Tensor:
    """The convolution kernel ``K[l, d] = sum_n C[n] exp(l dt_d A[d, n]) B_bar[d, n]``,
    ``l = 0..T-1`` (``[T, D]``), of an LTI SSM with one ``C, B [N]``: then ``y_t[d] =
    sum_{l<=t} K[l, d] u_{t-l}[d]`` (S4D-real). Float64 for float64 inputs, else float32."""
    a = A if A.dim() == 2 else A.unsqueeze(0)
    step = torch.as_tensor(dt, dtype=a.dtype).reshape(-1)
    cd = compute_dtype(C)
    L, Bbar = discretize(step.to(cd).unsqueeze(0), a.to(cd), B.to(cd).unsqueeze(0), discretization)
    ell = torch.arange(T, dtype=cd).reshape(T, 1, 1)
    return (C.to(cd) * torch.exp(ell * L[0]) * Bbar[0]).sum(-1)


def ssm_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    A: torch.Tensor,
    dt: Any,
    D: torch.Tensor | None = None,
    discretization: str = "zoh",
    causal: bool = True,
    form: str = "recurrent",
    chunk_size: int = DEFAULT_CHUNK,
    state: SelectiveScanState | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, SelectiveScanState]:
    """A linear time-invariant SSM (S4D-real) in the q, k, v frame.

    The dynamics are fixed: ``h_t = exp(dt A) h_{t-1} + B_bar_t u_t`` with one step ``dt``
    for every token, ``y_t = C_t . h_t + D u_t``, i.e. the selective scan with
    ``delta_t = dt``. The LTI SSM of S4/S4D has one ``C, B [N]``: pass them expanded over
    the tokens, ``q = C.expand(T, N)``, ``k = B.expand(T, N)``; its output is then the
    causal convolution ``y_t[d] = sum_{l<=t} K[l, d] u_{t-l}[d] + D u_t`` with the kernel
    :func:`ssm_kernel`. Per-token ``q, k`` are allowed (the dynamics stay time-invariant):
    the convolution then runs per state, ``z_t[d, n] = sum_{l<=t} exp(l dt A[d, n])
    B_bar_{t-l}[d, n] u_{t-l}[d]``, ``y_t[d] = sum_n C_t[n] z_t[d, n]``.

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``C [..., T, N]``, ``B [..., T, N]``, ``u [..., T, D]``.
    A : torch.Tensor
        ``[D, N]`` or ``[N]`` (shared by the channels), real and ``< 0``.
    dt : float or torch.Tensor
        The step ``> 0``: a number, or ``[D]`` (one per channel).
    D : torch.Tensor, optional
        Skip ``[D]`` (or ``[1]``).
    discretization : {"zoh", "euler"}
        As in :func:`selective_scan_attention` (S4D's default is the zero-order hold).
    causal : bool
        Must be True.
    form : {"recurrent", "convolution", "fft"}
        The recurrence (through the chunked selective scan, ``chunk_size``), the direct
        causal convolution (a Toeplitz product, O(T^2 D), or O(T^2 D N) with per-token
        ``q, k``), or the FFT convolution (zero-padded to a power of two >= 2T, O(T log T)
        per channel or per state).
    chunk_size : int
        Tokens per chunk of the recurrent form.
    state : SelectiveScanState, optional
        ``h [..., D, N]`` after the preceding tokens.
    return_state : bool
        Also return the state after the last token.

    Returns
    -------
    torch.Tensor or (torch.Tensor, SelectiveScanState)
        ``[..., T, D]`` in q's dtype (and the state, compute dtype).

    Raises
    ------
    ValueError, TypeError
        Bad shapes or dtypes, ``dt <= 0``, ``A >= 0``, an unknown form or discretization,
        ``causal=False``, a bad state (each naming the argument).

    Notes
    -----
    Error: the recurrent and convolution forms are within ``attention_error_bound("ssm",
    ...)`` (the selective scan's bound with ``delta = dt``); the FFT form adds the FFT
    convolution bound of docs/methods/ssm.md.
    """
    check_bool("return_state", return_state)
    check_causal_only("the SSM", causal)
    if form not in SSM_FORMS:
        raise ValueError(f"form: expected one of {SSM_FORMS}, got {form!r}")
    dl, a, d, disc, batch = check_ssm(q, k, v, A, dt, D, discretization)
    if form == "recurrent":
        return selective_scan_attention(
            q, k, v, delta=dl, A=a, D=d, discretization=disc, chunk_size=chunk_size,
            state=state, return_state=return_state,
        )  # fmt: skip
    check_chunk_size(chunk_size)
    cd = compute_dtype(q)
    T, N = q.shape[-2:]
    Dv = v.shape[-1]
    h0 = _carried(state, SelectiveScanState, "a SelectiveScanState", cd, (*batch, Dv, N))
    if T == 0:
        return empty_result(q, k, v, q.dtype, state, return_state, batch)  # type: ignore[return-value]
    step = dl[0].to(cd)  # [D or 1]
    ac = a.to(cd)
    qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
    L1, Bbar = discretize(step.unsqueeze(0), ac, kc, disc)  # [1, D', N], [..., T, D', N]
    L1 = L1[0].expand(Dv, N)
    Bbar = Bbar.expand(*batch, T, Dv, N)
    ell = torch.arange(T, dtype=cd, device=q.device)
    decay = torch.exp(ell.reshape(T, 1, 1) * L1)  # exp(l dt A) [T, D, N]
    lti = bool((qc == qc[..., :1, :]).all()) and bool((kc == kc[..., :1, :]).all())
    uu = vc.expand(*batch, T, Dv)
    if lti:
        K = (qc[..., :1, :].unsqueeze(-2) * decay * Bbar[..., :1, :, :]).sum(-1)  # [.., T, D]
        y = _causal_conv(K, uu, form)
    else:
        w = Bbar * uu.unsqueeze(-1)  # [..., T, D, N]
        z = _causal_conv(decay.expand(*batch, T, Dv, N).flatten(-2), w.flatten(-2), form)
        y = (qc.unsqueeze(-2) * z.unflatten(-1, (Dv, N))).sum(-1)
    # the state after the last token: h_T = sum_s exp((T-1-s) dt A) B_bar_s u_s (+ carried)
    wl = Bbar * uu.unsqueeze(-1)
    h = (decay.flip(0) * wl).sum(-3)
    if h0 is not None:
        carried = torch.exp((ell.reshape(T, 1, 1) + 1) * L1)  # exp((t+1) dt A)
        y = y + (qc.unsqueeze(-2) * carried * h0.unsqueeze(-3)).sum(-1)
        h = h + torch.exp(T * L1) * h0
    if d is not None:
        y = y + d.to(cd) * uu
    y = y.to(q.dtype)
    return (y, SelectiveScanState(h)) if return_state else y


def _causal_conv(kernel: torch.Tensor, x: torch.Tensor, form: str) -> torch.Tensor:
    """``y_t = sum_{l<=t} kernel[l] x_{t-l}`` along dim -2 (``kernel [..., T, c]`` or
    ``[T, c]``, ``x [..., T, c]``): a Toeplitz product or an FFT of length ``2^k >= 2T``."""
    T = x.shape[-2]
    if form == "convolution":
        i = torch.arange(T, device=x.device)
        lag = (i.unsqueeze(-1) - i).clamp_min(0)  # [t, s] -> t - s
        kt = kernel.movedim(-1, -2)[..., lag]  # [..., c, t, s]
        kt = torch.where(lower_mask(T, device=x.device), kt, torch.zeros((), dtype=kt.dtype))
        return (kt @ x.movedim(-1, -2).unsqueeze(-1)).squeeze(-1).movedim(-1, -2)
    n = 1 << max(1, math.ceil(math.log2(2 * T)))
    fk = torch.fft.rfft(kernel, n=n, dim=-2)
    fx = torch.fft.rfft(x, n=n, dim=-2)
    return torch.fft.irfft(fk * fx, n=n, dim=-2)[..., :T, :]
