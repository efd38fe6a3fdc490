"""Gated linear attention: ``S_t = diag(g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale q_t S_t``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attnprec._validate import (
    check_bool,
    check_causal_only,
    check_float,
    resolve_scale,
    widened,
)
from attnprec.attention._common import (
    DEFAULT_CHUNK,
    check_chunk_size,
    empty_result,
    lower_mask,
    prepare,
)

__all__ = ["GatedState", "gated_linear_attention"]


@dataclass(frozen=True)
class GatedState:
    """Recurrent state of gated linear attention: ``S [..., d_k, d_v]`` after the tokens seen."""

    S: torch.Tensor


def per_channel_gates(lg: torch.Tensor, n: int, d_k: int, batch: Sequence[int]) -> bool:
    """Whether log-gates ``lg`` are per channel, ``[..., n, d_k]``, or per step, ``[..., n]``
    (shared by the channels), read from the shape against the inputs' batch dims ``batch``;
    ``ValueError`` naming ``log_g`` for any other shape, and for a shape that reads both
    ways (``B = n = d_k``: a per-step ``[B, n]`` is also a per-channel ``[n, d_k]``, which
    was taken silently)."""
    channel = lg.dim() >= 2 and tuple(lg.shape[-2:]) == (n, d_k)
    step = lg.dim() >= 1 and lg.shape[-1] == n
    if not (channel or step):
        raise ValueError(
            f"log_g: expected shape [..., n={n}, d_k={d_k}] or [..., n={n}], got {tuple(lg.shape)}"
        )

    def fits(lead: Sequence[int]) -> bool:
        try:
            return tuple(torch.broadcast_shapes(tuple(lead), tuple(batch))) == tuple(batch)
        except RuntimeError:
            return False

    if channel and step and n > 1:  # (n = d_k = 1: both readings give the same gates)
        # a reading whose batch dims do not fit the inputs' is no reading (a review: per-step
        # gates [2, 3, n] with batch (2, 3) and n = d_k were refused as ambiguous)
        if not fits(lg.shape[:-2]):
            return not fits(lg.shape[:-1])
        if fits(lg.shape[:-1]):
            raise ValueError(
                f"log_g: shape {tuple(lg.shape)} reads both as per-step gates [..., n={n}] "
                f"with batch dims {tuple(lg.shape[:-1])} and as per-channel gates [n={n}, "
                f"d_k={d_k}]: give per-channel gates a batch dim ([1, n, d_k]) or per-step "
                "ones expanded over the channels ([..., n, d_k])"
            )
    # Gates broadcast into the inputs' batch: a larger one was a silently larger output.
    if not fits(lg.shape[: -2 if channel else -1]):
        raise ValueError(
            f"log_g: batch dims {tuple(lg.shape[: -2 if channel else -1])} do not broadcast "
            f"into the inputs' batch {tuple(batch)}"
        )
    return channel


def _check_gates(
    log_g: object, n: int, d_k: int, batch: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """Return the gates as ``[..., n, d_k]`` in ``dtype``."""
    lg = widened(check_float("log_g", log_g))
    per_channel = lg
    if not per_channel_gates(lg, n, d_k, batch):
        per_channel = lg[..., None].expand(*lg.shape, d_k)
    if bool((lg > 0).any()):
        raise ValueError("log_g: expected log-gates <= 0 (gates g in [0, 1]), found a value > 0")
    return per_channel.to(dtype)


def _chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lg: torch.Tensor,
    S: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of C tokens from state ``S``: outputs ``[..., C, d_v]`` and the new state.

    Every decay is a sum of log-gates over its own span, never a difference of prefix
    sums: no cancellation, and ``log g = -inf`` (a reset) gives exact zeros, not NaN.
    """
    c = lg.shape[-2]
    # span[t, j] = sum_{l=j+1..t} log g_l (t >= j): cumulative sum over t of log g_t [t > j].
    zero = torch.zeros((), dtype=lg.dtype, device=lg.device)
    below, lower = lower_mask(c, -1, lg.device), lower_mask(c, device=lg.device)
    span = torch.where(below.unsqueeze(-1), lg.unsqueeze(-2), zero).cumsum(-3)
    decay = torch.where(lower.unsqueeze(-1), torch.exp(span), zero)
    w = torch.einsum("...tc,...jc,...tjc->...tj", q, k, decay)
    w = torch.where(lower, w, zero)  # a NaN in a later key stays out of earlier rows
    o = w @ v
    head = lg.cumsum(-2)  # sum_{l <= t} log g_l, the decay of the carried state
    inc = lg.flip(-2).cumsum(-2).flip(-2)  # sum_{l >= j}
    tail = torch.cat([inc[..., 1:, :], torch.zeros_like(inc[..., :1, :])], dim=-2)  # l > j
    S_new = (k * torch.exp(tail)).transpose(-1, -2) @ v
    if S is not None:
        o = o + (q * torch.exp(head)) @ S
        S_new = S_new + torch.exp(head[..., -1, :]).unsqueeze(-1) * S
    return scale * o, S_new


def gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_g: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    state: GatedState | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, GatedState]:
    """Gated linear attention, causal and unnormalized.

    ``o_t = scale * sum_{j <= t} (q_t . (prod_{l=j+1..t} g_l * k_j)) v_j``, i.e. the
    recurrence ``S_t = diag(g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale * q_t S_t``.

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``[..., n, d_k]``, ``[..., n, d_k]``, ``[..., n, d_v]``, one float dtype
        (float16/bfloat16 computed in float32, returned in the input dtype).
    log_g : torch.Tensor
        Log-gates ``<= 0`` (``-inf`` is a gate of 0, a reset), ``[..., n, d_k]`` (one gate
        per key channel) or ``[..., n]`` (one per step); a tensor whose last two dims are
        ``(n, d_k)`` is read as per channel. Float dtype; NaN propagates.
    causal : bool
        Must be True (the method is causal only).
    scale : float, optional
        Defaults to ``1/sqrt(d_k)``.
    chunk_size : int
        Tokens per chunk: inside a chunk the ``[C, C, d_k]`` decays are formed from sums of
        log-gates over each span; memory ``O(C^2 d_k + d_k d_v)``. Only the rounding
        depends on it.
    state : GatedState, optional
        The state after the preceding tokens; one token per call is the recurrence
        (O(d_k d_v) per token).
    return_state : bool
        Also return the state after the last token.

    Returns
    -------
    torch.Tensor or (torch.Tensor, GatedState)
        ``[..., n, d_v]`` in q's dtype, and the state if requested.

    Notes
    -----
    Error (unit roundoff u, ``exp`` within relative error ``e_exp``): each decay
    ``exp(sum of at most n log-gates)`` has relative error at most
    ``(1 + e_exp) exp(gamma_n sum_l |log g_l|) - 1`` over its span; with ``eps`` that
    plus ``gamma_{d_k + n + 4}`` for the products and sums,
    ``|o~_t - o_t| <= eps * scale * sum_{j <= t} sum_c |q_tc| D_tjc |k_jc| |v_j|``
    (D the exact decays), plus the scale rounding ``u |o~_t|``.
    """
    check_bool("return_state", return_state)
    check_causal_only("gated linear attention", causal)
    q, k, v, out_dtype = prepare(q, k, v, True)
    n, d_k = q.shape[-2:]
    s = resolve_scale(scale, d_k)
    chunk_size = check_chunk_size(chunk_size)
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    lg = _check_gates(log_g, n, d_k, batch, q.dtype)
    S: torch.Tensor | None = None
    if state is not None:
        if not isinstance(state, GatedState):
            raise TypeError(f"state: expected a GatedState, got {type(state).__name__}")
        if tuple(state.S.shape) != (*batch, d_k, v.shape[-1]):
            raise ValueError(
                f"state: expected S of shape {(*batch, d_k, v.shape[-1])} (the batch, d_k, "
                f"d_v), got {tuple(state.S.shape)}"
            )
        if state.S.dtype != q.dtype:
            raise TypeError(f"state: expected dtype {q.dtype}, got {state.S.dtype}")
        S = state.S
    if q.shape[-2] == 0:
        return empty_result(q, k, v, out_dtype, state, return_state)  # type: ignore[return-value]
    out = []
    for t0 in range(0, n, chunk_size):
        sl = slice(t0, t0 + chunk_size)
        o, S = _chunk(q[..., sl, :], k[..., sl, :], v[..., sl, :], lg[..., sl, :], S, s)
        out.append(o)
    assert S is not None
    y = torch.cat(out, dim=-2).to(out_dtype)
    return (y, GatedState(S)) if return_state else y


def gated_per_column(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_g: torch.Tensor,
    chunk_size: int,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gated_linear_attention` (scale 1) for each value column ``c`` with keys and
    log-gates of its own, the columns moved into the batch (``d_v = 1`` each): ``q [..., T,
    N]`` shared, ``k, log_g [..., T, C, N]``, ``v [..., T, C]`` (batch dims already
    broadcast) and the state ``[..., C, N]`` before the first token (or None). Returns the
    outputs ``[..., T, C]`` and the state ``[..., C, N]`` after the last token; each column's
    error is :func:`gated_linear_attention`'s."""
    *batch, T, C, N = k.shape
    yg, st = gated_linear_attention(
        q.unsqueeze(-3).expand(*batch, C, T, N),
        k.movedim(-2, -3),
        v.movedim(-1, -2).unsqueeze(-1),
        log_g.movedim(-2, -3),
        scale=1.0,
        chunk_size=chunk_size,
        state=None if state is None else GatedState(state.unsqueeze(-1)),
        return_state=True,
    )
    return yg.squeeze(-1).movedim(-1, -2), st.S.squeeze(-1)
