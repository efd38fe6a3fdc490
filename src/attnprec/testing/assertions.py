"""Assertions for users' test suites: is an attention implementation within its bound?

:func:`assert_within_bound` runs a function and judges its output;
:func:`assert_attention_close` judges an output the test already has, where
``torch.testing.assert_close(out, ref, atol=..., rtol=...)`` stands in a kernel project's
tests. Both take the inputs in the caller's layout (:data:`LAYOUTS`): ``[B, H, T, D]`` as
SDPA, ``[B, T, H, D]`` as flash-attention, or any ``[..., T, D]``; K/V with fewer heads
than Q (grouped-query and multi-query attention); and packed variable-length batches
(``cu_seqlens``, as flash-attention's varlen functions), each sequence judged on its own.

A failing assertion saves its inputs, keywords, declaration (and the output it judged) to
a ``.pt`` file (under ``$ATTNPREC_FAILURES`` or ``.attnprec/failures`` in the working
directory) and names it in the message; :func:`replay` (or ``attnprec replay FILE``) audits
them again.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import math
import os
import pickle
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnprec._validate import check_bool, check_float
from attnprec.analysis.audit import (
    AuditReport,
    _as_output,
    _Pending,
    _pending,
    _run,
    as_precision,
)
from attnprec.analysis.precision import Precision
from attnprec.analysis.report import CLASSES, AuditCase
from attnprec.methods import method as method_record

__all__ = ["BoundViolation", "LAYOUTS", "assert_attention_close", "assert_within_bound", "replay"]

#: The layouts the assertions take: the axes of ``q``, ``k``, ``v`` and the output. With
#: ``cu_seqlens`` the batch axis is gone and ``T`` is the packed total of every sequence.
LAYOUTS: dict[str, str] = {
    "bhtd": "[B, H, T, D]",
    "bthd": "[B, T, H, D]",
    "...td": "[..., T, D]",
}
_PACKED = {"bhtd": "[H, total_T, D]", "bthd": "[total_T, H, D]", "...td": "[..., total_T, D]"}


class BoundViolation(AssertionError):
    """Raised by :func:`assert_within_bound` and :func:`assert_attention_close`.

    Attributes
    ----------
    report : AuditReport
        The full audit (one case per judged sequence).
    path : pathlib.Path or None
        The saved failing case, for :func:`replay`.
    recorded : bool
        Whether the pytest plugin's report already holds ``report`` (the fixture's); the
        plugin adds the others' when they fail a test.
    """

    recorded = False

    def __init__(self, message: str, report: AuditReport, path: Path | None = None) -> None:
        super().__init__(message)
        self.report = report
        self.path = path


# --------------------------------------------------------------------------------------------
# The user's layout <-> attnprec's [..., T, D]


@dataclass(frozen=True, eq=False)
class _Piece:
    """One judged part: attnprec's ``[..., T, D]`` tensors of one sequence (or of all)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor | None  # None until the output is known (_Layout.with_output)
    params: dict[str, Any]
    seq: int | None  # the sequence of a packed batch (None: not packed)
    start: int  # its first position in the packed T axis
    offset: int = 0  # rows put before the queries (a causal mask aligned bottom-right)


