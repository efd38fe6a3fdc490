"""Argument checks shared by every layer, so each error names the argument the same way."""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal

import torch

from attnprec.lognum._checks import (
    broadcast_shapes,
    check_bool,
    check_float,
    check_gradual_underflow,
)

__all__ = [
    "broadcast_shapes",
    "check_bool",
    "check_causal_only",
    "check_float",
    "check_finite",
    "widened",
    "check_gradual_underflow",
    "check_int",
    "check_real",
    "MAX_SIZE",
    "check_qkv",
    "check_masks",
    "check_softcap",
    "resolve_scale",
    "compute_dtype",
]


def widened(x: Any) -> Any:
    """``x`` in float32 where it is a tensor of one-byte floats (e4m3, e5m2: exact there),
    else ``x``: torch has no arithmetic, comparisons or ``isfinite`` for them, so the
    references and bounds read them widened (their values are the same)."""
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.element_size() == 1:
        return x.to(torch.float32)
    return x


def check_finite(name: str, x: torch.Tensor) -> torch.Tensor:
    """Raise ``ValueError`` naming ``x`` if any entry is NaN or infinite."""
    if not bool(torch.isfinite(widened(x)).all()):
        raise ValueError(f"{name}: expected finite values, found NaN or inf")
    return x


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a computation on ``x`` runs in: its own for fp32/fp64, fp32 for fp16/bf16."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def check_causal_only(what: str, causal: object) -> None:
    """Refuse ``causal`` unless it is ``True``: a ``TypeError`` for a non-bool, a
    ``ValueError`` for ``False`` (``what`` names the method, which is causal only)."""
    if check_bool("causal", causal) is not True:
        raise ValueError(f"causal: {what} is causal only; pass causal=True")


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
) -> tuple[int, int, int, int]:
    """Validate attention operands and return ``(n_q, n_k, d_k, d_v)``.

    Raises
    ------
    TypeError
        If an operand is not a real floating-point tensor, or ``causal`` not a bool.
    ValueError
        If the shapes do not match (naming the operand), an operand on the meta device,
        ``causal`` with ``n_q != n_k``,
        ``d_k = 0`` (no dot product), or queries without keys (``n_k = 0 < n_q``: every
        method averages or sums over keys, and an empty normalizer has no value). Empty
        queries, values or batches are allowed: the result is empty.
    """
    check_bool("causal", causal)
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float(name, x)
        if x.dim() < 2:
            raise ValueError(f"{name}: expected shape [..., n, d], got {tuple(x.shape)}")
    n_q, d_k = q.shape[-2:]
    n_k, d_k2 = k.shape[-2:]
    n_v, d_v = v.shape[-2:]
    if d_k2 != d_k:
        raise ValueError(f"k: expected d_k={d_k} (from q), got {d_k2}")
    if n_v != n_k:
        raise ValueError(f"v: expected n_k={n_k} rows (from k), got {n_v}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    try:
        broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError as e:
        raise ValueError(
            f"q, k, v: batch dims {tuple(q.shape[:-2])}, {tuple(k.shape[:-2])}, "
            f"{tuple(v.shape[:-2])} do not broadcast"
        ) from e
    if causal and n_q != n_k:
        raise ValueError(f"causal: requires n_q == n_k, got n_q={n_q}, n_k={n_k}")
    if d_k == 0:
        raise ValueError(f"q: expected d_k >= 1 features, got shape {tuple(q.shape)}")
    if n_k == 0 and n_q > 0:
        raise ValueError(f"k: expected at least one key for {n_q} queries, got n_k=0")
    return int(n_q), int(n_k), int(d_k), int(d_v)


def resolve_scale(scale: object, d_k: int, default: float | None = None) -> float:
    """Return ``scale``, or the default ``1/sqrt(d_k)`` (or ``default``) when it is ``None``.

    A real number (Python, NumPy or one-element tensor) is taken; a string, bool or a
    tensor of several elements is a ``TypeError`` naming ``scale``.
    """
    if scale is None:
        return default if default is not None else 1.0 / math.sqrt(d_k)
    if isinstance(scale, (str, bytes, bool)) or getattr(scale, "is_complex", lambda: False)():
        raise TypeError(f"scale: expected a real number, got {type(scale).__name__}")
    try:
        s = float(scale)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"scale: expected a real number, got {type(scale).__name__} {scale!r:.60}"
        ) from None
    if not math.isfinite(s):
        raise ValueError(f"scale: expected a finite number, got {scale!r}")
    return s


#: The largest tensor dimension a size argument may ask for (``2**31 - 1``): past it a
#: draw or allocation overflows (torch's sizes are int64, its kernels' indices often int32)
#: or could never fit in memory.
MAX_SIZE = 2**31 - 1


