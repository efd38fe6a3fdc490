"""Heinsen log-space attention, values of any sign: per-key-channel log-scale, linear state.

``w_ij = sum_c exp(scale (q_ic + k_jc))``. The state per key channel ``c`` is the running
maximum ``m_c`` of ``scale k_jc`` (the log-scale) and, relative to it, the signed sums
``S[c] = sum_j exp(scale k_jc - m_c) v_j`` and ``z[c] = sum_j exp(scale k_jc - m_c)`` in
float32: ``[d_k, d_v]``, never ``[n, d_k, d_v]``. Within a causal chunk each query is
shifted by the largest exponent among the keys it sees (state and earlier keys of the
chunk), so its normalizer is at least 1. Graph: docs/kernels.md, "Log kernel".
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from attnprec._validate import resolve_scale
from attnprec.analysis.bounds.softmax import rep_units
from attnprec.analysis.precision import Format, Precision
from attnprec.kernels import _common
from attnprec.kernels._common import (
    BLOCK,
    KernelState,
    check_state_args,
    finish,
    next_pow2,
    prepare_qkv,
    segments,
)
from attnprec.kernels._triton import store_quotient

__all__ = ["log_attention", "precision_for", "BLOCK"]


def kernel_scale(scale: object, d_k: int) -> float:
    """The scale (default 1) the kernel multiplies by as a float32 scalar: an error naming
    ``scale`` where float32 holds it as inf (the bound's check, :func:`rep_units`)."""
    sc = resolve_scale(scale, d_k, default=1.0)
    rep_units(sc, Format.of("fp32"))  # raises "scale: ... overflows the compute format fp32"
    return sc


def precision_for(dtype: torch.dtype, interpreted: bool) -> Precision:
    """:func:`attnprec.kernels._common.precision_for`, with the sums declared as values
    (``sums="linear"``): the state holds ``S``, ``z`` in float32, never their logs."""
    return replace(_common.precision_for(dtype, interpreted), sums="linear")


#: Most segments of a causal prefill: the starting states combine all pairs of segments
#: ([seg, seg + 1, d_k, d_v] float32).
MAX_SEGMENTS = 64


@triton.jit
def _query_part(qb, mx, cm, rm, sc):
    """exp(scale q_ic + m_c - M_i), M_i = max_c (scale q_ic + m_c); 0 on padding."""
    t = qb * sc + mx[None, :]
    keep = rm[:, None] & cm[None, :]
    t = tl.where(keep, t, float("-inf"))
    big = tl.max(t, axis=1)
    big = tl.where(rm, big, 0.0)
    return tl.where(keep, tl.exp(t - big[:, None]), 0.0)


@triton.jit
def _absorb(kb, vb, mx, s, z, rm, cm, sc):
    """Rescale the state to the new per-channel maximum and add the block's keys."""
    sk = tl.where(rm[:, None] & cm[None, :], kb * sc, float("-inf"))
    new = tl.maximum(mx, tl.max(sk, axis=0))
    new = tl.where(cm, new, 0.0)
    alpha = tl.where(mx == float("-inf"), 0.0, tl.exp(mx - new))
    ek = tl.where(rm[:, None] & cm[None, :], tl.exp(sk - new[None, :]), 0.0)
    s = s * alpha[:, None]
    s += tl.dot(tl.trans(ek), vb, input_precision="ieee")
    z = z * alpha
    z += tl.sum(ek, axis=0)
    return new, s, z


@triton.jit
def _load_state(m_ptr, s_ptr, z_ptr, dk, dv, BDK: tl.constexpr, BDV: tl.constexpr):
    """This program's state (m, S, z) and the channel offsets and masks that index it."""
    b = tl.program_id(0).to(tl.int64)  # (int32 offsets wrap past 2^31 elements)
    m_ptr += b * dk
    s_ptr += b * dk * dv
    z_ptr += b * dk
    co = tl.arange(0, BDK)
    cm = co < dk
    dvo = tl.arange(0, BDV)
    dvm = dvo < dv
    mx = tl.load(m_ptr + co, mask=cm, other=0.0)
    s = tl.load(s_ptr + co[:, None] * dv + dvo[None, :], mask=cm[:, None] & dvm[None, :],
                other=0.0)  # fmt: skip
    z = tl.load(z_ptr + co, mask=cm, other=0.0)
    return co, cm, dvo, dvm, mx, s, z


@triton.jit
def _store_state(m_ptr, s_ptr, z_ptr, dk, dv, co, cm, dvo, dvm, mx, s, z):
    """Write back what :func:`_load_state` read."""
    b = tl.program_id(0).to(tl.int64)  # (int32 offsets wrap past 2^31 elements)
    m_ptr += b * dk
    s_ptr += b * dk * dv
    z_ptr += b * dk
    tl.store(m_ptr + co, mx, mask=cm)
    tl.store(s_ptr + co[:, None] * dv + dvo[None, :], s, mask=cm[:, None] & dvm[None, :])
    tl.store(z_ptr + co, z, mask=cm)


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _log_causal(q_ptr, k_ptr, v_ptr, o_ptr, m_ptr, s_ptr, z_ptr, n, dk, dv, sc,
                BF16: tl.constexpr, BLK: tl.constexpr, BDK: tl.constexpr,
                BDV: tl.constexpr):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)  # (int32 offsets wrap past 2^31 elements)
    q_ptr += b * n * dk
    k_ptr += b * n * dk
    v_ptr += b * n * dv
    o_ptr += b * n * dv
    co, cm, dvo, dvm, mx, s, z = _load_state(m_ptr, s_ptr, z_ptr, dk, dv, BDK, BDV)
    for c0 in range(0, n, BLK):
        rows = c0 + tl.arange(0, BLK)
        rm = rows < n
        xmask = rm[:, None] & cm[None, :]
        vis = (rows[None, :] <= rows[:, None]) & rm[:, None]  # key j visible to query i
        qb = tl.load(q_ptr + rows[:, None] * dk + co[None, :], mask=xmask, other=0.0)
        kb = tl.load(k_ptr + rows[:, None] * dk + co[None, :], mask=xmask, other=0.0)
        vb = tl.load(v_ptr + rows[:, None] * dv + dvo[None, :], mask=rm[:, None] & dvm[None, :],
                     other=0.0).to(tl.float32)  # fmt: skip
        sq = qb.to(tl.float32) * sc
        sk = tl.where(xmask, kb.to(tl.float32) * sc, float("-inf"))
        # Per-row shift M_i: the largest exponent query i meets, from the carried state
        # (sq + m_c) or a visible key of this chunk (sq + max_{j<=i} sk_jc: rounding is
        # monotone, so this is the largest rounded sq + sk_j). Keys after i do not enter,
        # so the normalizer keeps a term exp(0) = 1 and never underflows.
        t = tl.where(xmask & (mx > float("-inf"))[None, :], sq + mx[None, :], float("-inf"))
        pm = tl.associative_scan(sk, 0, _maximum)
        tp = tl.where(xmask, sq + pm, float("-inf"))
        big = tl.maximum(tl.max(t, axis=1), tl.max(tp, axis=1))
        big = tl.where(rm, big, 0.0)
        eq = tl.where(t > float("-inf"), tl.exp(t - big[:, None]), 0.0)
        # Intra-chunk weights a_ij = sum_c exp(sq_ic + sk_jc - M_i), one channel at a time
        # (columns reloaded: [BLK, BLK] tiles, no [BLK, BLK, d_k] block).
        a = tl.zeros([BLK, BLK], dtype=tl.float32)
        for c in range(0, dk):
            qc = tl.load(q_ptr + rows * dk + c, mask=rm, other=0.0).to(tl.float32) * sc
            kc = tl.load(k_ptr + rows * dk + c, mask=rm, other=0.0).to(tl.float32) * sc
            a += tl.exp(tl.where(vis, qc[:, None] + kc[None, :] - big[:, None], float("-inf")))
        # a v with non-finite values zeroed, so a masked 0 * NaN cannot reach earlier
        # queries; rows that do see a non-finite value take the plain product.
        fin = tl.abs(vb) < float("inf")
        seen = tl.cumsum((~fin).to(tl.int32), axis=0) > 0
        av = tl.dot(a, tl.where(fin, vb, 0.0), input_precision="ieee")
        av = tl.where(seen, tl.dot(a, vb, input_precision="ieee"), av)
        num = tl.dot(eq, s, input_precision="ieee") + av
        den = tl.sum(eq * z[None, :], axis=1) + tl.sum(a, axis=1)
        store_quotient(o_ptr, num, den, rows, rm, dvo, dvm, dv, BF16)
        mx, s, z = _absorb(kb.to(tl.float32), vb, mx, s, z, rm, cm, sc)
    _store_state(m_ptr, s_ptr, z_ptr, dk, dv, co, cm, dvo, dvm, mx, s, z)


