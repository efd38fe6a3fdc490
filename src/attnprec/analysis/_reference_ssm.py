"""Certified references of the state-space methods (``selective_scan``, ``ssd``, ``ssm``).

Each runs the method's recurrence in ball arithmetic (python-flint ``arb`` or
``mpmath.iv``, :mod:`._reference_ball`) on the inputs as given: the log-gates ``delta A``
(``A dt``), ``exp`` of them, zoh's ``expm1(delta A) / A`` and ``B_bar`` are balls computed
from the exact floats, never float64 values taken as exact (a product of two floats needs
106 bits, an exponential infinitely many). The state is a ball per (channel, state) and the
output ``C_t . h_t + D u_t`` a ball per element; the working precision starts at 128 bits
and doubles (to 1024) until every output's radius is at most ``2^-60`` of its magnitude
(past that the radius is still certified, only wider). ``value`` is the float64 nearest
the midpoint of the output ball and ``radius`` covers the ball and that conversion.

Why not ``reference("gated", ...)`` on the reduced problem (per channel ``q = C``, ``k =
B_bar``, ``v = u``, log-gates ``delta A``): it takes its log-gates and keys as exact floats,
which ``delta A`` and ``B_bar`` are not; the reduction is checked against it in the tests on
inputs where they are (powers of two). Both run through the same driver,
:func:`._reference_ball.recurrence` (one token per step here, chunks for gated).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from mpmath import iv

from attnprec import _progress as progress
from attnprec._validate import check_causal_only
from attnprec.analysis import _reference_ball as ball
from attnprec.analysis import _reference_float64 as f64
from attnprec.analysis.reference import Reference, _nan_mask, _nan_to_zero, uncertified

__all__ = ["selective_scan_reference", "ssd_reference", "ssm_reference"]

_U = 2.0**-53
_UD = _U * (1 + 2 * _U)  # u / (1 - u), rounded up


#: ``"auto"`` takes the float64 balls when batch x tokens x state entries exceeds this
#: (the ball backends cost about a microsecond per entry and step).
AUTO_FLOAT64_STATES = 2**22
#: Inflation of a radius computed in float64 from a few (<= 7) roundings of nonnegative
#: numbers, and the absolute loss of an operation below the normal range.
_UPF = 1 + 8 * 2.0**-53
_TINY = 2.0**-1074


def _expm1(be: ball._Backend, a: Any) -> Any:
    if be.name == "arb":
        return np.frompyfunc(lambda x: x.expm1(), 1, 1)(a)
    if be.name == "float64":
        return _expm1_64(a)
    return np.frompyfunc(iv.expm1, 1, 1)(a)


def _expm1_64(x: _Ball64) -> _Ball64:
    """``expm1`` of float64 balls: ``exp(x) - 1`` where ``|x| > 2^-6`` (absolute error
    ~E_REL, relative to ``|expm1| >= 0.015``), else its series ``x (1 + x/2 (1 + x/3 (...
    (1 + x/8))))`` in ball arithmetic plus the remainder ``|x|^9 / 9! e^{|x|}`` (relative
    5e-18 at 2^-6): zoh's ``expm1(dt A) / A`` keeps its relative accuracy for small steps."""
    top = np.abs(x.mid) + x.rad
    p = 1 + x / 8.0
    for k in (7.0, 6.0, 5.0, 4.0, 3.0, 2.0):
        p = 1 + (x / k) * p
    ser = x * p
    with np.errstate(over="ignore"):
        rem = top**9 / 362880.0 * 1.02 * _UPF + _TINY
    ser = _Ball64(ser.mid, (ser.rad + rem) * _UPF)
    big = _exp64(x) + (-1.0)
    small = top <= 2.0**-6
    return _Ball64(np.where(small, ser.mid, big.mid), np.where(small, ser.rad, big.rad))


