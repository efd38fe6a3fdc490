"""Chunked linear attention over features: given (linear) or packed monomials (taylor).

Features are ``MODE = 0``: loaded from ``phi_q [B, n, m]``, ``phi_k [B, n, m]``;
``MODE = 1``: the packed monomials ``x^alpha`` computed in the kernel from ``x [B, n, d]`` and
an index table ``idx [m, PMAX]`` (index ``d`` stands for the factor 1), query features
multiplied by the weight table ``w [m]`` (``c_p scale^p p!/alpha!`` rounded to float32).
The state is ``S [B, m, d_v]`` and ``z [B, m]`` in float32 global memory; no ``[n, m]``
tensor is ever written. Computation graph: docs/kernels.md, "Featured kernels".
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnprec.kernels._common import BLOCK, next_pow2, segments
from attnprec.kernels._triton import store_quotient

BLOCK_F = 64


@triton.jit
def _features(x_ptr, rows, rmask, stride, f0, m, idx_ptr, w_ptr,
              MODE: tl.constexpr, D: tl.constexpr, PMAX: tl.constexpr,
              WEIGHT: tl.constexpr, BR: tl.constexpr, BF: tl.constexpr):  # fmt: skip
    fo = f0 + tl.arange(0, BF)
    fmask = fo < m
    keep = rmask[:, None] & fmask[None, :]
    if MODE == 0:
        ph = tl.load(x_ptr + rows[:, None] * stride + fo[None, :], mask=keep, other=0.0)
        ph = ph.to(tl.float32)
    else:
        ph = tl.full((BR, BF), 1.0, tl.float32)
        for t in tl.static_range(PMAX):
            ix = tl.load(idx_ptr + fo * PMAX + t, mask=fmask, other=D)
            val = tl.load(
                x_ptr + rows[:, None] * stride + ix[None, :],
                mask=keep & (ix < D)[None, :],
                other=1.0,
            )
            ph = ph * val.to(tl.float32)
        if WEIGHT:
            w = tl.load(w_ptr + fo, mask=fmask, other=0.0)
            ph = ph * w[None, :]
        ph = tl.where(keep, ph, 0.0)
    return ph


@triton.jit
def _featured_causal(q_ptr, k_ptr, v_ptr, o_ptr, s_ptr, z_ptr, idx_ptr, w_ptr,
                     n, m, dv, stride_x,
                     MODE: tl.constexpr, D: tl.constexpr, PMAX: tl.constexpr,
                     BF16: tl.constexpr, BLK: tl.constexpr, BF: tl.constexpr,
                     BDV: tl.constexpr):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)  # (int32 offsets wrap past 2^31 elements)
    q_ptr += b * n * stride_x
    k_ptr += b * n * stride_x
    v_ptr += b * n * dv
    o_ptr += b * n * dv
    s_ptr += b * m * dv
    z_ptr += b * m
    dvo = tl.arange(0, BDV)
    dvm = dvo < dv
    for c0 in range(0, n, BLK):
        rows = c0 + tl.arange(0, BLK)
        rm = rows < n
        vb = tl.load(v_ptr + rows[:, None] * dv + dvo[None, :], mask=rm[:, None] & dvm[None, :],
                     other=0.0).to(tl.float32)  # fmt: skip
        a = tl.zeros((BLK, BLK), tl.float32)
        num = tl.zeros((BLK, BDV), tl.float32)
        den = tl.zeros((BLK,), tl.float32)
        for f0 in range(0, m, BF):
            fq = _features(q_ptr, rows, rm, stride_x, f0, m, idx_ptr, w_ptr,
                           MODE, D, PMAX, True, BLK, BF)  # fmt: skip
            fk = _features(k_ptr, rows, rm, stride_x, f0, m, idx_ptr, w_ptr,
                           MODE, D, PMAX, False, BLK, BF)  # fmt: skip
            fo = f0 + tl.arange(0, BF)
            fm = fo < m
            sp = s_ptr + fo[:, None] * dv + dvo[None, :]
            smask = fm[:, None] & dvm[None, :]
            s = tl.load(sp, mask=smask, other=0.0)
            z = tl.load(z_ptr + fo, mask=fm, other=0.0)
            a += tl.dot(fq, tl.trans(fk), input_precision="ieee")
            num += tl.dot(fq, s, input_precision="ieee")
            den += tl.sum(fq * z[None, :], axis=1)
            tl.store(sp, s + tl.dot(tl.trans(fk), vb, input_precision="ieee"), mask=smask)
            tl.store(z_ptr + fo, z + tl.sum(fk, axis=0), mask=fm)
        a = tl.where(rows[None, :] <= rows[:, None], a, 0.0)
        # a v with non-finite values zeroed, so a masked 0 * NaN cannot reach earlier
        # queries; rows that do see a non-finite value take the plain product (log.py)
        fin = tl.abs(vb) < float("inf")
        seen = tl.cumsum((~fin).to(tl.int32), axis=0) > 0
        av = tl.dot(a, tl.where(fin, vb, 0.0), input_precision="ieee")
        num += tl.where(seen, tl.dot(a, vb, input_precision="ieee"), av)
        den += tl.sum(a, axis=1)
        store_quotient(o_ptr, num, den, rows, rm, dvo, dvm, dv, BF16)


@triton.jit
def _featured_state(k_ptr, v_ptr, s_ptr, z_ptr, idx_ptr, w_ptr, n, m, dv, stride_x,
                    MODE: tl.constexpr, D: tl.constexpr, PMAX: tl.constexpr,
                    BLK: tl.constexpr, BF: tl.constexpr, BDV: tl.constexpr):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)  # (int32 offsets wrap past 2^31 elements)
    f0 = tl.program_id(1) * BF
    k_ptr += b * n * stride_x
    v_ptr += b * n * dv
    s_ptr += b * m * dv
    z_ptr += b * m
    dvo = tl.arange(0, BDV)
    dvm = dvo < dv
    fo = f0 + tl.arange(0, BF)
    fm = fo < m
    sp = s_ptr + fo[:, None] * dv + dvo[None, :]
    smask = fm[:, None] & dvm[None, :]
    s = tl.load(sp, mask=smask, other=0.0)
    z = tl.load(z_ptr + fo, mask=fm, other=0.0)
    for c0 in range(0, n, BLK):
        rows = c0 + tl.arange(0, BLK)
        rm = rows < n
        vb = tl.load(v_ptr + rows[:, None] * dv + dvo[None, :], mask=rm[:, None] & dvm[None, :],
                     other=0.0).to(tl.float32)  # fmt: skip
        fk = _features(k_ptr, rows, rm, stride_x, f0, m, idx_ptr, w_ptr,
                       MODE, D, PMAX, False, BLK, BF)  # fmt: skip
        s += tl.dot(tl.trans(fk), vb, input_precision="ieee")
        z += tl.sum(fk, axis=0)
    tl.store(sp, s, mask=smask)
    tl.store(z_ptr + fo, z, mask=fm)


@triton.jit
def _featured_query(q_ptr, o_ptr, s_ptr, z_ptr, idx_ptr, w_ptr, n, m, dv, stride_x,
                    MODE: tl.constexpr, D: tl.constexpr, PMAX: tl.constexpr,
                    BF16: tl.constexpr, BLK: tl.constexpr, BF: tl.constexpr,
                    BDV: tl.constexpr):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)  # (int32 offsets wrap past 2^31 elements)
    rows = tl.program_id(1) * BLK + tl.arange(0, BLK)
    rm = rows < n
    q_ptr += b * n * stride_x
    o_ptr += b * n * dv
    s_ptr += b * m * dv
    z_ptr += b * m
    dvo = tl.arange(0, BDV)
    dvm = dvo < dv
    num = tl.zeros((BLK, BDV), tl.float32)
    den = tl.zeros((BLK,), tl.float32)
    for f0 in range(0, m, BF):
        fq = _features(q_ptr, rows, rm, stride_x, f0, m, idx_ptr, w_ptr,
                       MODE, D, PMAX, True, BLK, BF)  # fmt: skip
        fo = f0 + tl.arange(0, BF)
        fm = fo < m
        s = tl.load(s_ptr + fo[:, None] * dv + dvo[None, :], mask=fm[:, None] & dvm[None, :],
                    other=0.0)  # fmt: skip
        z = tl.load(z_ptr + fo, mask=fm, other=0.0)
        num += tl.dot(fq, s, input_precision="ieee")
        den += tl.sum(fq * z[None, :], axis=1)
    store_quotient(o_ptr, num, den, rows, rm, dvo, dvm, dv, BF16)


@triton.jit
def _featured_decode(q_ptr, k_ptr, v_ptr, o_ptr, s_ptr, z_ptr, idx_ptr, w_ptr,
                     nb, m, dv, stride_x,
                     MODE: tl.constexpr, D: tl.constexpr, PMAX: tl.constexpr,
                     BF16: tl.constexpr, BR: tl.constexpr, BF: tl.constexpr,
                     BDV: tl.constexpr):  # fmt: skip
    """One token for each of ``BR`` batch rows: the causal graph with a one-token chunk.

    Row ``r`` reads its token ``x [nb, stride_x]`` (features or inputs), ``v [nb, dv]`` and
    its state ``S [m, dv]``, ``z [m]``; per block of ``BF`` features:
    ``num += phi_q S``, ``den += phi_q . z``, ``a += phi_q . phi_k`` (the token's own
    weight), then ``S += phi_k v``, ``z += phi_k`` (stored in place). Finally
    ``y = (num + a v) / (den + a)``. The features are ``_features``', rows being batch rows.
    """
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rm = rows < nb
    r64 = rows.to(tl.int64)
    dvo = tl.arange(0, BDV)
    dvm = dvo < dv
    vb = tl.load(v_ptr + r64[:, None] * dv + dvo[None, :], mask=rm[:, None] & dvm[None, :],
                 other=0.0).to(tl.float32)  # fmt: skip
    num = tl.zeros((BR, BDV), tl.float32)
    den = tl.zeros((BR,), tl.float32)
    a = tl.zeros((BR,), tl.float32)
    for f0 in range(0, m, BF):
        fq = _features(q_ptr, r64, rm, stride_x, f0, m, idx_ptr, w_ptr,
                       MODE, D, PMAX, True, BR, BF)  # fmt: skip
        fk = _features(k_ptr, r64, rm, stride_x, f0, m, idx_ptr, w_ptr,
                       MODE, D, PMAX, False, BR, BF)  # fmt: skip
        fo = f0 + tl.arange(0, BF)
        fm = fo < m
        zmask = rm[:, None] & fm[None, :]
        smask = zmask[:, :, None] & dvm[None, None, :]
        sp = s_ptr + r64[:, None, None] * m * dv + fo[None, :, None] * dv + dvo[None, None, :]
        zp = z_ptr + r64[:, None] * m + fo[None, :]
        s = tl.load(sp, mask=smask, other=0.0)
        z = tl.load(zp, mask=zmask, other=0.0)
        a += tl.sum(fq * fk, axis=1)
        num += tl.sum(fq[:, :, None] * s, axis=1)
        den += tl.sum(fq * z, axis=1)
        tl.store(sp, s + fk[:, :, None] * vb[:, None, :], mask=smask)
        tl.store(zp, z + fk, mask=zmask)
    num += a[:, None] * vb
    den += a
    store_quotient(o_ptr, num, den, rows, rm, dvo, dvm, dv, BF16)


#: Float32 elements of the largest register tile a decode program holds (``[BR, BF, BDV]``).
DECODE_TILE = 8192


def decode_tiles(bdv: int) -> tuple[int, int]:
    """(batch rows per decode program, features per block) for ``BDV = bdv``: the
    ``[BR, BF, BDV]`` state tile within :data:`DECODE_TILE` elements, BF from 16 to 64,
    BR a power of two from 1 to 16."""
    bf = max(16, min(BLOCK_F, DECODE_TILE // bdv))
    br = 1
    while br < 16 and 2 * br * bf * bdv <= DECODE_TILE:
        br *= 2
    return br, bf


def decode_launch(
    xq: torch.Tensor,
    xk: torch.Tensor,
    v: torch.Tensor,
    y: torch.Tensor,
    state: tuple[torch.Tensor, ...],
    idx: torch.Tensor | None = None,
    w: torch.Tensor | None = None,
) -> None:
    """Launch :func:`_featured_decode` on flattened ``xq, xk [nb, m or d]``, ``v, y [nb,
    d_v]`` and the state ``(S [nb, m, d_v], z [nb, m])`` (updated in place); ``idx``, ``w``
    as in :func:`run_featured` (None: given features). Allocates nothing when ``idx`` is
    given or the features are (a CUDA graph can capture it)."""
    s, z = state
    nb, stride = xq.shape
    m, dv = s.shape[1], s.shape[2]
    bdv = next_pow2(dv)
    br, bf = decode_tiles(bdv)
    mode = 0 if idx is None else 1
    dummy = s  # never read: MODE 0 loads no table
    _featured_decode[(triton.cdiv(nb, br),)](
        xq, xk, v, y, s, z, idx if idx is not None else dummy, w if w is not None else dummy,
        nb, m, dv, stride, MODE=mode, D=stride if mode else 1,
        PMAX=idx.shape[1] if idx is not None else 1, BF16=y.dtype == torch.bfloat16,
        BR=br, BF=bf, BDV=bdv,
    )  # fmt: skip


def _segmented(xq, xk, v, s, z, seg, head, idx, w, bf16, meta):  # type: ignore[no-untyped-def]
    """Causal outputs of the first ``head`` tokens in ``seg`` parallel segments; ``(s, z)``
    become the state after them. Every key still enters each later state as one term of a
    sum (in another order), so the graph bound of docs/kernels.md is unchanged."""
    nb, m, dv = s.shape
    ln = head // seg

    def split(x: torch.Tensor) -> torch.Tensor:
        return x[:, :head].reshape(nb * seg, ln, x.shape[-1]).contiguous()

    sq, sk, sv = split(xq), split(xk), split(v)
    ds = torch.zeros(nb * seg, m, dv, dtype=torch.float32, device=s.device)
    dz = torch.zeros(nb * seg, m, dtype=torch.float32, device=s.device)
    _featured_state[(nb * seg, triton.cdiv(m, BLOCK_F))](sk, sv, ds, dz, idx, w, ln, m, dv,
                                                         sk.shape[-1], **meta)  # fmt: skip
    # Segment p starts from the carried state plus the totals of segments < p.
    s_seg = torch.cat([s[:, None], ds.view(nb, seg, m, dv)[:, :-1]], 1).cumsum(1)
    z_seg = torch.cat([z[:, None], dz.view(nb, seg, m)[:, :-1]], 1).cumsum(1)
    s_seg, z_seg = s_seg.reshape(nb * seg, m, dv), z_seg.reshape(nb * seg, m)
    ys = torch.empty(nb * seg, ln, dv, dtype=xq.dtype, device=xq.device)
    _featured_causal[(nb * seg,)](sq, sk, sv, ys, s_seg, z_seg, idx, w, ln, m, dv,
                                  sq.shape[-1], BF16=bf16, **meta)  # fmt: skip
    s.copy_(s_seg.view(nb, seg, m, dv)[:, -1])
    z.copy_(z_seg.view(nb, seg, m)[:, -1])
    return ys.view(nb, head, dv)


def run_featured(
    xq: torch.Tensor,
    xk: torch.Tensor,
    v: torch.Tensor,
    m: int,
    *,
    causal: bool,
    state: tuple[torch.Tensor, torch.Tensor] | None,
    idx: torch.Tensor | None = None,
    w: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Run the featured kernels on flattened ``[B, n, .]`` operands.

    ``xq, xk``: features ``[B, n, m]`` (``idx is None``) or inputs ``[B, n, d]`` with the
    monomial tables ``idx [m, PMAX]`` (int32) and ``w [m]`` (float32). ``state``: ``(S, z)``
    to continue from (causal), updated in place. Returns ``(y [B, n_q, d_v], (S, z))``.
    """
    nb, n_q, stride = xq.shape
    n_k, dv = v.shape[1], v.shape[2]
    mode = 0 if idx is None else 1
    d = stride if mode else 1
    pmax = idx.shape[1] if idx is not None else 1
    dummy_i = idx if idx is not None else torch.zeros(1, dtype=torch.int32, device=xq.device)
    dummy_w = w if w is not None else torch.zeros(1, dtype=torch.float32, device=xq.device)
    if state is None:
        s = torch.zeros(nb, m, dv, dtype=torch.float32, device=xq.device)
        z = torch.zeros(nb, m, dtype=torch.float32, device=xq.device)
    else:
        s, z = state
    y = torch.empty(nb, n_q, dv, dtype=xq.dtype, device=xq.device)
    meta = dict(MODE=mode, D=d, PMAX=pmax, BLK=BLOCK, BF=BLOCK_F, BDV=next_pow2(dv))
    bf16 = xq.dtype == torch.bfloat16
    if nb == 0 or n_q == 0:
        return y, (s, z)
    if causal:
        seg = segments(nb, n_q, BLOCK, 2 * (m + 1) * max(dv, 1))  # totals and starts
        head = 0
        if seg > 1:
            head = seg * (n_q // (seg * BLOCK)) * BLOCK
            y[:, :head] = _segmented(xq, xk, v, s, z, seg, head, dummy_i, dummy_w, bf16, meta)
        if head < n_q:  # the tail (or the whole sequence) continues from the state
            tail = [x[:, head:].contiguous() for x in (xq, xk, v)]
            yt = y[:, head:] if head == 0 else torch.empty_like(y[:, head:])
            _featured_causal[(nb,)](*tail, yt, s, z, dummy_i, dummy_w, n_q - head, m, dv,
                                    stride, BF16=bf16, **meta)  # fmt: skip
            if head:  # (yt is y itself otherwise: no copy)
                y[:, head:] = yt
    else:
        if n_k > 0:
            grid = (nb, triton.cdiv(m, BLOCK_F))
            _featured_state[grid](xk, v, s, z, dummy_i, dummy_w, n_k, m, dv, stride, **meta)
        grid = (nb, triton.cdiv(n_q, BLOCK))
        _featured_query[grid](xq, y, s, z, dummy_i, dummy_w, n_q, m, dv, stride,
                              BF16=bf16, **meta)  # fmt: skip
    return y, (s, z)