@triton.jit
def _log_state(k_ptr, v_ptr, m_ptr, s_ptr, z_ptr, n, dk, dv, sc,
               BLK: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)  # (int32 offsets wrap past 2^31 elements)
    k_ptr += b * n * dk
    v_ptr += b * n * dv
    co, cm, dvo, dvm, mx, s, z = _load_state(m_ptr, s_ptr, z_ptr, dk, dv, BDK, BDV)
    for c0 in range(0, n, BLK):
        rows = c0 + tl.arange(0, BLK)
        rm = rows < n
        kb = tl.load(k_ptr + rows[:, None] * dk + co[None, :], mask=rm[:, None] & cm[None, :],
                     other=0.0).to(tl.float32)  # fmt: skip
        vb = tl.load(v_ptr + rows[:, None] * dv + dvo[None, :], mask=rm[:, None] & dvm[None, :],
                     other=0.0).to(tl.float32)  # fmt: skip
        mx, s, z = _absorb(kb, vb, mx, s, z, rm, cm, sc)
    _store_state(m_ptr, s_ptr, z_ptr, dk, dv, co, cm, dvo, dvm, mx, s, z)


@triton.jit
def _log_query(q_ptr, o_ptr, m_ptr, s_ptr, z_ptr, n, dk, dv, sc,
               BF16: tl.constexpr, BLK: tl.constexpr, BDK: tl.constexpr,
               BDV: tl.constexpr):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)  # (int32 offsets wrap past 2^31 elements)
    rows = tl.program_id(1) * BLK + tl.arange(0, BLK)
    rm = rows < n
    q_ptr += b * n * dk
    o_ptr += b * n * dv
    co, cm, dvo, dvm, mx, s, z = _load_state(m_ptr, s_ptr, z_ptr, dk, dv, BDK, BDV)
    qb = tl.load(q_ptr + rows[:, None] * dk + co[None, :], mask=rm[:, None] & cm[None, :],
                 other=0.0).to(tl.float32)  # fmt: skip
    eq = _query_part(qb, mx, cm, rm, sc)
    num = tl.dot(eq, s, input_precision="ieee")
    den = tl.sum(eq * z[None, :], axis=1)
    store_quotient(o_ptr, num, den, rows, rm, dvo, dvm, dv, BF16)


