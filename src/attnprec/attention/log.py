"""Log-space attention (Heinsen 2024), for values of any sign.

``Softmax(log(exp(Q) exp(K)^T)) V``: the weight of key j for query i is
``w_ij = sum_c exp(scale (q_ic + k_jc))``, so

    y_i = sum_c e^{s q_ic} [sum_j e^{s k_jc} v_j] / sum_c e^{s q_ic} [sum_j e^{s k_jc}]

(s the scale),

two nested log-sums of exponentials, linear in n. The published form needs V > 0 (it takes
log V); here the inner sums carry signs (``logsumexp(..., b=v, return_sign=True)``), so V
may have any sign and exact cancellation gives an exact zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnprec._validate import broadcast_shapes, resolve_scale
from attnprec.attention._common import (
    DEFAULT_CHUNK,
    check_chunk_size,
    check_state_args,
    empty_result,
    prepare,
)
from attnprec.lognum import logcumsumexp, logsumexp

__all__ = ["LogState", "log_attention"]


@dataclass(frozen=True)
class LogState:
    """Recurrent state of log attention after the keys seen so far.

    Attributes
    ----------
    log_num, sign_num : torch.Tensor
        ``[..., d_k, d_v]``: ``log|sum_j e^{scale k_jc} v_je|`` and its sign (-1, 0, +1).
    log_den : torch.Tensor
        ``[..., d_k]``: ``log sum_j e^{scale k_jc}``.
    """

    log_num: torch.Tensor
    sign_num: torch.Tensor
    log_den: torch.Tensor


def _check_state(
    state: object, d_k: int, d_v: int, dtype: torch.dtype, batch: tuple[int, ...]
) -> LogState:
    if not isinstance(state, LogState):
        raise TypeError(f"state: expected a LogState, got {type(state).__name__}")
    if tuple(state.log_num.shape) != (*batch, d_k, d_v):
        raise ValueError(
            f"state: expected {(*batch, d_k, d_v)} (the batch, d_k, d_v), got "
            f"{tuple(state.log_num.shape)}"
        )
    if state.log_num.dtype != dtype:
        raise TypeError(f"state: expected dtype {dtype}, got {state.log_num.dtype}")
    return state


def _prepend(first: torch.Tensor, rest: torch.Tensor, dim: int) -> torch.Tensor:
    """``first`` (without the ``dim`` axis) before ``rest`` along ``dim``, batch broadcast."""
    first = first.unsqueeze(dim)
    shape = list(broadcast_shapes(first.shape, rest.shape))
    head = list(shape)
    head[dim] = 1
    return torch.cat([first.expand(head), rest.expand(shape)], dim=dim)


def _key_terms(
    a: torch.Tensor, v: torch.Tensor, prev: LogState | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The terms ``e^{a_jc} v_je`` (logs ``[..., C, d_k, d_v]`` and signed weights) and
    ``e^{a_jc}`` (logs ``[..., C, d_k]``), after the state's sums when there is one."""
    la, bv = torch.broadcast_tensors(a.unsqueeze(-1), v.unsqueeze(-2))
    if prev is None:
        return la, bv, a
    return (
        _prepend(prev.log_num, la, -3),
        _prepend(prev.sign_num, bv, -3),
        _prepend(prev.log_den, a, -2),
    )


def _queries(
    sq: torch.Tensor, log_num: torch.Tensor, sign_num: torch.Tensor, log_den: torch.Tensor
) -> torch.Tensor:
    """``y`` from scaled queries ``sq [..., C, d_k]`` and per-query sums ``[..., C, d_k, *]``."""
    ln, sn = logsumexp(sq.unsqueeze(-1) + log_num, dim=-2, b=sign_num, return_sign=True)
    ld = logsumexp(sq + log_den, dim=-1, keepdim=True)
    return sn * torch.exp(ln - ld)