def _pad(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with ``rows`` rows of zeros put before its ``[..., T, D]`` rows."""
    if not rows:
        return x
    return torch.cat([x.new_zeros((*x.shape[:-2], rows, x.shape[-1])), x], -2)


@dataclass(frozen=True)
class _Layout:
    """The caller's layout, checked against ``q, k, v``: maps them, the output and the key
    mask to attnprec's ``[..., T, D]`` (heads before positions, K/V heads repeated for
    grouped queries, one piece per packed sequence), and an index of a piece back."""

    name: str
    cu: tuple[int, ...] | None
    heads_q: int
    heads_kv: int
    out_shape: tuple[int, ...]
    cu_k: tuple[int, ...] | None = None  # the keys' offsets where they differ from cu
    align: str | None = None  # causal_align (assert_attention_close)

    @property
    def packed(self) -> bool:
        return self.cu is not None

    @property
    def axes(self) -> str:
        return (_PACKED if self.packed else LAYOUTS)[self.name]

    @property
    def what(self) -> str:
        how = " packed by cu_seqlens" if self.packed else ""
        return f"{self.axes}, layout {self.name!r}{how}"

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv if self.heads_kv else 1

    @property
    def identity(self) -> bool:
        """Whether attnprec sees the tensors as given (no transpose, repeat or split)."""
        return not self.packed and self.name != "bthd" and self.group == 1

    def internal(self, x: torch.Tensor, repeat: bool = False) -> torch.Tensor:
        """``x`` (``q``, ``k``, ``v`` or the output) as ``[..., T, D]`` on the CPU."""
        x = x.detach().cpu()
        if self.name == "bthd":
            x = x.transpose(-3, -2)
        if repeat and self.group > 1:
            x = x.repeat_interleave(self.group, dim=-3)
        return x.contiguous()

    def internal_mask(self, key_mask: torch.Tensor) -> torch.Tensor:
        """A key mask of the caller's form (:func:`assert_attention_close`) as attnprec's
        ``[..., n_k]``, broadcasting against the batch dims of :meth:`internal`."""
        km = key_mask.detach().cpu()
        if self.name != "...td" and not self.packed and km.dim() == 2:
            km = km[:, None, :]  # [B, T_k]: every head
        return km

    def pieces(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        params: Mapping[str, Any],
        prec: Precision | None = None,
    ) -> list[_Piece]:
        """The judged parts, with no output yet (:meth:`with_output`): one per non-empty
        sequence when packed, else one. With ``prec``'s scale factors, each part's rows
        must hold the scales the kernel's whole tensors give them (:meth:`_same_scales`)."""
        qi, ki, vi = self.internal(q), self.internal(k, True), self.internal(v, True)
        km = params.get("key_mask")
        base = dict(params)
        if isinstance(km, torch.Tensor):
            base["key_mask"] = self.internal_mask(km)
        found: list[tuple[_Piece, int]] = []
        if self.cu is None:
            found.append((self._aligned(_Piece(qi, ki, vi, None, base, None, 0)), 0))
        else:
            cu_k = self.cu if self.cu_k is None else self.cu_k
            for s, (a, b) in enumerate(zip(self.cu[:-1], self.cu[1:], strict=True)):
                if b == a:
                    continue
                ak, bk = cu_k[s], cu_k[s + 1]
                par = dict(base)
                if isinstance(km, torch.Tensor):
                    par["key_mask"] = base["key_mask"][..., ak:bk]
                cut = (qi[..., a:b, :], ki[..., ak:bk, :], vi[..., ak:bk, :])
                found.append((self._aligned(_Piece(*cut, None, par, s, a)), ak))
        if prec is not None and prec.scaling is not None:
            for p, ak in found:
                self._same_scales(prec, (qi, ki, vi), p, ak)
        return [p for p, _ in found]

    def _same_scales(
        self, prec: Precision, whole: tuple[torch.Tensor, ...], p: _Piece, k_start: int
    ) -> None:
        """Refuses a piece whose rows the analysis would scale otherwise than the kernel.

        The analysis quantizes the tensors it is given (:meth:`.Precision.stored`): a scale
        per tensor, or per block of rows counted from its first row. The kernel scales its
        whole tensors, so padding before the queries (``bottom_right``), keys dropped
        (``top_left``) or a packed sequence cut out may give a judged row another scale,
        and the check the error of another quantization (a review: with blocks of 4 and
        one row of padding, a kernel that dropped a query row passed, the correct one
        failed). Non-finite inputs are left to the analysis to name."""
        spans = (
            ("q", whole[0], p.q[..., p.offset :, :], p.start),
            ("k", whole[1], p.k, k_start),
            ("v", whole[2], p.v, k_start),
        )
        for name, full, part, start in spans:
            # (float64: inputs held in an FP8 dtype have no isfinite; a review)
            full, part = full.to(torch.float64), part.to(torch.float64)
            if not (bool(torch.isfinite(full).all()) and bool(torch.isfinite(part).all())):
                return
            n = part.shape[-2]
            kernel = prec.row_scales(full)[..., start : start + n]
            judged = prec.row_scales(p.q.to(torch.float64) if name == "q" else part)
            judged = judged[..., p.offset :] if name == "q" else judged
            if not torch.equal(kernel, judged):
                why = [f"cu_seqlens cuts sequence {p.seq} out of the packed tensors"]
                why = why if p.seq is not None else []
                if self.align is not None:
                    why.append(f"causal_align={self.align!r} makes its causal case square")
                why = why or ["the piece judged is not the kernel's whole tensor"]
                raise ValueError(
                    f"precision: scaling={prec.scaling!r} scales the kernel's whole {name}, "
                    f"but {' and '.join(why)}: some of its rows would be judged under other "
                    "scale factors than the kernel's (a padding that is a multiple of the "
                    "block, scales that every judged row shares, or one call per sequence "
                    "avoid it)"
                )

    def with_output(self, p: _Piece, out: torch.Tensor) -> _Piece:
        """Piece ``p`` (:meth:`pieces`) with its part of the whole output ``out`` (as
        :meth:`internal` gives it)."""
        o = out
        if self.cu is not None:
            o = o[..., p.start : p.start + p.q.shape[-2] - p.offset, :]
        return replace(p, out=_pad(o, p.offset))

    def _aligned(self, p: _Piece) -> _Piece:
        """A causal piece with fewer queries than keys, as attnprec's square causal case:
        ``top_left`` (query i sees keys <= i) keeps the first n_q keys; ``bottom_right``
        (query i sees keys <= i + n_k - n_q, FlashAttention >= 2.1 over a KV cache) puts
        n_k - n_q rows of zeros before the queries and the output (:meth:`with_output`),
        never judged."""
        n_q, n_k = p.q.shape[-2], p.k.shape[-2]
        if self.align is None or n_q == n_k:
            return p
        if self.align == "top_left":
            par = dict(p.params)
            if isinstance(par.get("key_mask"), torch.Tensor):
                par["key_mask"] = par["key_mask"][..., :n_q]
            return replace(p, k=p.k[..., :n_q, :], v=p.v[..., :n_q, :], params=par)
        return replace(p, q=_pad(p.q, n_k - n_q), offset=n_k - n_q)

    def locate(self, piece: _Piece, idx: Sequence[int]) -> tuple[tuple[int, ...], str]:
        """The caller's index into the output of a piece's ``[..., t, c]`` index, and its
        description (batch, head, position, channel; a packed sequence and position)."""
        *batch, t, c = (int(i) for i in idx)
        t -= piece.offset
        row = piece.start + t
        pos = f"position {t}"
        if piece.seq is not None:
            pos = f"sequence {piece.seq}, position {t} (packed row {row})"
        if self.name == "...td":
            lead = f"batch index {tuple(batch)}, " if batch else ""
            return (*batch, row, c), f"{lead}{pos}, channel {c}"
        *b, h = batch
        kv = f" (K/V head {h // self.group})" if self.group > 1 else ""
        words = f"head {h}{kv}, {pos}, channel {c}"
        if self.name == "bhtd":
            user = (*b, h, row, c)
            return user, (f"batch {b[0]}, " if b else "") + words
        user = (*b, row, h, c)
        return user, (f"batch {b[0]}, " if b else "") + f"{pos}, head {h}{kv}, channel {c}"


def _cu_seqlens(cu_seqlens: Any, name: str = "cu_seqlens") -> tuple[int, ...]:
    """``cu_seqlens`` (called ``name``) checked: integers, 1-D, starting at 0,
    non-decreasing; a tensor, a NumPy array or a sequence."""
    if isinstance(cu_seqlens, np.ndarray):
        cu_seqlens = torch.from_numpy(cu_seqlens)
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dtype.is_floating_point or cu_seqlens.is_complex():
            raise TypeError(f"{name}: expected an integer tensor, got dtype {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1:
            raise ValueError(
                f"{name}: expected a 1-D tensor [B + 1], got shape {tuple(cu_seqlens.shape)}"
            )
        cu = tuple(int(x) for x in cu_seqlens.tolist())
    elif isinstance(cu_seqlens, Sequence) and not isinstance(cu_seqlens, (str, bytes)):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in cu_seqlens):
            raise TypeError(f"{name}: expected integers (cumulative sequence offsets)")
        cu = tuple(cu_seqlens)
    else:
        raise TypeError(
            f"{name}: expected an integer tensor [B + 1], got {type(cu_seqlens).__name__}"
        )
    if len(cu) < 2 or cu[0] != 0:
        raise ValueError(
            f"{name}: expected [0, end_0, end_1, ...] (B + 1 >= 2 offsets), got {list(cu)}"
        )
    if any(b < a for a, b in zip(cu[:-1], cu[1:], strict=True)):
        raise ValueError(f"{name}: expected non-decreasing offsets, got {list(cu)}")
    return cu