@triton.jit
def _log_decode(q_ptr, k_ptr, v_ptr, o_ptr, m_ptr, s_ptr, z_ptr, nb, dk, dv, sc,
                BF16: tl.constexpr, BR: tl.constexpr, BDK: tl.constexpr,
                BDV: tl.constexpr):  # fmt: skip
    """One token for each of ``BR`` batch rows: the causal graph with a one-token chunk.

    Row ``r`` reads ``q, k [nb, dk]``, ``v [nb, dv]`` and its state ``(m, S, z)``, writes
    ``o [nb, dv]`` and the state (in place). The shift ``M`` is the largest of
    ``scale q_c + m_c`` and ``scale (q_c + k_c)``, so the token's own term keeps the
    normalizer >= 1, as in ``_log_causal``; then the token is absorbed as ``_absorb`` does.
    """
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rm = rows < nb
    r64 = rows.to(tl.int64)
    co = tl.arange(0, BDK)
    cm = co < dk
    dvo = tl.arange(0, BDV)
    dvm = dvo < dv
    xm = rm[:, None] & cm[None, :]
    vm = rm[:, None] & dvm[None, :]
    sm = xm[:, :, None] & dvm[None, None, :]
    xo = r64[:, None] * dk + co[None, :]
    so = r64[:, None, None] * (dk * dv) + co[None, :, None] * dv + dvo[None, None, :]
    mx = tl.load(m_ptr + xo, mask=xm, other=0.0)
    s = tl.load(s_ptr + so, mask=sm, other=0.0)
    z = tl.load(z_ptr + xo, mask=xm, other=0.0)
    sq = tl.load(q_ptr + xo, mask=xm, other=0.0).to(tl.float32) * sc
    sk = tl.where(xm, tl.load(k_ptr + xo, mask=xm, other=0.0).to(tl.float32) * sc,
                  float("-inf"))  # fmt: skip
    vb = tl.load(v_ptr + r64[:, None] * dv + dvo[None, :], mask=vm, other=0.0).to(tl.float32)
    t = tl.where(xm & (mx > float("-inf")), sq + mx, float("-inf"))
    tp = tl.where(xm, sq + sk, float("-inf"))
    big = tl.maximum(tl.max(t, axis=1), tl.max(tp, axis=1))
    big = tl.where(rm, big, 0.0)
    eq = tl.where(t > float("-inf"), tl.exp(t - big[:, None]), 0.0)
    a = tl.sum(tl.exp(tp - big[:, None]), axis=1)  # the token's own weight, >= exp(0) = 1
    num = tl.sum(eq[:, :, None] * s, axis=1) + a[:, None] * vb
    den = tl.sum(eq * z, axis=1) + a
    store_quotient(o_ptr, num, den, rows, rm, dvo, dvm, dv, BF16)
    # absorb the token: raise the maxima, rescale the state, add exp(sk - m_new) v
    new = tl.where(xm, tl.maximum(mx, sk), 0.0)
    alpha = tl.where(mx == float("-inf"), 0.0, tl.exp(mx - new))
    ek = tl.where(xm, tl.exp(sk - new), 0.0)
    s = s * alpha[:, :, None] + ek[:, :, None] * vb[:, None, :]
    z = z * alpha + ek
    tl.store(m_ptr + xo, new, mask=xm)
    tl.store(s_ptr + so, s, mask=sm)
    tl.store(z_ptr + xo, z, mask=xm)