class _Ball64:
    """Arrays of float64 balls ``|exact - mid| <= rad`` (numpy, broadcasting as the object
    arrays of the ball backends do): each operation rounds ``mid`` once and adds that
    rounding, ``u/(1-u) |mid|`` plus ``2^-1074`` below the normal range, to the radius
    propagated from the operands; the radius itself is evaluated on nonnegative numbers
    and raised by ``_UPF`` (and ``2^-1074`` per product that may underflow). Assumptions:
    IEEE float64 arithmetic (numpy) and torch's exp (:mod:`._reference_float64`, 2)."""

    __slots__ = ("mid", "rad")

    def __init__(self, mid: Any, rad: Any = None) -> None:
        self.mid = np.asarray(mid, dtype=np.float64)
        self.rad = np.zeros_like(self.mid) if rad is None else np.asarray(rad, dtype=np.float64)

    @staticmethod
    def lift(x: Any) -> _Ball64:
        return x if isinstance(x, _Ball64) else _Ball64(x)

    def __getitem__(self, idx: Any) -> _Ball64:
        return _Ball64(self.mid[idx], self.rad[idx])

    def __neg__(self) -> _Ball64:
        return _Ball64(-self.mid, self.rad)

    def __add__(self, other: Any) -> _Ball64:
        o = _Ball64.lift(other)
        m = self.mid + o.mid  # (sums below the normal range are exact)
        return _Ball64(m, (self.rad + o.rad + _UD * np.abs(m)) * _UPF + _TINY)

    __radd__ = __add__

    def __sub__(self, other: Any) -> _Ball64:
        return self + (-_Ball64.lift(other))

    def __mul__(self, other: Any) -> _Ball64:
        o = _Ball64.lift(other)
        m = self.mid * o.mid
        am, ao = np.abs(self.mid), np.abs(o.mid)
        with np.errstate(invalid="ignore"):
            r = am * o.rad + ao * self.rad + self.rad * o.rad
        if np.isnan(r).any():  # 0 inf: a point times an unbounded ball (NaN stays NaN)
            r = _times(am, o.rad) + _times(ao, self.rad) + _times(self.rad, o.rad)
        return _Ball64(m, (r + _UD * np.abs(m)) * _UPF + 4 * _TINY)

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> _Ball64:
        """``|a/b - ma/mb| <= (ra + |ma/mb| rb) / (|mb| - rb)``; inf where ``b`` may be 0."""
        o = _Ball64.lift(other)
        m = self.mid / o.mid
        den = (np.abs(o.mid) - o.rad) * (1 - 4 * _U)
        qa = np.abs(m) * (1 + 2 * _U) + _TINY  # >= |ma / mb|
        with np.errstate(divide="ignore", invalid="ignore"):
            r = ((self.rad + qa * o.rad) / den * _UPF + _UD * np.abs(m)) * _UPF + 4 * _TINY
        return _Ball64(m, np.where(den > 0, r, np.inf))

    def sum(self, axis: int) -> _Ball64:
        """Any order (numpy's pairwise): within ``gamma_n`` of the sum of the mids,
        relative to the sum of their magnitudes."""
        n = self.mid.shape[axis]
        g = n * _U / (1 - n * _U) * (1 + 4 * _U) if n else 0.0
        m = self.mid.sum(axis=axis)
        r = self.rad.sum(axis=axis) * (1 + g) + g * (1 + g) * np.abs(self.mid).sum(axis=axis)
        return _Ball64(m, r * _UPF + n * _TINY)


class _F64Backend(ball._Backend):
    """The ball interface of :func:`certify`'s setups on :class:`_Ball64`: one pass at
    float64 (no precision to raise; the radius is certified either way)."""

    name = "float64"

    def num(self, x: float) -> _Ball64:
        return _Ball64(float(x))

    def arr(self, a: np.ndarray) -> _Ball64:  # type: ignore[override]
        return _Ball64(np.array(a, dtype=np.float64))

    def exp(self, a: Any) -> _Ball64:  # type: ignore[override]
        return _exp64(_Ball64.lift(a))