def log_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    state: LogState | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, LogState]:
    r"""Log-space (Heinsen) attention with weights ``w_ij = sum_c exp(scale (q_ic + k_jc))``.

    ``y_i = sum_j w_ij v_j / sum_j w_ij``, computed without ever forming ``w``: per key
    channel c the signed log-sum over keys of ``e^{scale k_jc} v_j`` (a log-cumulative-sum
    when causal), then per query a signed log-sum over c. Nothing overflows, whatever the
    size of the logits; values may have any sign.

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``[..., n_q, d_k]``, ``[..., n_k, d_k]``, ``[..., n_k, d_v]``, one float dtype
        (float16/bfloat16 computed in float32, returned in the input dtype; the log-space
        sums of :mod:`attnprec.lognum` run in float64 and return the compute dtype).
    causal : bool
        Key ``j`` attends only to queries ``i >= j`` (requires ``n_q == n_k``).
    scale : float, optional
        Defaults to 1 (the published form has no scale).
    chunk_size : int
        Tokens per chunk; memory ``O(chunk_size d_k d_v)``. Only the rounding depends on it.
    state : LogState, optional
        Causal only: the state after the preceding tokens; one token per call is the
        recurrent form (``O(d_k d_v)`` per token).
    return_state : bool
        Causal only: also return the state after the last key.

    Returns
    -------
    torch.Tensor or (torch.Tensor, LogState)
        ``[..., n_q, d_v]`` in q's dtype, and the state if requested.

    Notes
    -----
    Error: each log-sum has the error of :func:`attnprec.lognum.signed_sum_error_bound`
    (condition number ``kappa = sum |x| / |sum x|``). The key sums (``n_k`` terms, plus one
    per chunk for the carried state) have log error ``e_key``; the query sums (``d_k``
    terms) inherit it as ``term_log_error = e_key + u |scale q_ic + log S_c|``, giving log
    errors ``e_num``, ``e_den``; the output then has relative error at most
    ``(1 + 2u) exp(e_num + e_den + u |log num - log den|) - 1`` (the sign is exact wherever
    the bounds are finite). An exactly cancelling numerator gives an exact zero.
    """
    check_state_args(causal, state, return_state)
    q, k, v, out_dtype = prepare(q, k, v, causal)
    n_k, d_k = k.shape[-2:]
    d_v = v.shape[-1]
    s = resolve_scale(scale, d_k, default=1.0)
    chunk_size = check_chunk_size(chunk_size)
    batch = tuple(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]))
    st = None if state is None else _check_state(state, d_k, d_v, q.dtype, batch)
    if q.shape[-2] == 0:
        return empty_result(q, k, v, out_dtype, state, return_state)  # type: ignore[return-value]
    out = []
    if not causal:
        for t0 in range(0, n_k, chunk_size):
            sl = slice(t0, t0 + chunk_size)
            la, bv, lz = _key_terms(s * k[..., sl, :], v[..., sl, :], st)
            ln, sn = logsumexp(la, dim=-3, b=bv, return_sign=True)
            st = LogState(ln, sn, logsumexp(lz, dim=-2))
        assert st is not None
        for t0 in range(0, q.shape[-2], chunk_size):
            sq = s * q[..., t0 : t0 + chunk_size, :]
            out.append(
                _queries(
                    sq,
                    st.log_num.unsqueeze(-3),
                    st.sign_num.unsqueeze(-3),
                    st.log_den.unsqueeze(-2),
                )
            )
    else:
        for t0 in range(0, n_k, chunk_size):
            sl = slice(t0, t0 + chunk_size)
            la, bv, lz = _key_terms(s * k[..., sl, :], v[..., sl, :], st)
            if k[..., sl, :].shape[-2] == 1:  # one token: its prefix is the whole sum
                ln, sn = logsumexp(la, dim=-3, b=bv, keepdim=True, return_sign=True)
                lzc = logsumexp(lz, dim=-2, keepdim=True)
            else:
                ln, sn = logcumsumexp(la, dim=-3, b=bv, return_sign=True)
                lzc = logcumsumexp(lz, dim=-2)
                if st is not None:  # drop the prefix that is the state alone
                    ln, sn, lzc = ln[..., 1:, :, :], sn[..., 1:, :, :], lzc[..., 1:, :]
            out.append(_queries(s * q[..., sl, :], ln, sn, lzc))
            st = LogState(ln[..., -1, :, :], sn[..., -1, :, :], lzc[..., -1, :])
    assert st is not None
    y = torch.cat(out, dim=-2).to(out_dtype)
    return (y, st) if return_state else y