#: Float32 elements of the largest register tile a decode program holds (``[BR, BDK, BDV]``).
DECODE_TILE = 8192


def decode_rows(tile: int) -> int:
    """Batch rows per decode program for a per-row tile of ``tile`` elements (a power of two
    from 1 to 16): small heads share a program, so a launch has few programs per SM."""
    br = 1
    while br < 16 and 2 * br * tile <= DECODE_TILE:
        br *= 2
    return br


def decode_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    y: torch.Tensor,
    state: tuple[torch.Tensor, ...],
    sc: float,
) -> None:
    """Launch :func:`_log_decode` on flattened ``q, k [nb, d_k]``, ``v, y [nb, d_v]`` and the
    state ``(m [nb, d_k], S [nb, d_k, d_v], z [nb, d_k])`` (updated in place). Allocates
    nothing, so a CUDA graph can capture it."""
    mx, s, z = state
    nb, dk = q.shape
    dv = v.shape[1]
    bdk, bdv = next_pow2(dk), next_pow2(dv)
    br = decode_rows(bdk * bdv)
    _log_decode[(triton.cdiv(nb, br),)](q, k, v, y, mx, s, z, nb, dk, dv, sc,
                                        BF16=y.dtype == torch.bfloat16, BR=br, BDK=bdk,
                                        BDV=bdv)  # fmt: skip


