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
inputs where they are (powers of two). The recurrence is also O(T D N) ball operations per
sequence against O(T^2 N D) for the factorized gated form.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from mpmath import iv

from attnprec.analysis import _reference_ball as ball
from attnprec.analysis.reference import Reference

__all__ = ["selective_scan_reference", "ssd_reference", "ssm_reference"]


def _expm1(be: ball._Backend, a: np.ndarray) -> np.ndarray:
    if be.name == "arb":
        return np.frompyfunc(lambda x: x.expm1(), 1, 1)(a)
    return np.frompyfunc(iv.expm1, 1, 1)(a)


def _backend(backend: str, method: str) -> type[ball._Backend]:
    if backend == "auto":
        backend = "arb" if ball.HAVE_FLINT else "mpmath"
    if backend == "arb" and not ball.HAVE_FLINT:
        raise ValueError("backend: 'arb' needs python-flint (pip install python-flint)")
    if backend == "float64":
        raise ValueError(f"backend: 'float64' does not certify {method!r}; use 'arb' or 'mpmath'")
    if backend not in ball.BACKENDS:
        raise ValueError(f"backend: expected one of ('auto', 'arb', 'mpmath'), got {backend!r}")
    return ball.BACKENDS[backend]


def _common(method: str, causal: Any, scale: Any) -> None:
    if causal is not None and causal is not True:
        if not isinstance(causal, bool):
            raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
        raise ValueError(f"causal: method {method!r} is causal only (causal=False given)")
    if scale is not None:
        raise ValueError(f"scale: method {method!r} has no scale; pass scale=None")


def _no_inf(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Infinite inputs have no finite exact output to certify (NaN propagates)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if bool(torch.isinf(x).any()):
            raise ValueError(f"{name}: expected finite values (NaN propagates), found inf")


def _flat(x: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """``x`` broadcast to ``shape`` as float64, NaN -> 0 (masked afterwards), flattened over
    the batch dims (all but the last two)."""
    x = x.detach().to("cpu", torch.float64)
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x).expand(shape)
    return x.reshape(-1, *shape[-2:]).numpy()


def _nan_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Any) -> torch.Tensor:
    """Outputs ``[..., T, d_v]`` a NaN input reaches: row t through C_t or a B_s (s <= t),
    column d through u_s[d] (s <= t)."""
    qn = torch.isnan(q).any(-1).expand(*batch, q.shape[-2])
    kn = torch.isnan(k).any(-1).expand(*batch, k.shape[-2])
    vn = torch.isnan(v).expand(*batch, *v.shape[-2:])
    kseen = torch.cumsum(kn.to(torch.int64), -1) > 0
    vseen = torch.cumsum(vn.to(torch.int64), -2) > 0
    return (qn | kseen).unsqueeze(-1) | vseen


def _finish(
    vals: np.ndarray,
    rads: np.ndarray,
    nan: torch.Tensor,
    idx: torch.Tensor | None,
    shape: tuple[int, ...],
    backend: str,
    device: torch.device,
) -> Reference:
    if idx is not None:
        nan = nan[..., idx, :]
    val = torch.from_numpy(vals).reshape(shape).masked_fill(nan, math.nan)
    rad = torch.from_numpy(rads).reshape(shape).masked_fill(nan, math.nan)
    return Reference(val.to(device), rad.to(device), backend, idx)