def _layout(
    layout: str,
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens: Any,
    method: str,
    params: Mapping[str, Any],
    cu_seqlens_k: Any = None,
    causal_align: str | None = None,
    offered: bool = False,
) -> _Layout:
    """Check ``q, k, v`` (and the key mask) against ``layout``; the errors name the argument
    and say which axis of which layout was expected."""
    if layout not in LAYOUTS:
        raise ValueError(
            f"layout: expected one of {tuple(LAYOUTS)} ({', '.join(LAYOUTS.values())}; "
            f"flash-attention's [B, S, H, D] is 'bthd'), got {layout!r}"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float(name, x)
    if params.get("causal") is not None:  # before the kernel sees it
        check_bool("causal", params["causal"])
    cu = None if cu_seqlens is None else _cu_seqlens(cu_seqlens)
    cu_k = None if cu_seqlens_k is None else _cu_seqlens(cu_seqlens_k, "cu_seqlens_k")
    if cu_k is not None and (cu is None or len(cu_k) != len(cu)):
        raise ValueError(
            f"cu_seqlens_k: expected as many offsets as cu_seqlens (the queries'), got "
            f"{None if cu is None else len(cu)} and {len(cu_k)}"
        )
    probe = _Layout(layout, cu, 1, 1, ())
    what = probe.what
    heads = layout != "...td"
    ndim = (3 if cu else 4) if heads else None
    for name, x in (("q", q), ("k", k), ("v", v)):
        if ndim is not None and x.dim() != ndim:
            raise ValueError(f"{name}: expected {ndim} dims {what}, got shape {tuple(x.shape)}")
        if x.dim() < 2:
            raise ValueError(f"{name}: expected at least 2 dims {what}, got shape {tuple(x.shape)}")
    t_dim = {"bhtd": -2, "bthd": -3, "...td": -2}[layout]
    h_dim = {"bhtd": -3, "bthd": -2}.get(layout)

    hint = ""
    if layout == "bhtd" and cu is not None:
        hint = "; flash-attention's packed [total_T, H, D] is layout='bthd'"

    def axis(x: torch.Tensor, dim: int) -> int:
        return int(x.shape[dim])

    def bad(name: str, x: torch.Tensor, expected: str, dim: int) -> ValueError:
        d = dim % x.dim()
        return ValueError(
            f"{name}: expected {expected} in dim {d} of {what}, got {axis(x, dim)} in shape "
            f"{tuple(x.shape)}{hint}"
        )

    if heads and cu is None:
        for name, x in (("k", k), ("v", v)):
            if axis(x, 0) != axis(q, 0):
                raise bad(name, x, f"batch size B={axis(q, 0)} (as q)", 0)
    d_k = axis(q, -1)
    if axis(k, -1) != d_k:
        raise bad("k", k, f"D={d_k} (as q)", -1)
    if axis(v, t_dim) != axis(k, t_dim):
        raise bad("v", v, f"T={axis(k, t_dim)} keys (as k)", t_dim)
    h_q = h_kv = 1
    if h_dim is not None:
        h_q, h_kv = axis(q, h_dim), axis(k, h_dim)
        # (no heads at all is an empty batch: allowed, as an empty batch dim is)
        if (h_kv < 1 and h_q > 0) or (h_kv > 0 and h_q % h_kv):
            raise bad("k", k, f"{h_q} heads or a divisor of {h_q} (grouped-query attention)", h_dim)
        if axis(v, h_dim) != h_kv:
            raise bad("v", v, f"{h_kv} heads (as k)", h_dim)
    if cu is not None:
        for name, x in (("q", q), ("k", k), ("v", v)):
            c, which = (cu, "cu_seqlens") if cu_k is None or name == "q" else (cu_k, "cu_seqlens_k")
            if axis(x, t_dim) != c[-1]:
                raise bad(name, x, f"total_T={c[-1]} ({which}[-1]) positions", t_dim)
    t_q, d_v = axis(q, t_dim), axis(v, -1)
    if layout == "...td":
        try:
            batch = tuple(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]))
        except RuntimeError:
            raise ValueError(
                f"q, k, v: batch dims {tuple(q.shape[:-2])}, {tuple(k.shape[:-2])}, "
                f"{tuple(v.shape[:-2])} do not broadcast ({what})"
            ) from None
        out_shape: tuple[int, ...] = (*batch, t_q, d_v)
    elif layout == "bhtd":
        out_shape = (*q.shape[:-3], h_q, t_q, d_v)
    else:
        out_shape = (*q.shape[:-3], t_q, h_q, d_v)
    rec = method_record(method)
    align = _causal_align(
        causal_align, bool(params.get("causal")), rec, cu, cu_k, t_q, axis(k, t_dim), offered
    )
    lay = _Layout(layout, cu, h_q, h_kv, out_shape, cu_k, align)
    if not rec.masks and not lay.identity:
        arg = "cu_seqlens" if cu is not None else ("layout" if layout == "bthd" else "k")
        raise ValueError(
            f"{arg}: method {method!r} takes per-position keywords that attnprec does not "
            "re-lay: pass q, k, v as [..., T, D] (layout '...td') or [B, H, T, D] with as many "
            "K/V heads as query heads, without cu_seqlens"
        )
    km = params.get("key_mask")
    if isinstance(km, torch.Tensor):
        _check_key_mask(lay, km, axis(k, t_dim), int(q.shape[0]) if heads and cu is None else 0)
    return lay


def _causal_align(
    align: Any,
    causal: bool,
    rec: Any,
    cu: tuple[int, ...] | None,
    cu_k: tuple[int, ...] | None,
    t_q: int,
    t_k: int,
    offered: bool,
) -> str | None:
    """``causal_align`` checked against the queries' and keys' lengths (of each sequence,
    when packed): needed, and only allowed, where a causal mask meets n_q != n_k
    (``offered``: whether the caller takes it)."""
    if align not in (None, "top_left", "bottom_right"):
        raise ValueError(
            f"causal_align: expected None, 'top_left' or 'bottom_right', got {align!r}"
        )
    if align is not None and not causal:
        raise ValueError("causal_align: aligns a causal mask; pass causal=True")
    if align is not None and not rec.masks:
        raise ValueError(
            f"causal_align: method {rec.name!r} takes per-position keywords that attnprec "
            "does not align; pass as many queries as keys"
        )
    lengths = [(t_q, t_k)]
    if cu is not None:
        ck = cu if cu_k is None else cu_k
        lengths = [(b - a, d - c) for a, b, c, d in zip(cu, cu[1:], ck, ck[1:], strict=False)]
    for n_q, n_k in lengths:
        if not causal or n_q == n_k or n_q == 0:
            continue
        if align is None and not offered:
            raise ValueError(
                f"causal: requires n_q == n_k here, got {n_q} queries and {n_k} keys "
                "(assert_attention_close takes causal_align for fewer queries than keys)"
            )
        if align is None:
            raise ValueError(
                f"causal: {n_q} queries and {n_k} keys: pass causal_align='bottom_right' "
                "(FlashAttention >= 2.1 over a KV cache: query i sees the keys up to "
                "i + n_k - n_q) or 'top_left' (PyTorch's is_causal: up to i)"
            )
        if n_q > n_k:
            raise ValueError(
                f"causal_align: {n_q} queries and {n_k} keys leave the first queries "
                "without a key; pass n_q <= n_k"
            )
    return align