def _times(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a b`` of nonnegative radius terms with ``0 inf = 0``: a point (radius 0, or a
    midpoint 0) times any ball contributes nothing to the radius; NaN stays NaN."""
    with np.errstate(invalid="ignore"):
        return np.where((a == 0) | (b == 0), 0.0, a * b)


def _up(e: np.ndarray) -> np.ndarray:
    """An upper bound of ``exp(x)`` from torch's ``e = fl(exp(x))`` (E_REL relative,
    EXP_TINY absolute)."""
    return (e + f64.EXP_TINY) / (1 - f64.E_REL) * _UPF


def _exp(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).exp().numpy()


def _exp64(a: _Ball64) -> _Ball64:
    """``e = fl(exp(mid))`` (torch's, within E_REL relative and EXP_TINY absolute):
    ``|exp(x) - e| <= eu (expm1(rad) + E_REL) + EXP_TINY`` for ``|x - mid| <= rad``,
    ``eu >= exp(mid)``, with ``expm1(r) <= r e^r``; and ``<= max(e, exp(mid + rad))``
    (``exp(x)`` and ``e`` are both in ``[0, that]``), which stays finite for a wide ball
    far below 0 (a log-gate of ``-1e19`` with a radius past 709 was ``(0, inf)``)."""
    e = _exp(a.mid)
    eu, er_up = _up(e), _up(_exp(a.rad))
    with np.errstate(invalid="ignore"):
        r = (eu * (a.rad * er_up * _UPF + f64.E_REL) + f64.EXP_TINY) * _UPF + _TINY
    r = np.where(np.isnan(r), np.inf, r)
    if not bool((r <= eu).all()):  # wide balls only (rare): the bound by the top end
        top = np.maximum(eu, _up(_exp(np.nextafter(a.mid + a.rad, np.inf))))
        r = np.fmin(r, top)
    return _Ball64(e, r)


def _backend(backend: str, method: str, work: int = 0) -> type[ball._Backend]:
    if backend == "auto":
        backend = (
            "float64" if work > AUTO_FLOAT64_STATES else "arb" if ball.HAVE_FLINT else "mpmath"
        )
    if backend == "arb" and not ball.HAVE_FLINT:
        raise ValueError("backend: 'arb' needs python-flint (pip install python-flint)")
    if backend == "float64":
        return _F64Backend
    if backend not in ball.BACKENDS:
        raise ValueError(
            f"backend: expected one of ('auto', 'arb', 'mpmath', 'float64'), got {backend!r}"
        )
    return ball.BACKENDS[backend]


def _common(method: str, causal: Any, scale: Any) -> None:
    if causal is not None:
        check_causal_only(f"method {method!r}", causal)
    if scale is not None:
        raise ValueError(f"scale: method {method!r} has no scale; pass scale=None")


def _no_inf(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Infinite inputs have no finite exact output to certify (NaN propagates)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if bool(torch.isinf(x).any()):
            raise ValueError(f"{name}: expected finite values (NaN propagates), found inf")


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to("cpu", torch.float64)


def _flat(x: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """``x`` broadcast to ``shape`` as float64, NaN -> 0 (masked afterwards), flattened over
    the batch dims (all but the last two)."""
    return _nan_to_zero(x.detach().cpu()).expand(shape).reshape(-1, *shape[-2:]).numpy()


#: ``setup(be, q, k, v, items) -> step``, given ``q, k, v`` flattened over the batch by
#: :func:`_flat` and taken at ``items`` (indices into the flattened batch, or
#: ``slice(None)``; ``[nb, T, d]`` float64 arrays): the parameters of those items as balls
#: of ``be``'s precision, and ``step(t, h, emit) -> (h, y_t)`` the recurrence's token t from
#: the state ``h`` (None before the first), with the output ``y_t [nb, d_v]`` when ``emit``
#: (else None).
Setup = Callable[..., Callable[[int, Any, bool], tuple[Any, Any]]]


def certify(
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: Any,
    backend: str,
    rows: Any,
    setup: Setup,
    state: int,
) -> Reference:
    """The reference of a causal recurrence: ``setup`` (see :data:`Setup`; the parameters
    flattened over ``batch`` by :func:`_flat` too) run up to the last row asked
    at increasing precision until the outputs of those rows settle, NaN where a NaN input
    reaches (row t through ``q_t`` or a ``k_s``, column e through a ``v_s[e]``, ``s <= t``).
    Every output ball is certified (module docstring): ``|exact - value| <= radius``.
    ``state``: the state's entries per batch item (``"auto"``'s choice); the float64
    backend runs the same setup once on :class:`_Ball64`, then :func:`_repair` redoes
    the items it leaves loose with a ball backend."""
    from attnprec.analysis.bounds.attention import sample_rows

    T, d_v = q.shape[-2], v.shape[-1]
    be_cls = _backend(backend, method, math.prod(batch) * T * state)
    _no_inf(q, k, v)
    idx = sample_rows(T, rows)
    n_rows = T if idx is None else int(idx.numel())
    vals = rads = np.zeros((math.prod(batch), n_rows, d_v))
    left = np.zeros(math.prod(batch), dtype=bool)  # items whose float64 result stands
    if vals.size:  # run to the last row asked at increasing precision until they settle
        want = np.zeros(T, dtype=bool)
        want[slice(None) if idx is None else idx.numpy()] = True
        qf, kf, vf = (_flat(x, (*batch, *x.shape[-2:])) for x in (q, k, v))

        def tokens(items: Any) -> Callable[[ball._Backend], ball.Step]:
            def make(be: ball._Backend) -> ball.Step:  # one token per step
                step = setup(be, qf[items], kf[items], vf[items], items)

                def run(lo: int, hi: int, h: Any, emit: np.ndarray) -> tuple[Any, Any]:
                    h, y = step(lo, h, bool(emit[0]))
                    return h, None if y is None else y[:, None]

                return run

            return make

        if be_cls is _F64Backend:
            step, h, ys = setup(_F64Backend(53), qf, kf, vf, slice(None)), None, []
            last = int(np.flatnonzero(want)[-1]) + 1
            with np.errstate(over="ignore", invalid="ignore"):  # (_repair's business)
                for t in range(last):
                    h, y = step(t, h, bool(want[t]))
                    if y is not None:
                        ys.append(y)
                    progress.rows(t + 1, last)
            vals = np.stack([y.mid for y in ys], 1)
            rads = np.where(np.isfinite(vals), np.stack([y.rad for y in ys], 1), np.inf)
            vals, rads, left = _repair(vals, rads, want, state, tokens)
        else:
            vals, rads = ball.recurrence(be_cls, want, tokens(slice(None)))
    nan = _nan_mask(q.cpu(), k.cpu(), v.cpu(), True, (), None).expand(*batch, T, d_v)
    if idx is not None:
        nan = nan[..., idx, :]
    shape = (*batch, n_rows, d_v)
    left_t = torch.from_numpy(left)[:, None, None]
    val, rad = uncertified(torch.from_numpy(vals), torch.from_numpy(rads), left_t)
    val = val.reshape(shape).masked_fill(nan, math.nan)
    rad = rad.reshape(shape).masked_fill(nan, math.nan)
    return Reference(val.to(q.device), rad.to(q.device), be_cls.name, idx)


def _repair(
    vals: np.ndarray,
    rads: np.ndarray,
    want: np.ndarray,
    state: int,
    tokens: Callable[[Any], Callable[[ball._Backend], ball.Step]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The float64 balls' results ``[nb, rows, d_v]`` with the batch items they leave loose
    redone by a ball backend (``tokens(items)``: :func:`certify`'s setup of those items):
    a radius above ``FLOAT64_REPAIR_REL`` of its row's largest ``|value|``, or not finite
    (a state past float64's range whose output is not: a review's outputs of 1e280 came
    back NaN; a log-gate past it; zoh's ``expm1(delta A) / A`` with ``delta A`` below the
    normal range, a radius 1e18 times the output; outputs that cancel). Items are taken in
    order while their tokens times state entries stay within ``AUTO_FLOAT64_STATES`` (arb;
    a 64th of it for mpmath); the ball result replaces the float64 one where its radius is
    smaller or that one is infinite. Also returns the items not redone ``[nb]`` (what stays
    non-finite there: :func:`.reference.uncertified`)."""
    from attnprec.analysis.reference import FLOAT64_REPAIR_REL

    top = np.abs(np.nan_to_num(vals, nan=0.0, posinf=0.0, neginf=0.0)).max(-1, keepdims=True)
    loose = ~(rads <= FLOAT64_REPAIR_REL * top).all(axis=(1, 2))
    per = (int(np.flatnonzero(want)[-1]) + 1) * state
    budget = AUTO_FLOAT64_STATES // (1 if ball.HAVE_FLINT else 64)
    items = np.flatnonzero(loose)[: budget // max(per, 1)]
    if items.size:
        be = ball.BACKENDS["arb" if ball.HAVE_FLINT else "mpmath"]
        v2, r2 = ball.recurrence(be, want, tokens(items))
        take = (r2 < rads[items]) | ~np.isfinite(rads[items])
        vals[items] = np.where(take, v2, vals[items])
        rads[items] = np.where(take, r2, rads[items])
    left = np.ones(vals.shape[0], dtype=bool)
    left[items] = False
    return vals, rads, left


def selective_scan_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool | None = None,
    scale: float | None = None,
    backend: str = "auto",
    rows: Any = None,
    delta: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None = None,
    discretization: str = "euler",
) -> Reference:
    """Certified reference of the selective scan (``reference("selective_scan", ...)``).

    The exact output of :func:`attnprec.attention.selective_scan_attention` on the inputs
    as given (q = C, k = B, v = u, ``delta``, ``A``, ``D`` taken as the exact numbers they
    hold), by the recurrence in ball arithmetic (module docstring).

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``C [..., T, N]``, ``B [..., T, N]``, ``u [..., T, D]``; NaN entries give NaN in the
        outputs they reach, infinities are rejected.
    causal : bool, optional
        None or True (causal only).
    scale : None
        The method has no scale.
    backend : {"auto", "arb", "mpmath"}
    rows : int or sequence of int, optional
        Certify these rows only (the recurrence runs to the last of them); a count draws
        rows as :func:`attnprec.analysis.bounds.attention.sample_rows`.
    delta, A, D, discretization
        As in :func:`attnprec.attention.selective_scan_attention`.

    Returns
    -------
    Reference
        ``|exact - value| <= radius`` elementwise (the guarantee), ``[..., rows, D]``,
        on q's device.

    Raises
    ------
    ValueError, TypeError
        As the method (shapes, signs, dtypes), infinite inputs, a backend that cannot
        certify it, ``causal=False`` or a scale (each naming the argument).
    """
    from attnprec.attention.ssm import check_selective

    _common("selective_scan", causal, scale)
    dl, a, d, disc, batch = check_selective(q, k, v, delta, A, D, discretization)
    T, N = q.shape[-2:]
    Dv = v.shape[-1]

    def setup(be: ball._Backend, qf: Any, kf: Any, vf: Any, items: Any) -> Any:
        dlf = _flat(dl, (*batch, T, Dv))[items]
        Ab = be.arr(_f64(a).expand(Dv, N).numpy())[None]  # [1, Dv, N]
        Db = None if d is None else be.arr(_f64(d).expand(Dv).numpy())

        def step(t: int, h: Any, emit: bool) -> tuple[Any, Any]:
            dl_t = be.arr(dlf[:, t])[:, :, None]  # [nb, Dv, 1]
            L = dl_t * Ab  # exact log-gates delta A, [nb, Dv, N]
            f = dl_t if disc == "euler" else _expm1(be, L) / Ab
            w = f * be.arr(kf[:, t])[:, None, :] * be.arr(vf[:, t])[:, :, None]  # B_bar u
            h = w if h is None else be.exp(L) * h + w
            if not emit:
                return h, None
            y = (h * be.arr(qf[:, t])[:, None, :]).sum(axis=-1)
            return h, y if Db is None else y + Db[None] * be.arr(vf[:, t])

        return step

    return certify("selective_scan", q, k, v, batch, backend, rows, setup, Dv * N)