def check_int(name: str, x: object, minimum: int = 0, maximum: int | None = None) -> int:
    """Return ``x`` as an ``int`` if it is an integer in ``[minimum, maximum]``, else raise
    naming it (``maximum=None``: no upper limit; pass :data:`MAX_SIZE` for a tensor size).

    ``bool`` is rejected (``True`` is not a degree); integral NumPy/torch scalars are accepted.

    Raises
    ------
    TypeError
        If ``x`` is not an integer.
    ValueError
        If ``x < minimum`` or ``x > maximum``.
    """
    try:
        if isinstance(x, bool):
            raise TypeError
        i = int(x.__index__())  # type: ignore[attr-defined]
    except (AttributeError, TypeError, RuntimeError):
        raise TypeError(f"{name}: expected an integer, got {type(x).__name__}") from None
    if i < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {i}")
    if maximum is not None and i > maximum:
        raise ValueError(f"{name}: expected an integer <= {maximum}, got {i}")
    return i


def check_real(name: str, x: object) -> float:
    """Return ``x`` as a ``float`` if it is a real number (Python, NumPy or a one-element
    real tensor; not a bool or a string), else raise ``TypeError`` naming it; the caller
    checks its range."""
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        if x.dtype == torch.bool or x.is_complex() or x.is_meta:
            raise TypeError(f"{name}: expected a real number, got a {x.dtype} tensor")
        return float(x)
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(x).__name__}")
    return float(x)


def check_masks(
    causal: bool,
    window: object,
    key_mask: object,
    batch: tuple[int, ...],
    n_q: int,
    n_k: int,
    rows: torch.Tensor | Literal[False] | None = None,
) -> tuple[int | None, torch.Tensor | None]:
    """Validate a sliding window and a key mask; return ``(window, key_mask [B, n_k])``
    with the key mask broadcast to the batch dims and flattened (on the CPU).

    ``window``: an integer >= 1, causal only (query i sees keys ``i - window < j <= i``;
    one longer than the sequence is returned as ``n_k``, which sees the same keys).
    ``key_mask``: bool ``[..., n_k]``, True for the keys attended (False: padding).
    ``rows``: the query rows that must see a key (None: every row; False: none checked
    here, the caller checks the rows it computes with :func:`check_seen`).

    Raises
    ------
    TypeError, ValueError
        Naming ``window`` or ``key_mask``: a wrong type or shape, a window without
        ``causal``, or a query that sees no key.
    """
    w = None if window is None else check_int("window", window, 1)
    if w is not None and not causal:
        raise ValueError("window: a sliding window is causal (pass causal=True)")
    if w is not None:  # a window past the sequence sees what one of n_k keys sees (and
        w = min(w, max(n_k, 1))  # 2^70 would overflow the int64 positions it meets)
    if key_mask is None:
        return w, None
    if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
        got = (
            f"a {key_mask.dtype} tensor {tuple(key_mask.shape)}"
            if isinstance(key_mask, torch.Tensor)
            else f"{key_mask!r:.60}"
        )
        raise TypeError(f"key_mask: expected a bool tensor [..., n_k], got {got}")
    if key_mask.dim() < 1 or key_mask.shape[-1] != n_k:
        raise ValueError(f"key_mask: expected shape [..., {n_k}], got {tuple(key_mask.shape)}")
    nb = math.prod(batch)
    try:
        km = key_mask.cpu().expand(*batch, n_k).reshape(nb, n_k)
    except RuntimeError:
        raise ValueError(
            f"key_mask: batch dims {tuple(key_mask.shape[:-1])} do not broadcast to {tuple(batch)}"
        ) from None
    if rows is not False:
        check_seen(km, causal, w, n_q, n_k, rows)
    return w, km


def check_seen(
    km: torch.Tensor,
    causal: bool,
    window: int | None,
    n_q: int,
    n_k: int,
    rows: torch.Tensor | None = None,
) -> None:
    """Raise naming ``key_mask`` where one of ``rows`` (None: every row) sees no key under
    the key mask ``km [B, n_k]``, causal visibility and the sliding ``window``."""
    kept = km.long().cumsum(-1)  # keys kept among 0..j
    if causal:
        last = torch.arange(min(n_q, n_k), device="cpu")  # (km's device)
        if rows is not None:
            last = rows.to("cpu", torch.long)
            last = last[last < n_k]
        seen = kept[:, last]
        if window is not None:
            first = last - window  # the key just before the window
            seen = seen - torch.where(first >= 0, kept[:, first.clamp_min(0)], 0)
        blind = torch.nonzero(seen == 0)
        if blind.numel():
            b, i = (int(x) for x in blind[0])
            raise ValueError(
                f"key_mask: query row {int(last[i])} of batch item {b} sees no key (every key "
                f"it sees is masked; {blind.shape[0]} such rows): a left-padded causal batch "
                "masks its padding rows' only keys; judge the other rows (rows=) or drop them"
            )
    elif n_q and km.shape[0] and bool((kept[:, -1] == 0).any()):
        b = int(torch.nonzero(kept[:, -1] == 0)[0])
        raise ValueError(f"key_mask: batch item {b} masks every key")


def check_softcap(softcap: object) -> float:
    """Return ``softcap`` as a float if it is a finite number > 0, else raise naming it."""
    if isinstance(softcap, bool) or not isinstance(softcap, int | float):
        raise TypeError(f"softcap: expected a number > 0, got {type(softcap).__name__}")
    cap = float(softcap)
    if not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"softcap: expected a finite number > 0, got {softcap!r}")
    return cap