def _convert(be: ball._Backend, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Floats of the output balls; settled when every radius <= SETTLE |value|."""
    val = np.empty(y.shape)
    rad = np.empty(y.shape)
    settled = True
    for i in np.ndindex(*y.shape):
        val[i], rad[i], rb = ball.ball_to_float(be.midrad(y[i]))
        if not rb <= ball.SETTLE * abs(val[i]):  # an exact zero has rb == 0
            settled = False
    return val, rad, settled


def _scan(
    be_cls: type[ball._Backend],
    step: Any,
    n_rows: int,
    last: int,
    want: np.ndarray,
    out_shape: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``step(be, t, h) -> (h, y_t)`` for t = 0..last at increasing precision until
    the outputs at the rows ``want`` (a bool mask over t) settle."""
    val = rad = np.zeros(out_shape)
    for prec in ball.PRECISIONS:
        with be_cls(prec) as be:
            h = None
            ys = []
            for t in range(last + 1):
                h, y = step(be, t, h, bool(want[t]))
                if want[t]:
                    ys.append(y)
            out = np.stack(ys, axis=1) if ys else np.empty((out_shape[0], 0, out_shape[2]), object)
            val, rad, settled = _convert(be, out)
        if settled:
            break
    del n_rows
    return val, rad


def _rows(n: int, rows: Any) -> tuple[torch.Tensor | None, np.ndarray, int]:
    from attnprec.analysis.bounds.attention import sample_rows

    idx = sample_rows(n, rows)
    want = np.zeros(max(n, 1), dtype=bool)
    if idx is None:
        want[:n] = True
        last = n - 1
    else:
        want[idx.numpy()] = True
        last = int(idx.max())
    return idx, want, last


def _selective(
    be_cls: type[ball._Backend],
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    delta: np.ndarray,
    A: np.ndarray,
    D: np.ndarray | None,
    disc: str,
    want: np.ndarray,
    last: int,
    n_rows: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The selective scan's recurrence in balls: q, k [nb, T, N], v, delta [nb, T, Dv],
    A [Dv, N], D [Dv]."""
    nb, _, Dv = v.shape
    cache: dict[str, Any] = {}

    def step(be: ball._Backend, t: int, h: Any, emit: bool) -> tuple[Any, Any]:
        if cache.get("prec") != be.prec:
            cache.clear()
            cache["prec"] = be.prec
            cache["A"] = be.arr(A)[None]  # [1, Dv, N]
            cache["D"] = None if D is None else be.arr(D)[None]
        Ab = cache["A"]
        dl = be.arr(delta[:, t])[:, :, None]  # [nb, Dv, 1]
        L = dl * Ab  # exact log-gates delta A
        a = be.exp(L)
        f = dl if disc == "euler" else _expm1(be, L) / Ab
        w = f * be.arr(k[:, t])[:, None, :] * be.arr(v[:, t])[:, :, None]  # B_bar u
        h = w if h is None else a * h + w
        y = None
        if emit:
            y = (h * be.arr(q[:, t])[:, None, :]).sum(axis=-1)
            if cache["D"] is not None:
                y = y + cache["D"][:, :] * be.arr(v[:, t])
        return h, y

    return _scan(be_cls, step, n_rows, last, want, (nb, n_rows, Dv))


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
    be_cls = _backend(backend, "selective_scan")
    _no_inf(q, k, v)
    T, N = q.shape[-2:]
    Dv = v.shape[-1]
    idx, want, last = _rows(T, rows)
    n_rows = T if idx is None else int(idx.numel())
    nb = math.prod(batch)
    device = q.device
    nan = _nan_rows(q.cpu(), k.cpu(), v.cpu(), batch)
    if nb == 0 or n_rows == 0 or Dv == 0:
        z = np.zeros((nb, n_rows, Dv))
        return _finish(z, z, nan, idx, (*batch, n_rows, Dv), be_cls.name, device)
    val, rad = _selective(
        be_cls,
        _flat(q, (*batch, T, N)),
        _flat(k, (*batch, T, N)),
        _flat(v, (*batch, T, Dv)),
        _flat(dl, (*batch, T, Dv)),
        a.detach().to("cpu", torch.float64).expand(Dv, N).numpy(),
        None if d is None else d.detach().to("cpu", torch.float64).expand(Dv).numpy(),
        disc,
        want,
        last,
        n_rows,
    )
    return _finish(val, rad, nan, idx, (*batch, n_rows, Dv), be_cls.name, device)


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
    be_cls = _backend(backend, "ssd")
    _no_inf(q, k, v)
    T, N = q.shape[-2:]
    P = v.shape[-1]
    idx, want, last = _rows(T, rows)
    n_rows = T if idx is None else int(idx.numel())
    nb = math.prod(batch)
    device = q.device
    nan = _nan_rows(q.cpu(), k.cpu(), v.cpu(), batch)
    shape = (*batch, n_rows, P)
    if nb == 0 or n_rows == 0 or P == 0:
        z = np.zeros((nb, n_rows, P))
        return _finish(z, z, nan, idx, shape, be_cls.name, device)
    qf, kf, vf = _flat(q, (*batch, T, N)), _flat(k, (*batch, T, N)), _flat(v, (*batch, T, P))
    dtf = d_t.detach().to("cpu", torch.float64).expand(*batch, T).reshape(nb, T).numpy()
    af = a.detach().to("cpu", torch.float64).expand(batch).reshape(nb).numpy()
    df = None
    if d is not None:
        df = d.detach().to("cpu", torch.float64).expand(*batch, P).reshape(nb, P).numpy()
    cache: dict[str, Any] = {}

    def step(be: ball._Backend, t: int, h: Any, emit: bool) -> tuple[Any, Any]:
        if cache.get("prec") != be.prec:
            cache.clear()
            cache["prec"] = be.prec
            cache["A"] = be.arr(af)
            cache["D"] = None if df is None else be.arr(df)
        d_step = be.arr(dtf[:, t])  # [nb]
        g = be.exp(cache["A"] * d_step)[:, None, None]
        w = (be.arr(kf[:, t]) * d_step[:, None])[:, :, None] * be.arr(vf[:, t])[:, None, :]
        h = w if h is None else g * h + w  # [nb, N, P]
        y = None
        if emit:
            y = (be.arr(qf[:, t])[:, :, None] * h).sum(axis=1)
            if cache["D"] is not None:
                y = y + cache["D"] * be.arr(vf[:, t])
        return h, y

    val, rad = _scan(be_cls, step, n_rows, last, want, (nb, n_rows, P))
    return _finish(val, rad, nan, idx, shape, be_cls.name, device)
