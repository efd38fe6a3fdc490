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

from attnprec.analysis import _reference_ball as ball
from attnprec.analysis.reference import Reference, _nan_mask, _nan_to_zero

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


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to("cpu", torch.float64)


def _flat(x: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """``x`` broadcast to ``shape`` as float64, NaN -> 0 (masked afterwards), flattened over
    the batch dims (all but the last two)."""
    return _nan_to_zero(x.detach().cpu()).expand(shape).reshape(-1, *shape[-2:]).numpy()


#: ``setup(be, q, k, v) -> step``, given ``q, k, v`` flattened over the batch by :func:`_flat`
#: (``[nb, T, d]`` float64 arrays): the parameters as balls of ``be``'s precision, and
#: ``step(t, h, emit) -> (h, y_t)`` the recurrence's token t from the state ``h`` (None
#: before the first), with the output ``y_t [nb, d_v]`` when ``emit`` (else None).
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
) -> Reference:
    """The reference of a causal recurrence: ``setup`` (see :data:`Setup`; the parameters
    flattened over ``batch`` by :func:`_flat` too) run up to the last row asked
    at increasing precision until the outputs of those rows settle, NaN where a NaN input
    reaches (row t through ``q_t`` or a ``k_s``, column e through a ``v_s[e]``, ``s <= t``).
    Every output ball is certified (module docstring): ``|exact - value| <= radius``."""
    from attnprec.analysis.bounds.attention import sample_rows

    be_cls = _backend(backend, method)
    _no_inf(q, k, v)
    T, d_v = q.shape[-2], v.shape[-1]
    idx = sample_rows(T, rows)
    n_rows = T if idx is None else int(idx.numel())
    vals = rads = np.zeros((math.prod(batch), n_rows, d_v))
    if vals.size:  # run to the last row asked at increasing precision until they settle
        want = np.zeros(T, dtype=bool)
        want[slice(None) if idx is None else idx.numpy()] = True
        qf, kf, vf = (_flat(x, (*batch, *x.shape[-2:])) for x in (q, k, v))

        def tokens(be: ball._Backend) -> ball.Step:  # one token per step
            step = setup(be, qf, kf, vf)

            def run(lo: int, hi: int, h: Any, emit: np.ndarray) -> tuple[Any, Any]:
                h, y = step(lo, h, bool(emit[0]))
                return h, None if y is None else y[:, None]

            return run

        vals, rads = ball.recurrence(be_cls, want, tokens)
    nan = _nan_mask(q.cpu(), k.cpu(), v.cpu(), True, (), None).expand(*batch, T, d_v)
    if idx is not None:
        nan = nan[..., idx, :]
    shape = (*batch, n_rows, d_v)
    val = torch.from_numpy(vals).reshape(shape).masked_fill(nan, math.nan)
    rad = torch.from_numpy(rads).reshape(shape).masked_fill(nan, math.nan)
    return Reference(val.to(q.device), rad.to(q.device), be_cls.name, idx)


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

    def setup(be: ball._Backend, qf: Any, kf: Any, vf: Any) -> Any:
        dlf = _flat(dl, (*batch, T, Dv))
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

    return certify("selective_scan", q, k, v, batch, backend, rows, setup)


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

    def setup(be: ball._Backend, qf: Any, kf: Any, vf: Any) -> Any:
        dtf = _f64(d_t).expand(*batch, T).reshape(-1, T).numpy()
        Ab = be.arr(_f64(a).expand(batch).reshape(-1).numpy())  # [nb]
        Db = None if d is None else be.arr(_f64(d).expand(*batch, P).reshape(-1, P).numpy())

        def step(t: int, h: Any, emit: bool) -> tuple[Any, Any]:
            d_step = be.arr(dtf[:, t])  # [nb]
            w = (be.arr(kf[:, t]) * d_step[:, None])[:, :, None] * be.arr(vf[:, t])[:, None, :]
            h = w if h is None else be.exp(Ab * d_step)[:, None, None] * h + w  # [nb, N, P]
            if not emit:
                return h, None
            y = (be.arr(qf[:, t])[:, :, None] * h).sum(axis=1)
            return h, y if Db is None else y + Db * be.arr(vf[:, t])

        return step

    return certify("ssd", q, k, v, batch, backend, rows, setup)