def _check_key_mask(lay: _Layout, km: torch.Tensor, t_k: int, batch: int) -> None:
    """The key mask's shape in the caller's layout (its dtype and the rows it leaves
    without keys are checked by the method, naming ``key_mask`` too)."""
    if lay.name == "...td":
        return  # [..., T_k], broadcast against the batch dims: the method checks it
    if lay.packed:
        forms = {1: (t_k,), 2: (lay.heads_q, t_k)}
        words = f"[total_T] or [H, total_T] = {[t_k]} or {[lay.heads_q, t_k]}"
    else:
        forms = {1: (t_k,), 2: (batch, t_k), 3: (batch, lay.heads_q, t_k)}
        words = (
            f"[T_k], [B, T_k] or [B, H, T_k] = {[t_k]}, {[batch, t_k]} or "
            f"{[batch, lay.heads_q, t_k]}"
        )
    if forms.get(km.dim()) != tuple(km.shape):
        raise ValueError(
            f"key_mask: expected {words} (layout {lay.name!r}, True = attended), got shape "
            f"{tuple(km.shape)}"
        )


# --------------------------------------------------------------------------------------------
# Judging and explaining


def _shifted(rows: Any, seed: int, p: _Piece) -> Any:
    """The rows to judge of a piece: ``rows`` of its queries, which a piece aligned
    bottom-right puts after ``p.offset`` padding rows (never judged; a review: ``rows`` was
    dropped there, out-of-range indices included)."""
    if not p.offset:
        return rows
    from attnprec.analysis.bounds.attention import sample_rows

    n_q = p.q.shape[-2] - p.offset
    idx = sample_rows(n_q, rows, seed)
    return p.offset + (torch.arange(n_q) if idx is None else idx)


def _judge(
    lay: _Layout,
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: Mapping[str, Any],
    precision: Any,
    bound_options: Mapping[str, Any] | None,
    flags: Mapping[str, bool],
    label: str,
    rows: Any = None,
    seed: int = 0,
    *,
    out: Any = None,
    fn: Callable[..., Any] | None = None,
    cu_seqlens: Any = None,
    cu_seqlens_k: Any = None,
) -> tuple[AuditReport, list[_Piece]]:
    """Audit each piece of ``out`` (the caller's layout), or of the output of ``fn``, as
    :func:`audit_output` does, on its query ``rows`` (drawn with ``seed``; None: every row).

    ``fn`` runs once, on copies of the inputs (and ``cu_seqlens``, ``cu_seqlens_k`` where
    given), after every piece's references are computed: they check the keywords'
    values, so a bad one is reported naming it before the kernel runs (a wrong ``log_g``
    shape used to reach the kernel).
    Returns the report (with the arguments ``fn`` wrote into) and the pieces, with their
    outputs."""

    def checked(x: Any, who: str) -> torch.Tensor:
        x = _as_output(x, "out: expected")
        if tuple(x.shape) != lay.out_shape:
            raise ValueError(f"{who} shape {tuple(x.shape)}, expected {lay.out_shape} ({lay.what})")
        return x

    prec = as_precision(precision, q.dtype)

    def pend(p: _Piece) -> _Pending:
        return _pending(
            method, p.q, p.k, p.v, prec, "given", bound_options, flags["allow_unbounded"],
            flags["allow_atypical"], _shifted(rows, seed, p), seed, p.params,
        )  # fmt: skip

    pieces = lay.pieces(q, k, v, params, prec)
    mutated: list[str] = []
    pending: list[_Pending] = []
    if fn is None:
        out = checked(out, "out: got")
    else:  # every piece's references (its keywords' checks) before the kernel
        pending = [pend(p) for p in pieces]
        out, mutated = _call(fn, q, k, v, params, cu_seqlens, cu_seqlens_k)
        out = checked(out, f"fn: {getattr(fn, '__name__', type(fn).__name__)} returned")
    whole = lay.internal(out)
    pieces = [lay.with_output(p, whole) for p in pieces]
    report = AuditReport()
    for p in pieces:  # (each piece's references freed once judged)
        now = pending.pop(0) if pending else pend(p)
        report = report + now.finish(
            None, p.out, label if p.seq is None else f"{label}, sequence {p.seq}"
        )
    for c in report.cases:
        c.mutated = list(mutated)
    if mutated and not report.cases:  # (every packed sequence empty: no case to fail)
        raise AssertionError(
            f"fn: {getattr(fn, '__name__', type(fn).__name__)} wrote into its inputs "
            f"({', '.join(mutated)}); every sequence is empty, so nothing else was judged"
        )
    return report, pieces


def _in_rows(case: AuditCase, idx: Sequence[int]) -> tuple[int, ...]:
    """A case's ``[..., t, c]`` index, ``t`` among the rows it judged, as an output index."""
    *batch, t, c = (int(i) for i in idx)
    return (*batch, t if case.rows is None else case.rows[t], c)


def _ulp(x: float, fmt: Any) -> float:
    """The spacing of ``fmt`` at ``x`` (its subnormal spacing below the normal range)."""
    ax = abs(x)
    if not math.isfinite(ax):
        return math.nan
    e = max(math.floor(math.log2(ax)) if ax > 0 else fmt.emin, fmt.emin)
    return 2.0 * fmt.u * 2.0**e


def _worst(case: AuditCase) -> tuple[str, dict[str, Any]]:
    """The check and the element that show the case's most severe failing class."""
    checks = [("total", case.total)] + (
        [("rounding", case.rounding)] if case.rounding is not None else []
    )
    ranked = [
        (CLASSES.index(c.worst["class"]) if c.worst and c.verdict != "ok" else -1, -i, key, c)
        for i, (key, c) in enumerate(checks)
    ]
    _, _, key, chk = max(ranked, key=lambda r: (r[0], r[1]))
    return chk.against, chk.worst


