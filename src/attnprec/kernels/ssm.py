"""Triton kernels of the state-space methods: a chunked selective scan (Mamba-1) and the SSD
chunk kernel (Mamba-2). Storage float16, bfloat16 or float32 (every operand, the
parameters included, rounded once to it), a float32 state, float32 arithmetic, one
rounding at the output store (bfloat16 rounded explicitly, :func:`store_rounded`).

Selective scan: each program holds ``BD`` channels x ``BN`` states as rows; per chunk of
:data:`SCAN_T` tokens it forms the pairs ``(exp(delta A), B_bar u)`` and scans them with
the associative rule ``(a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2)``, then applies the
state carried from the previous chunk: every term passes at most ``t - s`` exps and
products (the recurrence's schedule, ``Precision(block=None)``). SSD: per chunk of
:data:`SSD_T` tokens the quadratic form with the chunk's segment sums (each a sum over
its own span, a masked cumulative sum, never a prefix difference), the state passed
between chunks (``Precision(block=SSD_T)``). Graphs and the bound: docs/bounds/ssm.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from attnprec._validate import check_bool, check_causal_only
from attnprec.analysis.precision import Format, Precision
from attnprec.attention.ssm import check_selective, check_ssd
from attnprec.kernels._common import (
    KERNEL_DTYPES,
    KernelState,
    check_kernel_tensor,
    check_state_args,
    flatten_batch,
    next_pow2,
)
from attnprec.kernels._triton import store_rounded

__all__ = [
    "selective_scan",
    "ssd",
    "precision_for",
    "ssd_precision_for",
    "SCAN_T",
    "SSD_T",
]

#: Tokens per chunk of the selective scan (one associative scan) and of SSD.
SCAN_T = 16
SSD_T = 16
#: Rows (channels x states) per selective-scan program, at most.
SCAN_ROWS = 256


def precision_for(dtype: torch.dtype, interpreted: bool = False) -> Precision:
    """The declaration of :func:`selective_scan`: storage ``dtype`` for every operand and
    the output, float32 compute and accumulate, round to nearest even at the store, any
    schedule of the recurrence (``block=None``: at most ``t - s`` exps and products on a
    term's path), the default elementary model (``exp``; zoh's ``expm1`` split as
    :func:`attnprec.analysis.bounds.ssm.expm1_error` covers). ``interpreted`` does not
    change it (bfloat16 stores are rounded explicitly)."""
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"dtype: kernels take float16, bfloat16 or float32, got {dtype}")
    check_bool("interpreted", interpreted)  # does not change the declaration
    fp32 = Format.of("fp32")
    return Precision(Format.of(dtype), fp32, fp32, "rne", block=None)


def ssd_precision_for(dtype: torch.dtype, interpreted: bool = False) -> Precision:
    """The declaration of :func:`ssd`: as :func:`precision_for`, with the schedule's block
    :data:`SSD_T` (chunks with span sums inside, states between)."""
    p = precision_for(dtype, interpreted)
    return Precision(p.storage, p.compute, p.accumulate, p.rounding, block=SSD_T)


# --- selective scan -----------------------------------------------------------------------


@triton.jit
def _expm1(x):
    """expm1(x) for x <= 0: Horner's degree-10 Taylor polynomial above -1/2, exp(x) - 1
    below (docs/bounds/ssm.md: within 32 u, or 1.55 k_e + 3.6 u)."""
    xs = tl.where(x > -0.5, x, 0.0)
    p = 1.0 / 3628800.0
    p = p * xs + 1.0 / 362880.0
    p = p * xs + 1.0 / 40320.0
    p = p * xs + 1.0 / 5040.0
    p = p * xs + 1.0 / 720.0
    p = p * xs + 1.0 / 120.0
    p = p * xs + 1.0 / 24.0
    p = p * xs + 1.0 / 6.0
    p = p * xs + 0.5
    p = p * xs + 1.0
    return tl.where(x > -0.5, p * xs, tl.exp(x) - 1.0)


@triton.jit
def _pair(a1, b1, a2, b2):
    # (x -> a1 x + b1) then (x -> a2 x + b2) is x -> a1 a2 x + (a2 b1 + b2)
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _selective_kernel(c_ptr, b_ptr, u_ptr, dl_ptr, a_ptr, d_ptr, y_ptr, h_ptr,
                      T, N, DV,
                      HAS_D: tl.constexpr, ZOH: tl.constexpr, LOAD_STATE: tl.constexpr,
                      STORE_STATE: tl.constexpr, BF16: tl.constexpr, BD: tl.constexpr,
                      BN: tl.constexpr, BT: tl.constexpr):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)  # (int32 offsets wrap past 2^31 elements)
    d0 = tl.program_id(1) * BD
    r = tl.arange(0, BD * BN)
    dd = d0 + r // BN  # the row's channel
    nn = r % BN  # and state
    rm = (dd < DV) & (nn < N)
    A = tl.load(a_ptr + dd * N + nn, mask=rm, other=-1.0).to(tl.float32)
    hoff = (b * DV + dd) * N + nn
    if LOAD_STATE:
        h = tl.load(h_ptr + hoff, mask=rm, other=0.0)
    else:
        h = tl.zeros((BD * BN,), tl.float32)
    if HAS_D:
        dsk = tl.load(d_ptr + d0 + tl.arange(0, BD), mask=d0 + tl.arange(0, BD) < DV, other=0.0)
        dsk = dsk.to(tl.float32)
    for t0 in range(0, T, BT):
        t = t0 + tl.arange(0, BT)
        tm = t < T
        m2 = rm[:, None] & tm[None, :]
        dl = tl.load(dl_ptr + (b * T + t[None, :]) * DV + dd[:, None], mask=m2, other=0.0)
        dl = dl.to(tl.float32)
        bb = tl.load(b_ptr + (b * T + t[None, :]) * N + nn[:, None], mask=m2, other=0.0)
        uu = tl.load(u_ptr + (b * T + t[None, :]) * DV + dd[:, None], mask=m2, other=0.0)
        L = dl * A[:, None]  # the log-gates delta A, [rows, BT]
        a = tl.exp(L)
        if ZOH:
            f = _expm1(L) / A[:, None]
        else:
            f = dl
        w = f * bb.to(tl.float32) * uu.to(tl.float32)  # B_bar u
        a = tl.where(m2, a, 1.0)
        w = tl.where(m2, w, 0.0)
        ac, wc = tl.associative_scan((a, w), 1, _pair)
        hs = ac * h[:, None] + wc  # the states of the chunk's tokens
        last = (t == tl.minimum(t0 + BT, T) - 1)[None, :]
        h = tl.sum(tl.where(last, hs, 0.0), axis=1)
        cc = tl.load(c_ptr + (b * T + t[None, :]) * N + nn[:, None], mask=m2, other=0.0)
        yr = tl.where(m2, hs * cc.to(tl.float32), 0.0)
        y = tl.sum(tl.reshape(yr, (BD, BN, BT)), axis=1)  # [BD, BT]
        dcol = d0 + tl.arange(0, BD)
        ym = (dcol < DV)[:, None] & tm[None, :]
        if HAS_D:
            uy = tl.load(u_ptr + (b * T + t[None, :]) * DV + dcol[:, None], mask=ym, other=0.0)
            y = y + dsk[:, None] * uy.to(tl.float32)
        store_rounded(y_ptr + (b * T + t[None, :]) * DV + dcol[:, None], y, ym, BF16)
    if STORE_STATE:
        tl.store(h_ptr + hoff, h, mask=rm)


def _held(prec: Precision, name: str, x: torch.Tensor | None) -> torch.Tensor | None:
    """A checked parameter as the kernel holds it: rounded once to the declaration's storage
    (as the bound assumes), float64 on the CPU (exact in the storage dtype); an error naming
    ``name`` where it overflows."""
    return None if x is None else prec.stored(x.detach().to("cpu", torch.float64), name)


def _qkv(q: object, k: object, v: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qq, kk, vv = (check_kernel_tensor(nm, x) for nm, x in (("q", q), ("k", k), ("v", v)))
    if not (qq.dtype == kk.dtype == vv.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got {qq.dtype}, {kk.dtype}, {vv.dtype}")
    return qq, kk, vv


def _call(
    kind: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: torch.Size,
    state: KernelState | None,
    return_state: bool,
    h_shape: tuple[int, ...],
    launch: Callable[..., None],
) -> torch.Tensor | tuple[torch.Tensor, KernelState]:
    """A state-space kernel's call around its launch: the float32 state ``h [nb, *h_shape]``
    (the carried one, checked, or zeros), the output ``y [nb, T, W]`` in the storage dtype,
    ``launch(C, B, u, y, h)`` on ``q, k, v`` flattened over ``batch`` when there is anything
    to compute (it writes ``y``, and ``h`` in place), then the batch dims restored (with the
    state, the carried one updated in place, if asked)."""
    T, N = q.shape[-2:]
    W = v.shape[-1]
    nb = math.prod(batch)
    key = (N, W, q.dtype)
    if state is not None:
        (h,) = state.check(kind, batch, key)
    else:
        h = torch.zeros(nb, *h_shape, dtype=torch.float32, device=q.device)
    y = torch.empty(nb, T, W, dtype=q.dtype, device=q.device)
    if nb * T * W > 0:
        launch(flatten_batch(q, batch), flatten_batch(k, batch), flatten_batch(v, batch), y, h)
    out = y.reshape(*batch, T, W)
    if return_state:
        return out, state if state is not None else KernelState(kind, (h,), batch, key)
    return out


def selective_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    delta: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None = None,
    discretization: str = "euler",
    causal: bool = True,
    state: KernelState | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, KernelState]:
    """The selective scan (:func:`attnprec.attention.selective_scan_attention`) as a
    chunked Triton scan.

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``C [..., T, N]``, ``B [..., T, N]``, ``u [..., T, D]``: float16, bfloat16 or
        float32 (one dtype, the storage), on CUDA (CPU under ``TRITON_INTERPRET=1``).
    delta, A, D, discretization
        As the method; any float dtype: each is rounded once to the storage dtype (the
        declaration's storage), checked again there (a ``ValueError`` naming it where it
        overflows or, as ``A`` rounded to 0, breaks the method's checks) and loaded into
        float32.
    causal : bool
        Must be True.
    state : KernelState, optional
        The float32 state ``h [B, D, N]`` of a previous call (kind ``"selective_scan"``),
        updated in place: one token per call is the decode step.
    return_state : bool
        Also return the state.

    Returns
    -------
    torch.Tensor or (torch.Tensor, KernelState)
        ``[..., T, D]`` in the storage dtype.

    Notes
    -----
    Error: elementwise within ``attention_error_bound("selective_scan", q, k, v,
    precision_for(dtype), delta=, A=, D=, discretization=)`` of the exact output on the
    inputs as given (docs/bounds/ssm.md; the kernel's graph is the recurrence's).
    """
    check_causal_only("the selective scan", causal)
    check_state_args(True, state, return_state)
    qq, kk, vv = _qkv(q, k, v)
    dl, a, d, disc, batch = check_selective(qq, kk, vv, delta, A, D, discretization)
    # the checks again on the values the kernel holds (a tiny A rounds to -0, a large one to
    # -inf), as the audit and the bound see them
    prec = precision_for(qq.dtype)
    held = [_held(prec, nm, x) for nm, x in (("delta", dl), ("A", a), ("D", d))]
    dl, a, d, disc, batch = check_selective(qq, kk, vv, held[0], held[1], held[2], disc)
    T, N = qq.shape[-2:]
    Dv = vv.shape[-1]
    dtype, dev = qq.dtype, qq.device

    def launch(C: Any, Bm: Any, u: Any, y: Any, h: Any) -> None:
        dls = flatten_batch(dl.to(dev, dtype).expand(*dl.shape[:-1], Dv), batch)
        As = a.to(dev, dtype).expand(Dv, N).contiguous()
        Ds = None if d is None else d.to(dev, dtype).expand(Dv).contiguous()
        BN = next_pow2(N, 1)
        BD = max(1, min(next_pow2(Dv, 1), SCAN_ROWS // BN))
        _selective_kernel[(y.shape[0], triton.cdiv(Dv, BD))](
            C, Bm, u, dls, As, Ds if Ds is not None else As, y, h, T, N, Dv,
            HAS_D=Ds is not None, ZOH=disc == "zoh", LOAD_STATE=state is not None,
            STORE_STATE=state is not None or return_state, BF16=dtype == torch.bfloat16,
            BD=BD, BN=BN, BT=SCAN_T,
        )  # fmt: skip

    return _call("selective_scan", qq, kk, vv, batch, state, return_state, (Dv, N), launch)


# --- SSD ----------------------------------------------------------------------------------


@triton.jit
def _ssd_kernel(c_ptr, b_ptr, x_ptr, dt_ptr, a_ptr, d_ptr, y_ptr, h_ptr, T, N, P,
                HAS_D: tl.constexpr, LOAD_STATE: tl.constexpr, STORE_STATE: tl.constexpr,
                BF16: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
                BP: tl.constexpr):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)  # (int32 offsets wrap past 2^31 elements)
    p0 = tl.program_id(1) * BP
    n = tl.arange(0, BN)
    pc = p0 + tl.arange(0, BP)
    nm, pm = n < N, pc < P
    A = tl.load(a_ptr + b).to(tl.float32)
    hoff = (b * N + n[:, None]) * P + pc[None, :]
    hm = nm[:, None] & pm[None, :]
    if LOAD_STATE:
        h = tl.load(h_ptr + hoff, mask=hm, other=0.0)
    else:
        h = tl.zeros((BN, BP), tl.float32)
    if HAS_D:
        dsk = tl.load(d_ptr + b * P + pc, mask=pm, other=0.0).to(tl.float32)
    tt = tl.arange(0, BT)
    lower = tt[:, None] >= tt[None, :]
    below = tt[:, None] > tt[None, :]
    for t0 in range(0, T, BT):
        t = t0 + tt
        tm = t < T
        dt = tl.load(dt_ptr + b * T + t, mask=tm, other=0.0).to(tl.float32)
        la = tl.where(tm, A * dt, 0.0)  # log-gates A dt_t
        # seg[t, s] = sum_{r=s+1..t} la_r: a cumulative sum over t of la_t [t > s]
        seg = tl.cumsum(tl.where(below, la[:, None], 0.0), axis=0)
        Lm = tl.where(lower, tl.exp(seg), 0.0)
        head = tl.cumsum(la, axis=0)  # sum_{r<=t}: the decay of the carried state
        # tail[s] = sum_{r>s} la_r over the chunk: the last row of seg (a span sum)
        tail = tl.sum(tl.where((tt == BT - 1)[:, None], seg, 0.0), axis=0)
        total = tl.sum(la, axis=0)
        cb = tl.load(c_ptr + (b * T + t[:, None]) * N + n[None, :], mask=tm[:, None] & nm[None, :],
                     other=0.0).to(tl.float32)  # fmt: skip
        bb = tl.load(b_ptr + (b * T + t[:, None]) * N + n[None, :], mask=tm[:, None] & nm[None, :],
                     other=0.0).to(tl.float32)  # fmt: skip
        bd = bb * dt[:, None]  # dt_s B_s
        xm = tm[:, None] & pm[None, :]
        xb = tl.load(x_ptr + (b * T + t[:, None]) * P + pc[None, :], mask=xm, other=0.0)
        xb = xb.to(tl.float32)
        # [t, s]; keys after the query are zeroed by where, not by a product with 0: an
        # inf (an overflowing C_t . dt_s B_s) or NaN there must not reach earlier queries
        s = tl.where(lower, tl.dot(cb, tl.trans(bd), input_precision="ieee") * Lm, 0.0)
        # x with non-finite values zeroed, so a masked 0 * NaN cannot reach earlier
        # queries; rows that do see a non-finite value take the plain product (as log.py)
        fin = tl.abs(xb) < float("inf")
        seen = tl.cumsum((~fin).to(tl.int32), axis=0) > 0
        y = tl.dot(s, tl.where(fin, xb, 0.0), input_precision="ieee")
        y = tl.where(seen, tl.dot(s, xb, input_precision="ieee"), y)
        y += tl.exp(head)[:, None] * tl.dot(cb, h, input_precision="ieee")
        kt = bd * tl.exp(tail)[:, None]
        h = tl.exp(total) * h + tl.dot(tl.trans(kt), xb, input_precision="ieee")
        if HAS_D:
            y += dsk[None, :] * xb
        store_rounded(y_ptr + (b * T + t[:, None]) * P + pc[None, :], y, xm, BF16)
    if STORE_STATE:
        tl.store(h_ptr + hoff, h, mask=hm)


def ssd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    dt: torch.Tensor,
    A: Any,
    D: Any = None,
    causal: bool = True,
    state: KernelState | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, KernelState]:
    """SSD (:func:`attnprec.attention.ssd_attention`) as a chunked Triton kernel: chunks of
    :data:`SSD_T` tokens, the quadratic form inside with the chunk's segment sums, the
    float32 state ``h [N, P]`` passed between chunks (``tl.dot`` in IEEE float32).

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``C [..., T, N]``, ``B [..., T, N]``, ``x [..., T, P]``: float16, bfloat16 or float32.
    dt, A, D
        As the method; rounded once to the storage dtype, checked again there (as
        :func:`selective_scan`) and loaded into float32.
    causal : bool
        Must be True.
    state : KernelState, optional
        The float32 state of a previous call (kind ``"ssd"``), updated in place.
    return_state : bool
        Also return the state.

    Returns
    -------
    torch.Tensor or (torch.Tensor, KernelState)
        ``[..., T, P]`` in the storage dtype.

    Notes
    -----
    Error: elementwise within ``attention_error_bound("ssd", q, k, v,
    ssd_precision_for(dtype), dt=, A=, D=)`` of the exact output on the inputs as given.
    """
    check_causal_only("SSD", causal)
    check_state_args(True, state, return_state)
    qq, kk, vv = _qkv(q, k, v)
    d_t, a, d, batch = check_ssd(qq, kk, vv, dt, A, D)
    prec = ssd_precision_for(qq.dtype)  # the checks again on the held values, as above
    held = [_held(prec, nm, x) for nm, x in (("dt", d_t), ("A", a), ("D", d))]
    d_t, a, d, batch = check_ssd(qq, kk, vv, held[0], held[1], held[2])
    T, N = qq.shape[-2:]
    P = vv.shape[-1]
    dtype, dev = qq.dtype, qq.device
    nb = math.prod(batch)

    def launch(C: Any, Bm: Any, x: Any, y: Any, h: Any) -> None:
        dts = d_t.to(dev, dtype).expand(*batch, T).reshape(nb, T).contiguous()
        As = a.to(dev, dtype).expand(batch).reshape(nb).contiguous()
        Ds = None
        if d is not None:
            Ds = d.to(dev, dtype).expand(*batch, P).reshape(nb, P).contiguous()
        BN = next_pow2(N, 16)
        BP = min(next_pow2(P, 16), 64)
        _ssd_kernel[(nb, triton.cdiv(P, BP))](
            C, Bm, x, dts, As, Ds if Ds is not None else As, y, h, T, N, P,
            HAS_D=Ds is not None, LOAD_STATE=state is not None,
            STORE_STATE=state is not None or return_state, BF16=dtype == torch.bfloat16,
            BT=SSD_T, BN=BN, BP=BP,
        )  # fmt: skip

    return _call("ssd", qq, kk, vv, batch, state, return_state, (N, P), launch)
