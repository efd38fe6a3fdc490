"""The diagonal recurrence x_t = a_t x_{t-1} + b_t as a chunked signed log-space scan."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from attnprec._validate import check_bool, check_int
from attnprec.kernels._common import KernelState, check_kernel_tensor, precision_for
from attnprec.kernels._triton import store_rounded

__all__ = ["linear_recurrence", "precision_for", "BLOCK_T", "BLOCK_R"]

#: Time steps per chunk (one scan; a power of two) and sequences per program.
BLOCK_T = 32
BLOCK_R = 16


@triton.jit
def _signed_logaddexp(x, sx, y, sy):
    """(log|z|, sign z) of z = sx e^x + sy e^y, shifted by the larger log; exact zero -> -inf."""
    big = x >= y
    mx = tl.where(big, x, y)
    mn = tl.where(big, y, x)
    s1 = tl.where(big, sx, sy)
    s2 = tl.where(big, sy, sx)
    fin = mx > float("-inf")
    r = s1 + s2 * tl.exp(tl.where(fin, mn - mx, 0.0))
    r = tl.where(fin, r, 0.0)
    lg = tl.where(r != 0.0, mx + tl.log(tl.abs(r)), float("-inf"))
    return lg, tl.where(r > 0.0, 1.0, tl.where(r < 0.0, -1.0, 0.0))


@triton.jit
def _combine(la1, sa1, lb1, sb1, la2, sa2, lb2, sb2):
    # (x -> a1 x + b1) then (x -> a2 x + b2) is x -> a1 a2 x + (a2 b1 + b2)
    lb, sb = _signed_logaddexp(la2 + lb1, sa2 * sb1, lb2, sb2)
    return la1 + la2, sa1 * sa2, lb, sb


@triton.jit
def _log_sign(x):
    return tl.log(tl.abs(x)), tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0))


@triton.jit
def _scan(la, sa, lb, sb, BR: tl.constexpr, BT: tl.constexpr, LOG_BT: tl.constexpr):
    """Inclusive Hillis-Steele scan along axis 1: log2(BT) combines per element."""
    t = tl.arange(0, BT)
    for step in tl.static_range(LOG_BT):
        off = 1 << step
        src = tl.broadcast_to(tl.maximum(t - off, 0)[None, :], (BR, BT))
        nla, nsa, nlb, nsb = _combine(
            tl.gather(la, src, 1), tl.gather(sa, src, 1), tl.gather(lb, src, 1),
            tl.gather(sb, src, 1), la, sa, lb, sb,
        )  # fmt: skip
        has = (t >= off)[None, :]
        la = tl.where(has, nla, la)
        sa = tl.where(has, nsa, sa)
        lb = tl.where(has, nlb, lb)
        sb = tl.where(has, nsb, sb)
    return la, sa, lb, sb


@triton.jit
def _recurrence(a_ptr, b_ptr, x0_ptr, o_ptr, ls_ptr, ss_ptr, rows, n,
                HAS_X0: tl.constexpr, LOAD_STATE: tl.constexpr, STORE_STATE: tl.constexpr,
                BF16: tl.constexpr, BR: tl.constexpr, BT: tl.constexpr,
                LOG_BT: tl.constexpr):  # fmt: skip
    # (int64: the offsets r n + t wrap past 2^31 elements in int32)
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    rm = r < rows
    if LOAD_STATE:
        lc = tl.load(ls_ptr + r, mask=rm, other=float("-inf"))
        sc = tl.load(ss_ptr + r, mask=rm, other=0.0)
    elif HAS_X0:
        lc, sc = _log_sign(tl.load(x0_ptr + r, mask=rm, other=0.0).to(tl.float32))
    else:
        lc = tl.full((BR,), float("-inf"), tl.float32)
        sc = tl.zeros((BR,), tl.float32)
    bad = lc != lc  # a NaN start (x0 or a poisoned state) poisons every step
    for t0 in range(0, n, BT):
        t = t0 + tl.arange(0, BT)
        msk = rm[:, None] & (t < n)[None, :]
        off = r[:, None] * n + t[None, :]
        a = tl.load(a_ptr + off, mask=msk, other=1.0).to(tl.float32)
        b = tl.load(b_ptr + off, mask=msk, other=0.0).to(tl.float32)
        nan_in = ((a != a) | (b != b)).to(tl.int32)
        la, sa = _log_sign(a)
        lb, sb = _log_sign(b)
        la, sa, lb, sb = _scan(la, sa, lb, sb, BR, BT, LOG_BT)
        lx, sx = _signed_logaddexp(la + lc[:, None], sa * sc[:, None], lb, sb)
        # NaN poisons its step and every later one, as 0 * NaN does in the float recurrence
        seen = (tl.cumsum(nan_in, axis=1) > 0) | bad[:, None]
        store_rounded(o_ptr + off, tl.where(seen, float("nan"), sx * tl.exp(lx)), msk, BF16)
        last = (t == tl.minimum(t0 + BT, n) - 1)[None, :]
        lc = tl.sum(tl.where(last, lx, 0.0), axis=1)
        sc = tl.sum(tl.where(last, sx, 0.0), axis=1)
        bad = bad | (tl.sum(nan_in, axis=1) > 0)
    if STORE_STATE:
        tl.store(ls_ptr + r, tl.where(bad, float("nan"), lc), mask=rm)
        tl.store(ss_ptr + r, tl.where(bad, float("nan"), sc), mask=rm)


@triton.jit
def _recurrence_step(a_ptr, b_ptr, o_ptr, ls_ptr, ss_ptr, rows,
                     BF16: tl.constexpr, BR: tl.constexpr):  # fmt: skip
    """One step ``x = a x_prev + b`` for each of ``BR`` rows, the state ``(log|x|, sign x)``
    in float32 (updated in place): the carry combine of ``_recurrence`` on a one-step chunk."""
    # (int64: the offsets r n + t wrap past 2^31 elements in int32)
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    rm = r < rows
    lc = tl.load(ls_ptr + r, mask=rm, other=float("-inf"))
    sc = tl.load(ss_ptr + r, mask=rm, other=0.0)
    a = tl.load(a_ptr + r, mask=rm, other=1.0).to(tl.float32)
    b = tl.load(b_ptr + r, mask=rm, other=0.0).to(tl.float32)
    la, sa = _log_sign(a)
    lb, sb = _log_sign(b)
    lx, sx = _signed_logaddexp(la + lc, sa * sc, lb, sb)
    bad = (a != a) | (b != b) | (lc != lc)
    store_rounded(o_ptr + r, tl.where(bad, float("nan"), sx * tl.exp(lx)), rm, BF16)
    tl.store(ls_ptr + r, tl.where(bad, float("nan"), lx), mask=rm)
    tl.store(ss_ptr + r, tl.where(bad, float("nan"), sx), mask=rm)


#: Rows per program of the one-step kernel.
BLOCK_STEP = 256


def decode_launch(
    a: torch.Tensor, b: torch.Tensor, y: torch.Tensor, state: tuple[torch.Tensor, ...]
) -> None:
    """Launch :func:`_recurrence_step` on flattened ``a, b, y [rows]`` and the state
    ``(log|x| [rows], sign x [rows])`` (float32, updated in place). Allocates nothing."""
    ls, ss = state
    rows = a.shape[0]
    _recurrence_step[(triton.cdiv(rows, BLOCK_STEP),)](
        a, b, y, ls, ss, rows, BF16=y.dtype == torch.bfloat16, BR=BLOCK_STEP
    )


def recurrence_state(
    x0: torch.Tensor | None, rows: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 state ``(log|x|, sign x)`` of ``x0 [rows]`` (contiguous, in the kernels'
    dtype; ``None``: 0), converted by the kernel itself as :func:`linear_recurrence` does."""
    ls = torch.full((rows,), float("-inf"), dtype=torch.float32, device=device)
    ss = torch.zeros(rows, dtype=torch.float32, device=device)
    if x0 is not None and rows > 0:
        _recurrence[(triton.cdiv(rows, BLOCK_R),)](x0, x0, x0, x0, ls, ss, rows, 0,
                                                   HAS_X0=True, LOAD_STATE=False,
                                                   STORE_STATE=True, BF16=False, BR=BLOCK_R,
                                                   BT=BLOCK_T,
                                                   LOG_BT=BLOCK_T.bit_length() - 1)  # fmt: skip
    return ls, ss