def _explain(
    report: AuditReport,
    pieces: list[_Piece],
    lay: _Layout,
    method: str,
    prec: Any,
    default: bool,
    who: str,
    var: str,
) -> str:
    """What failed, where in the caller's layout, by how much, which part of the bound
    holds there, the declaration and how to change it."""
    n = {c: report.count(c) for c in CLASSES}
    total = sum(c.elements for c in report.cases)
    seqs = f" over {len(pieces)} sequences" if lay.packed else ""
    # (a sampled case is undecided where the kernel gave inf or NaN on a row not judged)
    rows_off = [r for c in report.cases for r in c.unjudged_nonfinite]
    off = ""
    if rows_off:  # (the first few, as case rows: a sampled call is one unpacked case)
        shown = ", ".join(map(str, rows_off[:5])) + (", ..." if len(rows_off) > 5 else "")
        off = f", inf or NaN on {len(rows_off)} row(s) not judged (rows {shown})"
    # (a sample says so in the headline: its counts are of the rows judged only)
    sampled = [c.sampled for c in report.cases if c.rows is not None]
    judged = f" ({', '.join(sampled)} rows judged)" if sampled else ""
    lines = [
        f"{who} is not within the error bound of {method} attention ({report.verdict}): "
        f"{n['violated']} of {total} elements{judged} violated, {n['unbounded']} unbounded, "
        f"{n['undecided']} undecided, {n['atypical']} atypical{off}{seqs}"
    ]
    bad = [(p, c) for p, c in zip(pieces, report.cases, strict=True) if c.verdict != "ok"]
    mutated = next((c.mutated for _, c in bad if c.mutated), None)
    if mutated:  # (the same write in every case: said once)
        lines.append(f"  the function wrote into its inputs: {', '.join(mutated)}")
    first = next(((p, c) for p, c in bad if _failing(c)), None)
    if first is not None:
        p, c = first
        against, w = _worst(c)
        user, words = lay.locate(p, _in_rows(c, w["index"]))
        idx = ", ".join(str(i) for i in user)
        lines.append(f"  first failing element: {var}[{idx}] ({words}; {lay.what}): {w['class']}")
        err, bnd, got, ref = w["error"], w["bound"], w["output"], w["reference"]
        if not math.isfinite(got) and math.isfinite(ref):
            lines.append(f"    {var} = {got!r} where the exact value is finite: {ref!r}")
        elif math.isnan(ref):
            lines.append(f"    {var} = {got!r}, exact value unknown or NaN (reference {ref!r})")
        else:
            ulps = err / _ulp(ref, prec.storage)
            if math.isfinite(bnd):
                ratio = err / bnd if bnd > 0 else math.inf
                rel = ">" if w["class"] == "violated" else "vs"
                by = f"{rel} bound {bnd:.6g}: {ratio:.3g} times the bound"
            else:
                by = "with no finite bound (not checked)"
            lines.append(
                f"    |{var} - exact| = {err:.6g} {by}, {ulps:.3g} ulp of {prec.storage.name} "
                f"at the exact value; {var} = {got!r}, exact = {ref!r}"
            )
        parts = {key: w[key] for key in ("rounding", "quantization", "approximation")}
        if against.startswith("rounding"):
            parts = {"rounding": w["rounding"]}
        top = max(parts, key=lambda key: parts[key])
        what = ", ".join(
            f"{key} {val:.3g}" + (" (dominant)" if key == top and len(parts) > 1 else "")
            for key, val in parts.items()
        )
        lines.append(f"    check: {against}; the bound there: {what}")
        far = _largest_ratio(bad)
        at = _in_rows(c, w["index"])
        if far is not None and far[0] > 1 and not (far[1] is p and far[2] == at):
            ratio, fp, fidx, err, bnd, check = far
            user, words = lay.locate(fp, fidx)
            idx = ", ".join(str(i) for i in user)
            lines.append(
                f"  largest error/bound: {var}[{idx}] ({words}): |{var} - ref| = {err:.6g}, "
                f"bound {bnd:.6g}: {ratio:.3g} times the bound ({check} check)"
            )
    if len(bad) > 1:
        per = "; ".join(
            f"sequence {p.seq}: {c.verdict}" if p.seq is not None else c.verdict for p, c in bad
        )
        lines.append(f"  failing: {per}")
    dflt = (
        " (the default for these inputs: fp32 work, one rounding at the store)" if default else ""
    )
    lines.append(f"  declared precision: {prec.describe()}{dflt}")
    # (the declarations that describe the usual kernels, each case's: the narrowest first)
    fails = [c for c in report.cases if c.verdict != "ok"]
    lines.extend(f"    {h}" for h in dict.fromkeys(h for c in fails for h in c.hints))
    given = {str(p.q.dtype).removeprefix("torch.") for p in pieces}
    held = prec.storage.torch_dtype
    if held is not None and any(p.q.dtype != held for p in pieces):
        lines.append(
            f"    the declared storage {prec.storage.name} is not the inputs' dtype "
            f"({', '.join(sorted(given))}): the rounding check takes them as rounded to it"
        )
    if lay.name == "bhtd" and total and n["violated"] >= 0.9 * total:
        # (nearly every element: the axes may be read wrongly; a review's [B, T, H, D]
        # tensors passed without layout= were violated everywhere with no word of the
        # layout, and another's on all but one element, which agreed by chance)
        lines.append(
            f"    {n['violated']} of {total} elements are violated: if the tensors are "
            "[B, T, H, D] (flash-attention's layout), pass layout='bthd'"
        )
    accepted = {a for c in report.cases for a in c.accepted}
    nonfinite = sum(c.unbounded_nonfinite for c in report.cases)
    if nonfinite:
        lines.append(
            f"    inf or NaN on {nonfinite} unbounded elements: the declared precision may "
            "overflow there (named below), so no proof of a defect; never accepted, not even "
            "by allow_unbounded=True"
        )
    if n["unbounded"] and "unbounded" not in accepted and not nonfinite:
        lines.append("    unbounded elements were not checked: allow_unbounded=True accepts them")
    if n["atypical"] and "atypical" not in accepted:
        lines.append(
            "    atypical elements are inside the sound bound but beyond the probabilistic "
            "one: allow_atypical=True accepts them"
        )
    return "\n".join(lines)


def _largest_ratio(
    bad: list[tuple[_Piece, AuditCase]],
) -> tuple[float, _Piece, tuple[int, ...], float, float, str] | None:
    """The element with the largest error / finite bound over the failing cases: (ratio,
    piece, its ``[..., t, c]`` index, error, bound, check)."""
    best: tuple[float, _Piece, tuple[int, ...], float, float, str] | None = None
    for p, c in bad:
        for key, (err, bnd) in c.arrays.items():
            keep = np.isfinite(bnd) & (bnd > 0) & np.isfinite(err)
            if not keep.any():
                continue
            ratio = np.where(keep, err / np.where(keep, bnd, 1.0), -np.inf)
            i = int(ratio.argmax())
            if best is None or ratio[i] > best[0]:
                assert p.out is not None  # (the pieces of _judge hold their outputs)
                shape = list(p.out.shape)
                if c.rows is not None:
                    shape[-2] = len(c.rows)
                idx = _in_rows(c, [int(j) for j in np.unravel_index(i, tuple(shape))])
                best = (float(ratio[i]), p, idx, float(err[i]), float(bnd[i]), key)
    return best


def _failing(case: AuditCase) -> bool:
    """Whether an element of ``case`` fails (a class present and not accepted), to tell a
    failure that is only a mutation."""
    unb = case.unbounded_nonfinite > 0  # (inf or NaN on an unbounded element: never accepted)
    return unb or any(case.counts[c] for c in CLASSES if c != "within" and c not in case.accepted)


