"""Symmetry-aware Taylor and polynomial attention with the packed features built in-kernel."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import torch

from attnprec._validate import check_finite, check_float, check_int, resolve_scale
from attnprec.attention.taylor import taylor_coeffs, taylor_multinomials
from attnprec.kernels._common import (
    KernelState,
    check_state_args,
    finish,
    precision_for,
    prepare_qkv,
)
from attnprec.kernels._featured import BLOCK, BLOCK_F, run_featured

__all__ = [
    "taylor_attention",
    "polynomial_attention",
    "precision_for",
    "MAX_STATE",
    "BLOCK",
    "BLOCK_F",
]

#: Largest state ``m * d_v`` (float32 elements per batch row) the kernels accept: 64 MiB.
MAX_STATE = 2**24


@functools.lru_cache(maxsize=32)
def _index_table(d: int, powers: tuple[int, ...]) -> torch.Tensor:
    """Packed multi-indices (sorted tuples, lexicographic, padded with ``d`` = factor 1)."""
    pmax = max(max(powers), 1)
    rows = [
        list(t) + [d] * (pmax - p)
        for p in powers
        for t in itertools.combinations_with_replacement(range(d), p)
    ]
    return torch.tensor(rows, dtype=torch.int32).reshape(len(rows), pmax)


def _coeffs(coeffs: object) -> tuple[float, ...]:
    if isinstance(coeffs, torch.Tensor):
        check_float("coeffs", coeffs)
        if coeffs.dim() != 1:
            raise ValueError(f"coeffs: expected a 1-D sequence, got shape {tuple(coeffs.shape)}")
        check_finite("coeffs", coeffs)
        return tuple(float(c) for c in coeffs)
    if not isinstance(coeffs, Sequence) or isinstance(coeffs, str):
        raise TypeError(f"coeffs: expected a sequence of numbers, got {type(coeffs).__name__}")
    out = []
    for c in coeffs:
        if isinstance(c, bool) or not isinstance(c, int | float):
            raise TypeError(f"coeffs: expected real numbers, got {type(c).__name__}")
        if not math.isfinite(c):
            raise ValueError("coeffs: expected finite values, found NaN or inf")
        out.append(float(c))
    if not any(c != 0 for c in out):
        raise ValueError("coeffs: expected at least one nonzero coefficient")
    return tuple(out)


def feature_tables(
    d: int, coeffs: Sequence[float], scale: float, d_v: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Index table ``[m, PMAX]`` (int32), query weights ``c_p scale^p p!/alpha!`` (float32),
    and the powers used (those with ``c_p != 0``).

    Raises
    ------
    ValueError
        If the state ``m x d_v`` exceeds :data:`MAX_STATE` float32 elements (naming the size);
        if float32 holds a weight as inf (naming ``coeffs`` where ``c_p p!/alpha!`` alone
        overflows, else ``scale``).
    """
    powers = tuple(p for p, c in enumerate(coeffs) if c != 0)
    m = sum(math.comb(d + p - 1, p) for p in powers)
    if m * max(d_v, 1) > MAX_STATE:
        raise ValueError(
            f"degree: powers {powers} with d_k={d} need m={m} features, a state of "
            f"{m} x {d_v} float32 elements per batch row, over the limit of {MAX_STATE}"
        )
    idx = _index_table(d, powers)
    parts = []
    for p in powers:
        mult = taylor_multinomials(d, p)  # p!/alpha!, float64
        try:
            sp = scale**p
        except OverflowError:  # beyond float64, so beyond float32 (raised below)
            sp = math.inf
        parts.append((mult * (coeffs[p] * sp)).to(torch.float32))
        if not bool(torch.isfinite(parts[-1]).all()):
            alone = torch.tensor(abs(coeffs[p]) * float(mult.max())).to(torch.float32)
            name = "scale" if bool(torch.isfinite(alone)) else "coeffs"
            raise ValueError(
                f"{name}: the query weight c_p scale^p p!/alpha! of power {p} (c_p = "
                f"{coeffs[p]!r}, scale = {scale!r}) overflows the compute format fp32"
            )
    return idx.to(device), torch.cat(parts).to(device), powers