def _segmented(qq, kk, vv, mx, s, z, seg, head, sc, bf16, meta):  # type: ignore[no-untyped-def]
    """Causal outputs of the first ``head`` tokens in ``seg`` parallel segments; ``(mx, s,
    z)`` become the state after them.

    Each segment's keys are absorbed from an empty state (``_log_state``); segment ``p``
    then starts from ``m = M_p``, the running maximum over the carried state and the
    segments before it, and ``S = sum_e exp(m_e - M_p) S_e`` over those states (one
    rescaling each, exponent <= 0, like ``_absorb``'s), before its causal program runs.
    Along any key's path the maxima still increase monotonically (the rescaling exponents
    telescope) and no more rescalings occur than in one sequential pass, so the graph
    bound of docs/kernels.md holds unchanged.
    """
    nb, dk, dv = s.shape
    ln = head // seg

    def split(x: torch.Tensor) -> torch.Tensor:
        return x[:, :head].reshape(nb * seg, ln, x.shape[-1]).contiguous()

    sq, sk, sv = split(qq), split(kk), split(vv)
    m_t = torch.full((nb * seg, dk), float("-inf"), dtype=torch.float32, device=s.device)
    s_t = torch.zeros(nb * seg, dk, dv, dtype=torch.float32, device=s.device)
    z_t = torch.zeros(nb * seg, dk, dtype=torch.float32, device=s.device)
    _log_state[(nb * seg,)](sk, sv, m_t, s_t, z_t, ln, dk, dv, sc, **meta)
    # entries e = 0 (carried state), 1..seg (segment e - 1); segment p combines e <= p
    m_all = torch.cat([mx[:, None], m_t.view(nb, seg, dk)], 1)
    s_all = torch.cat([s[:, None], s_t.view(nb, seg, dk, dv)], 1)
    z_all = torch.cat([z[:, None], z_t.view(nb, seg, dk)], 1)
    m_start = torch.cummax(m_all, 1).values[:, :seg]  # [nb, seg, dk], NaN propagates
    e_idx = torch.arange(seg + 1, device=s.device)
    use = (e_idx[None, :] <= torch.arange(seg, device=s.device)[:, None])[None, :, :, None]
    use = use & (m_all != float("-inf"))[:, None]  # empty entries add nothing (S = 0)
    arg = m_all[:, None] - m_start[:, :, None]  # [nb, seg, seg + 1, dk]
    w = torch.exp(torch.where(use, arg, 0.0))
    # unused entries are dropped, not multiplied by 0: a later segment's NaN stays there
    s_start = torch.where(use[..., None], w[..., None] * s_all[:, None], 0.0).sum(2)
    z_start = torch.where(use, w * z_all[:, None], 0.0).sum(2)
    s_start = s_start.reshape(nb * seg, dk, dv).contiguous()
    z_start = z_start.reshape(nb * seg, dk).contiguous()
    m_start = m_start.reshape(nb * seg, dk).contiguous()
    ys = torch.empty(nb * seg, ln, dv, dtype=qq.dtype, device=qq.device)
    _log_causal[(nb * seg,)](sq, sk, sv, ys, m_start, s_start, z_start, ln, dk, dv, sc,
                             BF16=bf16, **meta)  # fmt: skip
    mx.copy_(m_start.view(nb, seg, dk)[:, -1])
    s.copy_(s_start.view(nb, seg, dk, dv)[:, -1])
    z.copy_(z_start.view(nb, seg, dk)[:, -1])
    return ys.view(nb, head, dv)