def _fail(
    report: AuditReport,
    pieces: list[_Piece],
    lay: _Layout,
    case: dict[str, Any],
    prec: Any,
    default: bool,
    who: str,
    var: str,
    fn: Any = None,
) -> None:
    """Raise :class:`BoundViolation` for a failing report, after saving ``case`` (and
    ``fn``'s identity in its name)."""
    where = _save(case, fn)
    how = replay_line(where, case["kernel"]) if case.get("out") is None else ""
    how = how or f"attnprec replay {where}"
    text = _explain(report, pieces, lay, case["method"], prec, default, who, var)
    detail = "\n".join(c.describe() for c in report.cases if c.verdict != "ok")
    order = (
        "[..., T, D]" if lay.name == "...td" else ("[H, T, D]" if lay.packed else "[B, H, T, D]")
    )
    seq = " of each sequence" if lay.packed else ""
    raise BoundViolation(
        f"{text}\n  inputs saved to {where}; replay: {how} (or attnprec.testing.replay)\n"
        f"details (indices in attnprec's {order} order{seq}):\n{detail}",
        report,
        where,
    )


# --------------------------------------------------------------------------------------------
# The assertions


def assert_within_bound(
    fn: Callable[..., torch.Tensor],
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    precision: Any = None,
    bound_options: Mapping[str, Any] | None = None,
    allow_unbounded: bool = False,
    allow_atypical: bool = False,
    layout: str = "...td",
    cu_seqlens: Any = None,
    rows: Any = None,
    seed: int = 0,
    **params: Any,
) -> AuditReport:
    """Assert that ``fn(q, k, v, **params)`` is within the certified error bound of ``method``.

    Checks the arguments and computes the certified references (which check every
    keyword's value: a bad one raises naming it before ``fn`` runs), runs ``fn``, computes
    the bound for the declared ``precision`` (see :func:`attnprec.analysis.audit.audit`),
    and fails when any output
    element is provably outside the sound bound (or inf/NaN where the exact value is
    finite), cannot be proved inside it, has no finite bound (was not checked), or is
    provably beyond the probabilistic bound (the last two can be accepted), or when ``fn``
    writes into its inputs.

    Parameters
    ----------
    fn : callable
        The implementation under test, called once as ``fn(q, k, v, **params)`` (with
        ``cu_seqlens=`` too when given) on copies of the inputs, in the caller's layout.
    method : str
        The method whose reference and bound apply.
    q, k, v : torch.Tensor
        Inputs (taken as exact), in ``layout`` (see :func:`assert_attention_close`).
    precision : Precision or format-like, optional
        Where ``fn`` stores, computes and accumulates (default: storage in ``q``'s dtype,
        fp32 compute and accumulate). Declaring wider formats than ``fn`` really uses gives
        a bound too small for it, and the assertion may fail.
    bound_options : mapping, optional
        ``target``, ``confidence`` (of the probabilistic bound), ``block`` for the bound
        only (see :func:`attnprec.analysis.audit.audit`).
    allow_unbounded, allow_atypical : bool
        Accept elements whose bound is infinite (not checked), or that lie beyond the
        probabilistic bound but within the sound one.
    layout : {"...td", "bhtd", "bthd"}
        The axes of ``q, k, v`` and of the output (default ``[..., T, D]``); grouped K/V
        heads and ``cu_seqlens`` as in :func:`assert_attention_close`.
    cu_seqlens : integer tensor [B + 1], optional
        Packed variable-length sequences (as :func:`assert_attention_close`).
    rows, seed : optional
        Judge only these query rows (positions of the sequence axis): indices, or a count
        drawn with ``seed`` (the first and last rows and chunk boundaries included, as
        :func:`attnprec.analysis.audit.audit` draws them). ``fn`` still runs on every
        row; the report's cases list the rows judged. Not with ``cu_seqlens``.
    **params
        The method's keywords, passed to ``fn``, the reference and the bound alike (a
        ``key_mask`` in the caller's form, as :func:`assert_attention_close` takes it).

    Returns
    -------
    AuditReport
        The audit, when the assertion holds (for tightness checks): one case, or one per
        non-empty sequence of a packed batch.

    Raises
    ------
    BoundViolation
        An ``AssertionError`` whose message says where (in the caller's layout), by how
        much, and which part of the bound (quantization, approximation, rounding) dominates
        there; its ``.path`` is the saved case.
    ValueError, TypeError
        Bad inputs, naming the argument (``q``, ``k``, ``v``, ``layout``, ``cu_seqlens``,
        ``key_mask``, ...), ``fn`` not callable, or an output of the wrong shape or type
        (naming ``fn``).
    """
    if not callable(fn):
        raise TypeError(f"fn: expected a callable kernel, got {type(fn).__name__}")
    flags = {"allow_unbounded": allow_unbounded, "allow_atypical": allow_atypical}
    flags = {name: check_bool(name, x) for name, x in flags.items()}
    if rows is not None and cu_seqlens is not None:
        raise ValueError("rows: not with cu_seqlens (the packed sequences' rows differ)")
    lay = _layout(layout, q, k, v, cu_seqlens, method, params)
    method_record(method).check(params)
    name = str(getattr(fn, "__name__", type(fn).__name__))
    report, pieces = _judge(
        lay, method, q, k, v, params, precision, bound_options, flags, name, rows, seed,
        fn=fn, cu_seqlens=cu_seqlens,
    )  # fmt: skip
    if not report.ok:
        case = {"method": method, "q": q, "k": k, "v": v, "params": params,
                "precision": precision, "bound_options": dict(bound_options or {}),
                "flags": flags, "kernel": _path_of(fn), "layout": layout,
                "cu_seqlens": cu_seqlens, "rows": rows, "seed": seed}  # fmt: skip
        prec = as_precision(precision, q.dtype)
        _fail(report, pieces, lay, case, prec, precision is None, f"{name}(q, k, v)", "out", fn)
    return report