def polynomial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coeffs: Sequence[float] | torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    state: KernelState | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, KernelState]:
    r"""Attention with weights ``w_ij = sum_p c_p s_ij^p``, ``s_ij = scale q_i . k_j``.

    The packed symmetric monomials ``q^alpha``, ``k^alpha`` (``|alpha| = p``, ``c_p != 0``;
    ``m = sum_p C(d_k+p-1, p)`` of them) are computed inside the kernel, ``BLOCK_F`` at a
    time, from an index table; query features carry ``c_p scale^p p!/alpha!``. Chunked
    causal prefill over :data:`BLOCK` tokens with the state ``[m, d_v]`` carried in float32
    (a long prefill of few sequences runs in parallel segments, their starting states a
    prefix sum of segment totals), a non-causal form, and a decode step (``state=``, one
    token) of cost O(m d_v).

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``[..., n_q, d_k]``, ``[..., n_k, d_k]``, ``[..., n_k, d_v]``; float16, bfloat16 or
        float32 on CUDA (CPU under ``TRITON_INTERPRET=1``). Non-contiguous tensors are copied.
    coeffs : sequence of float or 1-D tensor
        ``c_0, ..., c_P``, finite, not all zero.
    causal : bool
        Query ``i`` sees keys ``j <= i`` (requires ``n_q == n_k``).
    scale : float, optional
        Defaults to ``1/sqrt(d_k)``.
    state, return_state
        Causal only: continue from / return the state (see :class:`KernelState`).

    Returns
    -------
    torch.Tensor or (torch.Tensor, KernelState)
        ``[..., n_q, d_v]`` in the input dtype.

    Raises
    ------
    ValueError
        Shapes, coefficients, or a state over :data:`MAX_STATE` elements.

    Notes
    -----
    Error: elementwise within ``attnprec.analysis.bounds.graphs.rounding_bound("polynomial",
    q, k, v, precision_for(dtype, interpreted), coeffs=coeffs, scale=scale)`` of the exact
    quotient of the stored inputs (graph in docs/kernels.md). Where the normalizer is not
    positive the raw quotient is returned (the bound is infinite there).
    NaN inputs reach the outputs that depend on them, as in the exact method: a key's or a
    value's the later queries (a value's its column), a query's its own row
    (docs/kernels.md). Where ``c_0`` is the only nonzero coefficient (degree 0) no feature
    reads ``q`` or ``k``, so their NaNs reach no output, while the reference, which forms
    ``q . k``, is NaN there (the testing helpers refuse non-finite inputs).
    """
    c = _coeffs(coeffs)
    check_state_args(causal, state, return_state)
    qq, kk, vv, batch = prepare_qkv(q, k, v, causal)
    d, dv = qq.shape[-1], vv.shape[-1]
    s = resolve_scale(scale, d)
    idx, w, _ = feature_tables(d, c, s, dv, qq.device)
    m = idx.shape[0]
    key = (d, dv, c, s, qq.dtype)
    st = state.check("polynomial", batch, key) if state is not None else None
    y, (ss, z) = run_featured(qq, kk, vv, m, causal=causal, state=st, idx=idx, w=w)  # type: ignore[arg-type]
    return finish(y, "polynomial", (ss, z), batch, key, return_state)


def taylor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    degree: int = 2,
    causal: bool = False,
    scale: float | None = None,
    state: KernelState | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, KernelState]:
    r"""Taylor attention: :func:`polynomial_attention` with ``c_p = 1/p!``, ``p <= degree``.

    Parameters and error guarantee as :func:`polynomial_attention` (``degree`` >= 0; the
    state ``C(d_k + degree, degree) x d_v`` must fit :data:`MAX_STATE`).

    Parameters
    ----------
    q, k, v : torch.Tensor
        As :func:`polynomial_attention`.
    degree : int, optional
        P >= 0, the highest power (P + 1 Taylor terms); default 2.
    causal, scale, state, return_state
        As :func:`polynomial_attention`.

    Returns
    -------
    torch.Tensor or (torch.Tensor, KernelState)
        ``[..., n_q, d_v]`` in the input dtype.

    Raises
    ------
    TypeError
        If ``degree`` is not an integer; otherwise as :func:`polynomial_attention`.
    ValueError
        If ``degree`` is not in ``[0, 170]``; otherwise as :func:`polynomial_attention`.

    Notes
    -----
    Error: that of :func:`polynomial_attention` with the float64 coefficients ``1/p!``
    (rounding only; the distance from softmax is bounded separately by
    :func:`attnprec.analysis.bounds.taylor_error_bound`).
    """
    deg = check_int("degree", degree, 0)
    return polynomial_attention(
        q,
        k,
        v,
        taylor_coeffs(deg),
        causal=causal,
        scale=scale,
        state=state,
        return_state=return_state,
    )