def linear_recurrence(
    a: torch.Tensor,
    b: torch.Tensor,
    x0: torch.Tensor | None = None,
    dim: int = -1,
    *,
    state: KernelState | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, KernelState]:
    r"""Solve ``x_t = a_t x_{t-1} + b_t`` (``x_0 = x0``, default 0) along ``dim``.

    The pairs ``(a_t, b_t)`` become ``(log|a_t|, sign a_t, log|b_t|, sign b_t)`` and are
    scanned with ``(A1, B1) then (A2, B2) = (A1 A2, A2 B1 + B2)`` in signed log space
    (a Hillis-Steele scan, ``log2 BLOCK_T`` combines per step, over chunks of
    :data:`BLOCK_T` steps, the state carried between
    chunks as a log and a sign): products add logs and multiply signs exactly, sums shift
    by the larger log, so gates of any sign, zeros (a restart) and values far outside the
    float range are handled; exact cancellation gives an exact 0.

    Parameters
    ----------
    a, b : torch.Tensor
        Gates and inputs, one shape and dtype (float16, bfloat16 or float32), on CUDA (CPU
        under ``TRITON_INTERPRET=1``). Non-contiguous tensors are copied.
    x0 : torch.Tensor, optional
        Initial state, the shape of ``a`` without ``dim``, same dtype.
    dim : int
        The time dimension.
    state : KernelState, optional
        Continue from the float32 state ``(log|x|, sign x)`` of an earlier call (instead
        of ``x0``); updated in place. Splitting a sequence at a multiple of
        :data:`BLOCK_T` steps gives the one-call result bit for bit.
    return_state : bool
        Also return that state (kind ``"recurrence"``, batch = the shape without ``dim``),
        for :func:`attnprec.kernels.decode_step` or a later call.

    Returns
    -------
    torch.Tensor or (torch.Tensor, KernelState)
        ``x_1 .. x_n``, the shape and dtype of ``a`` (values beyond its range are +-inf).
        NaN in ``a``, ``b`` or ``x0`` makes that state and every later one NaN (as
        ``0 * NaN`` would in the float recurrence); a poisoned state stays NaN.

    Notes
    -----
    Error: elementwise within ``attnprec.analysis.bounds.graphs.recurrence_rounding_bound(a,
    b, x0, precision_for(dtype, interpreted))`` of the exact recurrence on the stored inputs
    (graph in docs/kernels.md).
    """
    check_bool("return_state", return_state)
    a = check_kernel_tensor("a", a)
    b = check_kernel_tensor("b", b)
    if a.shape != b.shape:
        raise ValueError(f"b: expected the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"b: expected the dtype of a ({a.dtype}), got {b.dtype}")
    if a.dim() == 0:
        raise ValueError("a: expected at least one dimension (time)")
    if isinstance(dim, bool):
        raise TypeError("dim: expected an integer, got bool")
    d = check_int("dim", dim + a.dim() if isinstance(dim, int) and dim < 0 else dim, 0)
    if d >= a.dim():
        raise ValueError(f"dim: expected a dimension of a {tuple(a.shape)}, got {dim}")
    if state is not None and not isinstance(state, KernelState):
        raise TypeError(f"state: expected a KernelState, got {type(state).__name__}")
    at = a.movedim(d, -1).contiguous()
    bt = b.movedim(d, -1).contiguous()
    n = at.shape[-1]
    batch = at.shape[:-1]
    rows = math.prod(batch)
    if x0 is not None:
        if state is not None:
            raise ValueError("x0: pass x0 or state, not both")
        x0 = check_kernel_tensor("x0", x0)
        if x0.dtype != a.dtype:
            raise TypeError(f"x0: expected the dtype of a ({a.dtype}), got {x0.dtype}")
        if x0.shape != batch:
            raise ValueError(
                f"x0: expected shape {tuple(batch)} (a without dim), got {tuple(x0.shape)}"
            )
        x0 = x0.contiguous()
    if state is not None:
        ls, ss = state.check("recurrence", batch, (a.dtype,))
    elif return_state:
        ls, ss = recurrence_state(x0.reshape(-1) if x0 is not None else None, rows, a.device)
    else:
        ls = ss = at  # never read or written
    out = torch.empty_like(at)
    if rows > 0 and n > 0:
        grid = (triton.cdiv(rows, BLOCK_R),)
        _recurrence[grid](at, bt, x0 if x0 is not None else at, out, ls, ss, rows, n,
                          HAS_X0=x0 is not None, LOAD_STATE=state is not None,
                          STORE_STATE=state is not None or return_state,
                          BF16=a.dtype == torch.bfloat16,
                          BR=BLOCK_R, BT=BLOCK_T, LOG_BT=BLOCK_T.bit_length() - 1)  # fmt: skip
    out = out.movedim(-1, d)
    if return_state:
        return out, state if state is not None else KernelState("recurrence", (ls, ss), batch,
                                                                 (a.dtype,))  # fmt: skip
    return out