def assert_attention_close(
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    method: str = "softmax",
    precision: Any = None,
    layout: str = "bhtd",
    causal: bool = False,
    scale: float | None = None,
    window: int | None = None,
    key_mask: torch.Tensor | None = None,
    cu_seqlens: Any = None,
    cu_seqlens_k: Any = None,
    causal_align: str | None = None,
    bound_options: Mapping[str, Any] | None = None,
    allow_unbounded: bool = False,
    allow_atypical: bool = False,
    rows: Any = None,
    seed: int = 0,
    **params: Any,
) -> AuditReport:
    """Assert that a kernel's output ``out`` is within the certified error bound of its
    inputs: a drop-in for ``torch.testing.assert_close(out, ref, atol=..., rtol=...)``.

    Computes the certified reference of ``method`` on ``q, k, v`` (taken as exact) and the
    sound error bound for the declared ``precision``, and classifies every element as
    :func:`attnprec.analysis.audit.audit` does. The assertion holds when every element is
    *within*: ``|out - exact| <= bound`` is then proved, with ``exact`` the exact attention
    of the stored inputs (and of the method's exact target, e.g. softmax for Taylor
    attention, with the total bound). It fails when an element is *violated* (provably
    outside the bound, or inf/NaN where the exact value is finite), *undecided*,
    *unbounded* (no finite bound: not checked) or *atypical* (beyond the probabilistic
    bound); the last two can be accepted.

    Parameters
    ----------
    out : torch.Tensor
        The kernel's output for ``q, k, v``, in ``layout``, on any device (compared in
        float64 on the CPU).
    q, k, v : torch.Tensor
        The kernel's inputs, in ``layout``, one floating dtype; K and V may have fewer heads
        than Q (``H_q`` a multiple of ``H_kv``; one for multi-query attention): query head
        ``h`` attends with K/V head ``h // (H_q // H_kv)``, as ``repeat_interleave`` (and
        PyTorch's ``enable_gqa``) expands them.
    method : str
        The method whose reference and bound apply (:mod:`attnprec.methods`).
    precision : Precision or format-like, optional
        Where the kernel stores, computes and accumulates. Default ``Precision(q.dtype)``:
        storage in ``q``'s format, **fp32 compute and accumulation, one rounding at the
        store**, any summation order and blocking: a fused kernel that keeps its weights in
        fp32. Kernels that cast the weights to the storage format before weights @ v
        (FlashAttention 2 and 3, Triton's fused attention, PyTorch's CPU flash kernel)
        declare ``Precision(q.dtype, weights=q.dtype)``; code that computes its scores and
        weights in the storage format (plain PyTorch on fp16 tensors) declares
        ``Precision("fp16", compute="fp16", accumulate="fp32")``, a much larger bound. A
        declaration of wider formats than the code uses gives a bound too small for it; one
        of coarser formats, a bound so large that small defects pass.
    layout : {"bhtd", "bthd", "...td"}
        The axes of ``q, k, v`` and ``out``: ``[B, H, T, D]`` (as SDPA, the default),
        ``[B, T, H, D]`` (as flash-attention), or ``[..., T, D]`` (any batch dims,
        broadcasting; no grouped heads). With ``cu_seqlens`` the batch axis is gone and
        ``T`` is the packed total: ``[H, total_T, D]``, ``[total_T, H, D]`` (flash-attention's
        varlen functions), ``[..., total_T, D]``.
    causal : bool
        Key ``j`` visible to query ``i`` only when ``j <= i`` (within each sequence); with
        fewer queries than keys, as ``causal_align`` says.
    scale : float, optional
        Score scale (default the method's, ``1/sqrt(D)`` for softmax).
    window : int, optional
        A causal sliding window: query ``i`` sees keys ``i - window < j <= i`` (positions
        as ``causal_align`` aligns them).
    key_mask : bool torch.Tensor, optional
        True for the keys attended, False for padding: ``[T_k]``, ``[B, T_k]`` (every head)
        or ``[B, H_q, T_k]`` for ``"bhtd"``/``"bthd"`` (packed: ``[total_T]`` or ``[H_q,
        total_T]``); ``[..., T_k]`` broadcasting against the batch dims for ``"...td"``.
    cu_seqlens : integer tensor [B + 1], optional
        Cumulative sequence offsets of a packed batch (``0, T_0, T_0 + T_1, ...``), shared
        by queries and keys: each sequence is judged on its own, attending only within
        itself (causal within itself when ``causal``), and the report aggregates them.
    cu_seqlens_k : integer tensor [B + 1], optional
        The keys' offsets where they differ from the queries' (``cu_seqlens``), as
        flash-attention's ``cu_seqlens_q``/``cu_seqlens_k``: chunked prefill, a decode step
        of several tokens per sequence.
    causal_align : {None, "top_left", "bottom_right"}
        Where a causal mask puts ``n_q`` queries among ``n_k > n_q`` keys (of each
        sequence), needed then and only then: ``"bottom_right"``, query ``i`` sees the keys
        ``j <= i + n_k - n_q``, the last query every key (flash-attention >= 2.1, decoding
        over a KV cache); ``"top_left"``, ``j <= i`` (PyTorch's ``is_causal``). A bottom-right
        case is judged as the last ``n_q`` rows of a square causal one whose first rows are
        zero queries (never judged; the messages give the caller's positions, the
        report's case rows those of the square case).
    bound_options : mapping, optional
        ``target``, ``confidence``, ``block`` for the bound only (as
        :func:`attnprec.analysis.audit.audit`).
    allow_unbounded, allow_atypical : bool
        Accept elements with no finite bound (not checked) or beyond the probabilistic bound.
    rows, seed : optional
        Judge only these query rows (positions of the sequence axis): indices, or a count
        drawn with ``seed``, as :func:`assert_within_bound` takes them (e.g. the rows a
        left-padded causal batch does not pad, whose padding rows see no key). Not with
        ``cu_seqlens``.
    **params
        The method's other keywords (``degree``, ``projection``, ``softcap``, ...).

    Returns
    -------
    AuditReport
        The audit when the assertion holds: one case, or one per non-empty sequence; its
        tightness (least bound / error) says how close the output came to the bound.

    Raises
    ------
    BoundViolation
        An ``AssertionError`` naming the first failing element in the caller's layout
        (batch, head, position, channel; a packed sequence and position), the error against
        the bound (also in ulps of the storage format), the part of the bound that dominates
        there, the declaration, and the saved file to replay; ``.report`` holds the audit,
        ``.path`` the file.
    ValueError, TypeError
        Inconsistent shapes or types, naming the argument (``q``, ``k``, ``v``, ``out``,
        ``layout``, ``cu_seqlens``, ``key_mask``, ``window``, ...).
    """
    kw = dict(params, causal=causal)
    for key, val in (("scale", scale), ("window", window), ("key_mask", key_mask)):
        if val is not None:
            kw[key] = val
    method_record(method).check(kw)
    flags = {"allow_unbounded": allow_unbounded, "allow_atypical": allow_atypical}
    flags = {name: check_bool(name, x) for name, x in flags.items()}
    if rows is not None and cu_seqlens is not None:
        raise ValueError("rows: not with cu_seqlens (the packed sequences' rows differ)")
    lay = _layout(layout, q, k, v, cu_seqlens, method, kw, cu_seqlens_k, causal_align, True)
    report, pieces = _judge(
        lay, method, q, k, v, kw, precision, bound_options, flags, "out", rows, seed, out=out
    )
    if not report.ok:
        case = {"method": method, "q": q, "k": k, "v": v, "out": out, "params": kw,
                "precision": precision, "bound_options": dict(bound_options or {}),
                "flags": flags, "kernel": None, "layout": layout,
                "cu_seqlens": cu_seqlens, "cu_seqlens_k": cu_seqlens_k,
                "causal_align": causal_align, "rows": rows, "seed": seed}  # fmt: skip
        prec = as_precision(precision, q.dtype)
        _fail(report, pieces, lay, case, prec, precision is None, "out", "out")
    return report


