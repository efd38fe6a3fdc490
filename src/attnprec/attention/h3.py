"""H3 ("Hungry Hungry Hippos", Fu et al. 2023) in the q, k, v frame: a shift SSM on the keys,
a diagonal SSM over the key-value outer products, and the product with the queries.

Per head, with ``m`` shift taps and decays ``lambda = exp(log_decay) <= 1``:

- the shift SSM (``A`` the shift matrix) is a short causal convolution of each key channel
  with its kernel: ``ks_t[c] = sum_{i<m} shift[c, i] k_{t-i}[c]`` (``k_{<0} = 0``);
- the diagonal SSM over ``W_t = ks_t v_t^T`` (``d_k x d_v``), one decay per key channel or per
  entry: ``S_t = lambda o S_{t-1} + ks_t v_t^T``;
- ``o_t = q_t S_t``.

That is gated linear attention (:mod:`attnprec.attention.gated`) with the shifted keys and
log-gates fixed in time (per channel), or, per entry, one gated problem per value column (the
columns moved into the batch, as the selective scan does with its channels): every decay is
an exponential of a sum of log-decays over its own span (docs/methods/h3.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnprec._validate import (
    broadcast_shapes,
    check_bool,
    check_causal_only,
    check_qkv,
    compute_dtype,
)
from attnprec.attention._common import DEFAULT_CHUNK, check_chunk_size, check_state, empty_result
from attnprec.attention.gated import GatedState, gated_linear_attention, gated_per_column
from attnprec.attention.ssm import _param

__all__ = ["H3State", "h3_attention", "check_h3", "shift_keys"]


@dataclass(frozen=True)
class H3State:
    """Recurrent state of H3 after the tokens seen: the diagonal SSM's state ``S [..., d_k,
    d_v]`` and the shift SSM's, the last ``m - 1`` keys ``keys [..., m - 1, d_k]`` (zeros
    before the first token), both in the compute dtype."""

    S: torch.Tensor
    keys: torch.Tensor


def check_h3(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shift: object, log_decay: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """Validate H3's operands; return ``shift [..., d_k or 1, m]``, ``log_decay [..., d_k,
    d_v or 1]`` (as given, reshaped) and the batch shape.

    ``shift``: ``[m]`` (one kernel for every key channel) or ``[..., d_k or 1, m]``;
    ``log_decay``: ``[d_k]`` (one decay per key channel) or ``[..., d_k, d_v or 1]`` (per
    entry of the state, or per channel); leading dims broadcast with the batch dims.

    Raises
    ------
    TypeError
        A non-float ``shift`` or ``log_decay`` (or q, k, v).
    ValueError
        Shapes that do not match, an empty kernel, non-finite parameters, ``log_decay > 0``
        (each naming the argument).
    """
    _, _, d_k, d_v = check_qkv(q, k, v, True)
    sh = _param("shift", shift)
    if sh.dim() == 1:
        sh = sh.unsqueeze(0)
    if sh.dim() < 2 or sh.shape[-2] not in (d_k, 1) or sh.shape[-1] < 1:
        raise ValueError(
            f"shift: expected shape [m] or [..., d_k={d_k} (or 1), m] with m >= 1, "
            f"got {tuple(sh.shape)}"
        )
    ld = _param("log_decay", log_decay)
    if ld.dim() == 1:
        ld = ld.unsqueeze(-1)
    if ld.dim() < 2 or ld.shape[-2] != d_k or ld.shape[-1] not in (d_v, 1):
        raise ValueError(
            f"log_decay: expected shape [d_k={d_k}] or [..., d_k={d_k}, d_v={d_v} (or 1)], "
            f"got {tuple(ld.shape)}"
        )
    if bool((ld > 0).any()):
        raise ValueError("log_decay: expected log-decays <= 0 (decays in (0, 1]), found one > 0")
    try:
        batch = broadcast_shapes(
            q.shape[:-2], k.shape[:-2], v.shape[:-2], sh.shape[:-2], ld.shape[:-2]
        )
    except RuntimeError:
        raise ValueError(
            f"shift, log_decay: leading dims {tuple(sh.shape[:-2])}, {tuple(ld.shape[:-2])} "
            f"do not broadcast with q, k, v's batch dims ({tuple(q.shape[:-2])}, "
            f"{tuple(k.shape[:-2])}, {tuple(v.shape[:-2])})"
        ) from None
    return sh, ld, batch


def shift_keys(k: torch.Tensor, shift: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """The shift SSM: ``ks_t[c] = sum_{i<m} shift[c, i] k_{t-i}[c]`` ``[..., T, d_k]`` from
    ``k [..., T, d_k]``, ``shift [..., d_k or 1, m]`` and the ``m - 1`` keys before the first
    token ``prev [..., m - 1, d_k]``, in their (common) dtype: ``m`` products and a sum of
    ``m`` terms per element."""
    m = shift.shape[-1]
    kk = torch.cat([prev.expand(*k.shape[:-2], m - 1, k.shape[-1]), k], dim=-2)
    win = kk.unfold(-2, m, 1)  # [..., T, d_k, m]: win[t, c, j] = k_{t + j - (m - 1)}[c]
    return (win * shift.flip(-1).unsqueeze(-3)).sum(-1)


def h3_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    shift: torch.Tensor,
    log_decay: torch.Tensor,
    causal: bool = True,
    chunk_size: int = DEFAULT_CHUNK,
    state: H3State | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, H3State]:
    """H3 attention: ``o_t = q_t S_t``, ``S_t = lambda o S_{t-1} + ks_t v_t^T``, ``ks`` the
    shift SSM of the keys.

    ``o_t = sum_{j<=t} sum_c q_t[c] exp((t - j) log_decay[c, e]) ks_j[c] v_j[e]`` with
    ``ks_j[c] = sum_{i<m} shift[c, i] k_{j-i}[c]``: gated linear attention (scale 1) with the
    shifted keys and log-gates fixed in time, computed by
    :func:`~attnprec.attention.gated_linear_attention` (per entry: on the value columns moved
    into the batch). No scale and no normalizer (H3 has neither).

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``[..., T, d_k]``, ``[..., T, d_k]``, ``[..., T, d_v]``, one float dtype
        (float16/bfloat16 computed in float32, returned in the input dtype).
    shift : torch.Tensor
        The shift SSM's kernel, ``m >= 1`` taps (``shift[..., 0]`` multiplies the current
        key): ``[m]`` for every key channel, or ``[..., d_k or 1, m]`` (leading dims
        broadcast with the batch, e.g. ``[H, d_k, m]`` per head). Any float dtype (converted
        to the compute dtype).
    log_decay : torch.Tensor
        The diagonal SSM's log-decays ``<= 0`` (finite): ``[d_k]`` (one per key channel,
        shared by the value columns) or ``[..., d_k, d_v or 1]`` (one per entry of the state,
        or per channel; leading dims broadcast with the batch).
    causal : bool
        Must be True (the method is causal only).
    chunk_size : int
        Tokens per chunk of the gated computation (only the rounding depends on it).
    state : H3State, optional
        The state after the preceding tokens (one token per call is the recurrence).
    return_state : bool
        Also return the state after the last token.

    Returns
    -------
    torch.Tensor or (torch.Tensor, H3State)
        ``[..., T, d_v]`` in q's dtype, and the state (compute dtype) if requested.

    Raises
    ------
    ValueError, TypeError
        Bad shapes or dtypes, non-finite parameters, ``log_decay > 0``, ``causal=False``, a
        state of the wrong shape or dtype (each naming the argument).

    Notes
    -----
    Error: within ``attention_error_bound("h3", ..., Precision(fmt, compute=c,
    accumulate=c, block=chunk_size))`` of the exact output, ``c`` the compute dtype (the
    shifted keys are kept in ``c``, not rounded to the storage format; docs/methods/h3.md).
    """
    check_bool("return_state", return_state)
    check_causal_only("H3", causal)
    sh, ld, batch = check_h3(q, k, v, shift, log_decay)
    chunk_size = check_chunk_size(chunk_size)
    cd = compute_dtype(q)
    T, d_k = q.shape[-2:]
    d_v = v.shape[-1]
    m = sh.shape[-1]
    S = None
    prev = torch.zeros(*batch, m - 1, d_k, dtype=cd, device=q.device)
    if state is not None:
        check_state(
            state, H3State, "an H3State", cd, f" (m = {m} shift taps)",
            S=(*batch, d_k, d_v), keys=(*batch, m - 1, d_k),
        )  # fmt: skip
        S, prev = state.S, state.keys
    if T == 0:
        return empty_result(q, k, v, q.dtype, state, return_state, batch)  # type: ignore[return-value]
    qc = q.to(cd).expand(*batch, T, d_k)
    kc = k.to(cd).expand(*batch, T, d_k)
    vc = v.to(cd).expand(*batch, T, d_v)
    ks = shift_keys(kc, sh.to(cd), prev)
    lg = ld.to(cd)
    if lg.shape[-1] == 1:  # per key channel: one gated problem
        gates = lg[..., 0].unsqueeze(-2).expand(*batch, T, d_k)
        y, st = gated_linear_attention(
            qc, ks, vc, gates, scale=1.0, chunk_size=chunk_size,
            state=None if S is None else GatedState(S), return_state=True,
        )  # fmt: skip
        S_new = st.S
    else:  # per entry: one gated problem per value column (d_v = 1 each)
        shape = (*batch, T, d_v, d_k)
        y, S_new = gated_per_column(
            qc, ks.unsqueeze(-2).expand(shape), vc,
            lg.movedim(-1, -2).unsqueeze(-3).expand(shape), chunk_size,
            None if S is None else S.movedim(-1, -2),
        )  # fmt: skip
        S_new = S_new.movedim(-1, -2)
    y = y.to(q.dtype)
    if not return_state:
        return y
    kk = torch.cat([prev, kc], dim=-2)
    keys = kk[..., kk.shape[-2] - (m - 1) :, :]
    return y, H3State(S_new, keys)