def ssm_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool | None = None,
    scale: float | None = None,
    backend: str = "auto",
    rows: Any = None,
    A: torch.Tensor,
    dt: Any,
    D: torch.Tensor | None = None,
    discretization: str = "zoh",
) -> Reference:
    """Certified reference of the LTI SSM (``reference("ssm", ...)``): the selective scan's
    reference with ``delta_t = dt`` on every token (:func:`selective_scan_reference`;
    same guarantee, parameters of :func:`attnprec.attention.ssm_attention`)."""
    from attnprec.attention.ssm import check_ssm

    _common("ssm", causal, scale)
    dl, a, d, disc, _ = check_ssm(q, k, v, A, dt, D, discretization)
    return selective_scan_reference(
        q, k, v, backend=backend, rows=rows, delta=dl, A=a, D=d, discretization=disc
    )


def ssd_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool | None = None,
    scale: float | None = None,
    backend: str = "auto",
    rows: Any = None,
    dt: torch.Tensor,
    A: Any,
    D: Any = None,
) -> Reference:
    """Certified reference of SSD (``reference("ssd", ...)``).

    The recurrence ``h_t = exp(A dt_t) h_{t-1} + (dt_t B_t) x_t^T``, ``y_t = C_t h_t +
    D x_t`` in ball arithmetic on the inputs as given (module docstring); parameters as in
    :func:`attnprec.attention.ssd_attention`, ``rows`` and the guarantee as in
    :func:`selective_scan_reference`.
    """
    from attnprec.attention.ssm import check_ssd

    _common("ssd", causal, scale)
    d_t, a, d, batch = check_ssd(q, k, v, dt, A, D)
    T, P = q.shape[-2], v.shape[-1]

    def setup(be: ball._Backend, qf: Any, kf: Any, vf: Any, items: Any) -> Any:
        dtf = _f64(d_t).expand(*batch, T).reshape(-1, T).numpy()[items]
        Ab = be.arr(_f64(a).expand(batch).reshape(-1).numpy()[items])  # [nb]
        Db = None if d is None else be.arr(_f64(d).expand(*batch, P).reshape(-1, P).numpy()[items])

        def step(t: int, h: Any, emit: bool) -> tuple[Any, Any]:
            d_step = be.arr(dtf[:, t])  # [nb]
            w = (be.arr(kf[:, t]) * d_step[:, None])[:, :, None] * be.arr(vf[:, t])[:, None, :]
            h = w if h is None else be.exp(Ab * d_step)[:, None, None] * h + w  # [nb, N, P]
            if not emit:
                return h, None
            y = (be.arr(qf[:, t])[:, :, None] * h).sum(axis=1)
            return h, y if Db is None else y + Db * be.arr(vf[:, t])

        return step

    return certify("ssd", q, k, v, batch, backend, rows, setup, q.shape[-1] * P)