def _call(
    fn: Callable[..., Any],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: Mapping[str, Any],
    cu_seqlens: Any,
    cu_seqlens_k: Any,
) -> tuple[Any, list[str]]:
    """``fn`` on copies of its arguments (the audit's runner): its output and the
    arguments it wrote into. The packing's offsets are passed where given: a kernel over
    keys packed apart from its queries needs ``cu_seqlens_k`` too."""
    name = str(getattr(fn, "__name__", type(fn).__name__))
    packing = {"cu_seqlens": cu_seqlens, "cu_seqlens_k": cu_seqlens_k}
    kw = {**params, **{key: x for key, x in packing.items() if x is not None}}
    return _run(fn, name, q, k, v, kw)


def replay_line(where: Path, kernel: str | None) -> str:
    """The command that replays the case saved at ``where`` by running its kernel again:
    ``--kernel`` where it cannot be imported back (``kernel`` None, :func:`_path_of`), and
    the folder its module was imported from on ``PYTHONPATH`` where the working directory
    does not hold it (a test module: pytest put its folder on the path; ``replay`` imports
    from the working directory; a review's printed line failed)."""
    how = f"attnprec replay {where}"
    if kernel is None:
        return how + " --kernel MODULE:FUNCTION"
    module = kernel.partition(":")[0]
    file = getattr(sys.modules.get(module), "__file__", None)
    top = module.partition(".")[0]
    if file is None or importlib.machinery.PathFinder.find_spec(top, [os.getcwd()]):
        return how
    levels = module.count(".") + (Path(file).name == "__init__.py")
    root = Path(file).resolve().parents[levels]
    if not root.is_relative_to(Path.cwd().resolve()):
        return how  # (installed: importable from anywhere)
    return f"PYTHONPATH={os.path.relpath(root)} {how}"


def _path_of(fn: Any) -> str | None:
    """``"module:qualname"`` of ``fn`` when it can be imported back, else None."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or not name or "<" in name or module == "__main__":
        return None  # (a callable object, an nn.Module, has no name to import it by)
    obj: Any = sys.modules.get(module)
    for part in name.split("."):
        obj = getattr(obj, part, None)
    return f"{module}:{name}" if obj is fn else None


def _save(case: dict[str, Any], fn: Any = None) -> Path:
    folder = Path(os.environ.get("ATTNPREC_FAILURES", ".attnprec/failures"))
    folder.mkdir(parents=True, exist_ok=True)
    # the name covers the whole case and the kernel (its source line where it cannot be
    # imported back): two failures on the same inputs with another kernel, keyword or
    # declaration must not overwrite each other (a replay then judged the wrong case)
    digest = hashlib.sha1()
    _digest(case, digest)
    _digest(_identity(fn), digest)
    path = folder / f"{case['method']}-{digest.hexdigest()[:12]}.pt"
    torch.save(case, path)
    return path


def _identity(fn: Any) -> str:
    """Where ``fn`` is defined (module, name, source line), or '' without ``fn``."""
    if fn is None:
        return ""
    code = getattr(fn, "__code__", None) or getattr(type(fn).__call__, "__code__", None)
    where = f"{code.co_filename}:{code.co_firstlineno}" if code is not None else ""
    name = getattr(fn, "__qualname__", type(fn).__qualname__)
    return f"{getattr(fn, '__module__', '')}:{name}@{where}"


def _digest(x: Any, h: Any) -> None:
    """Feed ``x`` (tensors by dtype, shape and bytes; mappings in key order) to ``h``."""
    if isinstance(x, torch.Tensor):
        h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
        h.update(_bytes(x))
    elif isinstance(x, Mapping):
        h.update(b"{")
        for key in sorted(x, key=str):
            h.update(repr(key).encode())
            _digest(x[key], h)
        h.update(b"}")
    elif isinstance(x, (list, tuple)):
        h.update(b"[")
        for y in x:
            _digest(y, h)
        h.update(b"]")
    else:
        h.update(repr(x).encode())


def _bytes(x: torch.Tensor) -> bytes:
    # raw bytes, any dtype (bf16 and fp8 have no numpy type); a view with the neg bit set
    # holds its values negated lazily, which a dtype view cannot read
    x = torch.resolve_neg(x.detach()).cpu().contiguous()
    return x.reshape(-1).view(torch.uint8).numpy().tobytes()


def replay(path: str | os.PathLike[str], kernel: Any = None) -> AuditReport:
    """Audit again the case a failing assertion saved at ``path``.

    A case of :func:`assert_attention_close` holds the output it judged, which is judged
    again unless ``kernel`` is given; a case of :func:`assert_within_bound` runs its
    function (or ``kernel``) again on the saved inputs, in the saved layout.

    Parameters
    ----------
    path : str or path-like
        The ``.pt`` file named in the failure's message.
    kernel : callable or str, optional
        The implementation to audit (a callable, or ``"module:function"``), called as
        ``kernel(q, k, v, **params)`` (and ``cu_seqlens=``, ``cu_seqlens_k=`` where saved)
        in the saved layout; default the saved output, or the function that failed when
        it can be imported back.

    Returns
    -------
    AuditReport
        The audit (certified verdicts, as :func:`attnprec.analysis.audit.audit`); it does
        not raise on a failing verdict.

    Raises
    ------
    ValueError
        The file holds no saved case, or no kernel is known (naming ``kernel``).

    Notes
    -----
    The file is a pickle (a Precision, the function's name): load only files you trust,
    as loading one can run code.
    """
    from attnprec.runner import load_function

    try:  # (a saved case holds functions' names and a Precision: not weights only)
        case = torch.load(path, weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as e:
        raise ValueError(f"path: {path} holds no case saved by assert_within_bound ({e})") from None
    if not isinstance(case, dict) or "method" not in case:
        raise ValueError(f"path: {path} holds no case saved by assert_within_bound")
    fn = kernel if kernel is not None else case.get("kernel")
    out = case.get("out")
    if fn is None and out is None:
        raise ValueError("kernel: the failing function cannot be imported back; pass kernel=")
    if isinstance(fn, str):
        fn = load_function(fn)
    method, q, k, v, params = case["method"], case["q"], case["k"], case["v"], case["params"]
    layout, cu = case.get("layout", "...td"), case.get("cu_seqlens")
    lay = _layout(
        layout, q, k, v, cu, method, params, case.get("cu_seqlens_k"), case.get("causal_align"),
        "out" in case,
    )  # fmt: skip
    name = "out" if fn is None else str(getattr(fn, "__name__", type(fn).__name__))
    report, _ = _judge(
        lay, method, q, k, v, params, case["precision"], case["bound_options"], case["flags"],
        name, case.get("rows"), case.get("seed", 0), out=out, fn=fn, cu_seqlens=cu,
        cu_seqlens_k=case.get("cu_seqlens_k"),
    )  # fmt: skip
    return report