def log_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    state: KernelState | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, KernelState]:
    r"""Heinsen log-space attention ``w_ij = sum_c exp(scale (q_ic + k_jc))``, any sign of v.

    Causal prefill in chunks of :data:`BLOCK` tokens: query ``i`` is shifted by
    ``M_i``, the largest ``scale (q_ic + k_jc)`` over the keys ``j <= i`` (the carried
    state's per-channel maxima ``m_c`` and the chunk's keys up to ``i``); the state part
    uses ``exp(scale q_ic + m_c - M_i)`` against the carried sums, the chunk part
    ``sum_c exp(scale (q_ic + k_jc) - M_i)`` per visible key, so no exponential exceeds 1
    and the normalizer is at least 1. Then the chunk is absorbed: ``m_c`` raised to cover
    it, the state rescaled by ``exp(m_old - m_new)``. A long prefill of few sequences runs in
    parallel segments whose starting states combine the earlier segments' states, each
    rescaled once to the running maximum. The non-causal form builds the state
    over all keys, then answers every query from it; the decode step (``state=``, one
    token) costs O(d_k d_v).

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``[..., n_q, d_k]``, ``[..., n_k, d_k]``, ``[..., n_k, d_v]``; float16, bfloat16 or
        float32 on CUDA (CPU under ``TRITON_INTERPRET=1``). Non-contiguous tensors are copied.
    causal : bool
        Query ``i`` sees keys ``j <= i`` (requires ``n_q == n_k``).
    scale : float, optional
        Defaults to 1 (the published form has none).
    state, return_state
        Causal only: continue from / return the state (see :class:`KernelState`).

    Returns
    -------
    torch.Tensor or (torch.Tensor, KernelState)
        ``[..., n_q, d_v]`` in the input dtype.

    Notes
    -----
    Error: elementwise within ``attnprec.analysis.bounds.graphs.rounding_bound("log", q, k,
    v, precision_for(dtype, interpreted), scale=scale)`` of the exact quotient of the stored
    inputs (graph in docs/kernels.md). Keys far below the query's largest term underflow
    to 0, and the bound counts that; it is finite for finite inputs unless they overflow
    float32. A NaN reaches only the outputs that depend on it (a query its row, a key the
    rows that see it, a value its column of those rows); a row that sees an infinite
    value gets inf or NaN.
    """
    check_state_args(causal, state, return_state)
    qq, kk, vv, batch = prepare_qkv(q, k, v, causal)
    nb, n_q, dk = qq.shape
    n_k, dv = kk.shape[1], vv.shape[2]
    sc = kernel_scale(scale, dk)
    key = (dk, dv, sc, qq.dtype)
    dev = qq.device
    if state is not None:
        mx, s, z = state.check("log", batch, key)
    else:
        mx = torch.full((nb, dk), float("-inf"), dtype=torch.float32, device=dev)
        s = torch.zeros(nb, dk, dv, dtype=torch.float32, device=dev)
        z = torch.zeros(nb, dk, dtype=torch.float32, device=dev)
    y = torch.empty(nb, n_q, dv, dtype=qq.dtype, device=dev)
    meta = dict(BLK=BLOCK, BDK=next_pow2(dk), BDV=next_pow2(dv))
    bf16 = qq.dtype == torch.bfloat16
    if nb > 0 and n_q > 0:
        if causal:
            seg = segments(nb, n_q, BLOCK, MAX_SEGMENTS * dk * (dv + 2), MAX_SEGMENTS)
            head = seg * (n_q // (seg * BLOCK)) * BLOCK if seg > 1 else 0
            if head:
                y[:, :head] = _segmented(qq, kk, vv, mx, s, z, seg, head, sc, bf16, meta)
            if head < n_q:  # the tail (or the whole sequence) continues from the state
                tail = [x[:, head:].contiguous() for x in (qq, kk, vv)]
                yt = y[:, head:] if head == 0 else torch.empty_like(y[:, head:])
                _log_causal[(nb,)](*tail, yt, mx, s, z, n_q - head, dk, dv, sc, BF16=bf16,
                                   **meta)  # fmt: skip
                if head:  # (yt is y itself otherwise: no copy)
                    y[:, head:] = yt
        else:
            if n_k > 0:
                _log_state[(nb,)](kk, vv, mx, s, z, n_k, dk, dv, sc, **meta)
            grid = (nb, triton.cdiv(n_q, BLOCK))
            _log_query[grid](qq, y, mx, s, z, n_q, dk, dv, sc, BF16=bf16, **meta)
    return finish(y, "log", (mx, s, z), batch, key, return_state)
