"""The streaming engine under every bound: query rows in blocks, keys in chunks.

A bound of an attention output is a function of each query row i and the keys it sees
(every key, or keys ``j <= i`` when causal). :func:`stream` evaluates such a function over
blocks of rows (optionally a sample of the rows) and gathers the per-row results, so no
``[n_q, n_k]`` array is ever formed: a block holds ``rows x visible keys`` float64
entries, at most :data:`BUDGET`, and anything with a value dimension
(``[rows, keys, d_v]``) is reduced without forming it (:meth:`Normalized.deviation`,
:func:`sq_deviation`). Memory is
``O(BUDGET)`` beyond the inputs and outputs.

Also here: the certified float64 normalization of log-weights (:func:`normalize`) that
every normalized method's bound starts from.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from attnprec import _progress as progress
from attnprec._device import scaled
from attnprec.analysis.bounds.rounding import TINY, U64, gamma, sequence_sq, upper

__all__ = [
    "BUDGET",
    "Block",
    "Visible",
    "key_repeats",
    "logit_ties",
    "blocks",
    "stream",
    "row_positions",
    "sequence_max",
    "sq_deviation",
    "Normalized",
    "normalize",
    "normalize_signed",
    "logits64",
    "softcapped",
]

#: float64 entries of a ``[rows, keys]`` (or ``[rows, keys_chunk, d]``) temporary: 1 MB,
#: so a block's few dozen temporaries stay in cache (2^21 entries were 2.1x slower, with
#: three times the memory; larger blocks gain the log, taylor and gated bounds nothing
#: today, while softmax's, with more row-level work per block, takes four:
#: ``softmax.SOFTMAX_BUDGET``; benchmarks/bench_scale.py).
BUDGET = 2**17
#: Rows a block holds at least, within :data:`LONG_BUDGET` entries (long sequences).
MIN_ROWS = 32
#: Entries a block may take to hold :data:`MIN_ROWS` rows, whatever its own budget.
LONG_BUDGET = 16 * BUDGET


@dataclass(frozen=True)
class Block:
    """A block of query rows and the keys they see (float64, batch flattened to ``B``).

    Attributes
    ----------
    idx : torch.Tensor
        ``[r]`` int64: the rows' indices in the query sequence.
    q : torch.Tensor
        ``[B, r, d_k]``.
    k, v : torch.Tensor
        ``[B, m, d_k]``, ``[B, m, d_v]``: the keys ``k0 .. k0 + m - 1`` the rows may see
        (all of them; through the last row of the block when causal; from the first row's
        window on with a sliding window).
    mask : torch.Tensor or None
        ``[1 or B, r, m]`` bool, True where key j is visible to row i (None: every key).
    k0 : int
        The index of the first key held.
    causal_only : bool
        The mask is the plain causal one (fast paths use prefix maxima).
    center : torch.Tensor or None
        ``[..., 1, d_v]``: the mean of every value of the sequence (not only those held),
        the center of the deviation bounds, so a row's bound does not depend on which
        other rows share its block.
    running : dict or None
        Shared by the blocks of one plain causal stream (in increasing row order): the
        prefix extremes :meth:`vrange` has reached, so each key is scanned once per stream.
    source : torch.Tensor or None
        The stream's values ``[B, n_k, d_v]``, of which ``v`` is the slice :attr:`held`.
    memo : dict or None
        Shared by the blocks of one stream: :meth:`per_key`'s arrays.
    """

    idx: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    k0: int = 0
    causal_only: bool = False
    center: torch.Tensor | None = None
    running: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    source: torch.Tensor | None = field(default=None, compare=False, repr=False)
    memo: dict[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)

    def per_key(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``fn(v)`` on the keys the block holds, ``fn`` acting on each key's values alone:
        formed once per stream on :attr:`source` and sliced (``name`` names it in the
        stream; where a block holds one sampled row of a long sequence, re-forming its keys'
        side per block cost as much as its terms), else on ``v``."""
        if self.memo is None or self.source is None:
            return fn(self.v)
        held = self.source[..., self.held, :]
        same = (held.data_ptr(), held.stride()) == (self.v.data_ptr(), self.v.stride())
        if not same or held.shape != self.v.shape:
            return fn(self.v)  # (values not the stream's: a replaced block)
        if name not in self.memo:
            self.memo[name] = fn(self.source)
        return self.memo[name][..., self.held, :]

    @property
    def held(self) -> slice:
        """The keys the block holds, as a slice of the sequence's."""
        return slice(self.k0, self.k0 + self.k.shape[-2])

    @property
    def visible(self) -> torch.Tensor:
        """``[r]`` float64: the most keys a row sees over the batch (a count the bounds
        grow with, so the largest is the safe one)."""
        if self.mask is None:
            return torch.full((self.idx.numel(),), float(self.k.shape[-2]), dtype=torch.float64)
        if self.causal_only:  # keys k0 .. idx
            return (self.idx - self.k0 + 1).clamp(0, self.k.shape[-2]).to(torch.float64)
        return self.mask.sum(-1).amax(0).to(torch.float64)

    @functools.cached_property
    def span(self) -> torch.Tensor | None:
        """``[r]`` float64: where the keys a row sees are not a prefix of those held (a
        window, a key mask), the extent from its first to its last visible key over the
        batch (:func:`.softmax.schedule`); None where they are."""
        if self.mask is None or self.causal_only:
            return None
        pos = torch.arange(self.mask.shape[-1])
        first = torch.where(self.mask, pos, self.mask.shape[-1]).amin(-1)
        last = torch.where(self.mask, pos, -1).amax(-1)
        return (last - first + 1).clamp_min(0).amax(0).to(torch.float64)

    def in_sequence(self, p: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`.rounding.sequence_sq` of the weights ``p [B, r, m]`` and values ``v`` over
        the keys the rows see, in sequence order: ``([B, r, d_v], [B, r, 1])``; its tiles of
        keys at the sequence's multiples of their size, whichever key the block starts at
        (a review: under a window a sampled row's level was 13% below the full bound's)."""
        from attnprec.analysis.bounds.rounding import SEQUENCE_BLOCK

        if self.causal_only or self.mask is None or self.k0 % SEQUENCE_BLOCK == 0:
            return sequence_sq(p, v, self.mask, self.visible if self.causal_only else None)
        off = self.k0 % SEQUENCE_BLOCK  # hidden keys before the block's first: p = 0
        pad = torch.nn.functional.pad
        return sequence_sq(pad(p, (off, 0)), pad(v, (0, 0, off, 0)), pad(self.mask, (off, 0)))

    def keymask(self, sl: slice) -> torch.Tensor:
        """``[1 or B, r, mc]`` bool: the visibility of the keys ``sl`` (of those held)."""
        if self.mask is None:
            n = len(range(*sl.indices(self.k.shape[-2])))
            return torch.ones(1, self.idx.numel(), n, dtype=torch.bool)
        return self.mask[..., sl]

    def vrange(
        self, lo: torch.Tensor, hi: torch.Tensor, name: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, ``min_j lo_j`` and ``max_j hi_j`` over the visible keys: ``[B, r, d]``
        each, for per-key ``lo``, ``hi`` ``[B, m, d]``. ``name``: the arrays are this
        block's slice of one per-sequence pair (the same ``name`` in every block of the
        stream), so a causal stream continues its prefix extremes from the last block."""
        return (
            self._extreme(lo, False, None if name is None else name + " (lower)"),
            self._extreme(hi, True, None if name is None else name + " (upper)"),
        )

    def vmax(self, x: torch.Tensor, name: str | None = None) -> torch.Tensor:
        """:meth:`vrange`'s ``max_j x_j`` alone."""
        return self._extreme(x, True, name)

    def _extreme(self, x: torch.Tensor, largest: bool, name: str | None) -> torch.Tensor:
        r = self.idx.numel()
        B, m, d = x.shape
        if self.mask is None:
            ext = x.amax(-2, keepdim=True) if largest else x.amin(-2, keepdim=True)
            return ext.expand(B, r, d)
        pick = torch.maximum if largest else torch.minimum
        if self.causal_only:
            rel = self.idx - self.k0
            run = self.running
            done = None if run is None or name is None else run.get(name)
            h = 0 if done is None else done[1]
            if r and int(rel.min()) < h:  # not past the last block: from the start
                done, h = None, 0
            scan = torch.cummax if largest else torch.cummin
            c = scan(x[:, h:], -2).values
            if done is not None:
                c = pick(c, done[0])
            if run is not None and name is not None and c.shape[-2]:
                run[name] = (c[:, -1:], m)
            return c[:, rel - h]
        fill = -math.inf if largest else math.inf
        out = torch.full((B, r, d), fill, dtype=x.dtype)
        step = _chunk(m, r * max(d, 1))
        for s0 in range(0, m, step):
            sl = slice(s0, s0 + step)
            xs = torch.where(self.keymask(sl).unsqueeze(-1), x[:, None, sl], fill)
            out = pick(out, xs.amax(-2) if largest else xs.amin(-2))
        return out

    def sees(self, bad_key: torch.Tensor) -> torch.Tensor:
        """``[B, r]``: the rows that see a key marked in ``bad_key [B, m]``."""
        if self.mask is None:
            return bad_key.any(-1, keepdim=True).expand(bad_key.shape[0], self.idx.numel())
        if self.causal_only:  # a bad key at or before the row's own
            seen = bad_key.cumsum(-1, dtype=torch.int64) > 0
            return seen[:, (self.idx - self.k0).clamp(0, bad_key.shape[-1] - 1)]
        return (self.mask & bad_key.unsqueeze(-2)).any(-1)

    @functools.cached_property
    def _tail(self) -> int:
        """The first held key that some row does not see (the plain causal mask hides
        only keys past the block's first row, a ``[r, r]`` corner of the ``[r, m]`` block:
        masks touch those columns only); ``m`` where every key is visible."""
        m = self.k.shape[-2]
        if self.mask is None or not self.idx.numel():
            return m
        if self.causal_only:
            return max(0, min(m, int(self.idx.min()) - self.k0 + 1))
        return 0

    @functools.cached_property
    def hidden(self) -> torch.Tensor | None:
        """``~mask`` on the keys from :attr:`_tail` on (None: every key visible), formed
        once per block."""
        mask, t = self.mask, self._tail
        return None if mask is None or t == self.k.shape[-2] else ~mask[..., t:]

    def visible_amax(self, x: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
        """``x [..., r, m]``'s largest entries over ``dim`` (keepdim) among the visible keys
        (``-inf`` where none is): :meth:`masked` with ``-inf``, copying only the masked
        columns."""
        hidden, t = self.hidden, self._tail
        if hidden is None or t == 0 or not self._fits(x):
            return self.masked(x, -math.inf).amax(dim, keepdim=True)
        tail = x[..., t:].masked_fill(hidden, -math.inf).amax(dim, keepdim=True)
        return torch.maximum(x[..., :t].amax(dim, keepdim=True), tail)

    def _fits(self, x: torch.Tensor) -> bool:
        """Whether the mask broadcasts to ``x`` as it is (``x`` needs no expanding)."""
        ms = self.mask.shape if self.mask is not None else ()
        return x.dim() >= len(ms) and all(
            b in (1, a) for a, b in zip(x.shape[::-1], ms[::-1], strict=False)
        )

    def masked(self, x: torch.Tensor, fill: float, inplace: bool = False) -> torch.Tensor:
        """``x [..., r, m]`` with ``fill`` where the key is not visible (``inplace``: into
        ``x``, a temporary of the caller's); ``x`` itself where every key is visible."""
        hidden, mask, t = self.hidden, self.mask, self._tail
        if hidden is None or mask is None:
            return x
        if t == 0:
            return x.masked_fill_(hidden, fill) if inplace else x.masked_fill(hidden, fill)
        if not inplace:  # (a copy of x where it holds the mask's shape)
            if not self._fits(x):
                return x.masked_fill(~mask, fill)
            x = x.clone()
        x[..., t:].masked_fill_(hidden, fill)
        return x


def _chunk(n: int, per: int, budget: int = BUDGET) -> int:
    return max(1, min(n, budget // max(per, 1)))


def blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    rows: torch.Tensor | None = None,
    budget: int = BUDGET,
    width: int = 1,
    window: int | None = None,
    key_mask: torch.Tensor | None = None,
) -> Iterator[Block]:
    """Blocks of the rows ``rows`` (all when None, in increasing order) of ``q [..., n_q,
    d]`` with their visible keys; each block's ``batch x rows x keys x width`` within
    ``budget`` (at least one row).

    ``window``: a sliding window (with ``causal``: keys ``i - window < j <= i``);
    ``key_mask``: ``[B, n_k]`` bool, False for padding keys no row sees.
    """
    n_q, n_k = q.shape[-2], k.shape[-2]
    budget = scaled(budget)  # (larger on a GPU)
    idx_all = torch.arange(n_q) if rows is None else rows
    # the batch items (heads, channels) share each block: its temporaries are [..., B,
    # rows, keys] (times width), so the budget counts them (1536 channels of a selective
    # scan asked 19.5 GB at 128 tokens when it did not)
    width = max(width, 1) * max(math.prod(x.shape[:-2]) for x in (q, k, v))
    span = n_k if window is None else min(n_k, window + budget // max(n_k * width, 1))
    per, n_rows = max(span, 1) * max(width, 1), int(idx_all.numel())
    # at least MIN_ROWS rows while a block stays within LONG_BUDGET: a block's matmuls and
    # per-key terms read every key it holds, a cost its rows share (4 budgets: softmax's 256
    # rows at n = 65,536 in 0.33 GB instead of 0.85 GB, but one row per block at 2^20 and the
    # taylor bound up to 1.9x slower)
    long = max(budget, scaled(LONG_BUDGET))
    step = max(_chunk(n_rows, per, budget), min(MIN_ROWS, _chunk(n_rows, per, long)))
    plain = window is None and key_mask is None
    center = v.mean(-2, keepdim=True) if v.shape[-2] else None
    running: dict[str, Any] | None = {} if causal and plain else None
    memo: dict[str, torch.Tensor] = {}
    # causal rows in increasing order see a growing prefix: a block of early rows holds
    # fewer keys, so it takes more rows within the same budget (half the blocks at n = 4096)
    grow = causal and window is None and bool((idx_all[1:] >= idx_all[:-1]).all())
    s = 0
    progress.rows(0, n_rows)
    while s < n_rows:
        if grow:
            most = min(n_rows - s, long // (int(idx_all[s] + 1) * max(width, 1)) + 1)
            cost = torch.arange(1, most + 1) * (idx_all[s : s + most] + 1) * max(width, 1)
            fit = int(torch.searchsorted(cost, budget, right=True))
            fit_long = int(torch.searchsorted(cost, long, right=True))
            step = max(fit, min(MIN_ROWS, fit_long), 1)
        idx = idx_all[s : s + step]
        s += step
        hi = int(idx.max()) + 1 if causal and idx.numel() else n_k
        lo = max(0, int(idx.min()) - window + 1) if window is not None and idx.numel() else 0
        j = torch.arange(lo, hi)
        mask = None
        if causal:
            mask = (j.unsqueeze(0) <= idx.unsqueeze(1)).unsqueeze(0)
        if window is not None:
            near = (j.unsqueeze(0) > idx.unsqueeze(1) - window).unsqueeze(0)
            mask = near if mask is None else mask & near
        if key_mask is not None:
            keep = key_mask[:, lo:hi].unsqueeze(1)
            mask = keep if mask is None else mask & keep
        if mask is not None and mask.shape[-2] != idx.numel():
            mask = mask.expand(mask.shape[0], idx.numel(), mask.shape[-1])
        yield Block(idx, q[..., idx, :], k[..., lo:hi, :], v[..., lo:hi, :], mask, lo,
                    causal and plain, center, running, v, memo)  # fmt: skip
        progress.rows(s, n_rows)


@dataclass(frozen=True)
class Visible:
    """Which keys a query row sees, beyond all of them: ``causal`` (``j <= i``), a sliding
    ``window`` (causal only: ``i - window < j <= i``) and ``key_mask`` (``[B, n_k]`` bool,
    False for padding keys). The models take it wherever they take ``causal``."""

    causal: bool = False
    window: int | None = None
    key_mask: torch.Tensor | None = None

    def to(self, device: torch.device) -> Visible:
        """The same visibility, its key mask on ``device``."""
        return self if self.key_mask is None else replace(self, key_mask=self.key_mask.to(device))


#: Keys (times channels) per batch chunk of :func:`key_repeats` (its sort's temporaries).
REPEATS_CHUNK = 2**22


def key_repeats(
    k: torch.Tensor,
    causal: bool | Visible,
    n_q: int,
    idx: torch.Tensor | None,
    entries: bool = False,
) -> torch.Tensor:
    """The most keys with one value among those each query row sees: ``[B, rows, 1]``
    float64, >= 1 (``n_q`` rows, or those of ``idx``), from ``k [B, n_k, d_k]`` as the
    kernel computes with it (-0 and +0 alike); with ``entries``, the most keys with one
    value in any one channel (at least the former: equal keys have equal entries).

    The probabilistic level's model takes distinct roundings as independent, but a kernel
    repeats one rounding wherever it repeats an operation on the same operands: m equal keys
    give m equal weights, whose exp errors are one error; in log attention m equal entries
    of a channel give m equal ``exp(k_jc - m_c)`` (``entries``); and adding one term to a
    partial sum in one binade rounds by the same amount every time (the residue of the term
    modulo the sum's ulp decides it). By Cauchy-Schwarz, ``(sum of m equal errors'
    coefficients)^2 <= m (their squares' sum)``: the level's variance over the keys grows
    at most by this factor (docs/bounds/attention.md, "Repeated keys"). Keys a key mask
    hides count for no row; causal rows count their prefix (under a window, an upper
    bound); other rows every key.
    """
    b, n, d = k.shape
    vis = causal if isinstance(causal, Visible) else Visible(bool(causal))
    rows = torch.arange(n_q, device=k.device) if idx is None else idx.to(k.device)
    if n == 0 or d == 0 or b == 0:
        return torch.ones(b, rows.numel(), 1, dtype=torch.float64, device=k.device)
    count = torch.empty(b, n, dtype=torch.float64, device=k.device)
    step = max(1, REPEATS_CHUNK // (n * (d + 1)))
    for b0 in range(0, b, step):
        kc = k[b0 : b0 + step].to(torch.float64) + 0.0
        nb = kc.shape[0]
        if entries:
            keys = kc
        else:  # one group id per distinct key of the chunk
            keys = _row_groups(kc.reshape(nb * n, d)).reshape(nb, n, 1).to(torch.float64)
        if vis.key_mask is not None:  # hidden keys: NaN, each its own group
            hide = ~vis.key_mask[b0 : b0 + nb].to(k.device)
            keys = keys.masked_fill(hide.unsqueeze(-1), math.nan)
        # each key's occurrence index among the earlier keys with its value, per channel
        vals, order = torch.sort(keys.transpose(1, 2), dim=-1, stable=True)
        occ = torch.empty_like(order).scatter_(-1, order, _run_lengths(vals))
        count[b0 : b0 + nb] = occ.amax(1).to(torch.float64)
    if vis.causal:
        return count.cummax(1).values[:, rows, None]
    return count.amax(1)[:, None, None].expand(b, rows.numel(), 1)


def _grid_log2(x: torch.Tensor) -> int:
    """``log2`` of the largest power of two dividing every nonzero entry of ``x`` (float64,
    subnormals too; 0 when every entry is 0)."""
    nz = x[x != 0]
    if nz.numel() == 0:
        return 0
    m, e = torch.frexp(nz)
    mant = (m.abs() * 2.0**53).to(torch.int64)  # exact: |m| in [1/2, 1)
    low = torch.frexp((mant & -mant).to(torch.float64))[1] - 1  # trailing zero bits
    return int((e.to(torch.int64) - 53 + low).min())


def _row_groups(x: torch.Tensor) -> torch.Tensor:
    """One id per distinct row of ``x [N, d]`` (float64, no NaN, no -0): equal rows share
    it. A least-significant-column-first radix of stable sorts on the rows' bits: ``d``
    sorts of ``N``, where ``torch.unique(dim=0)`` compares rows one dispatched ``equal``
    at a time (281 -> 100 ms at 65,536 keys, one thread)."""
    n, d = x.shape
    cols = x.contiguous().view(torch.int64).T.contiguous()  # [d, N]
    order = torch.arange(n, device=x.device)
    for c in range(d - 1, -1, -1):
        order = order.index_select(0, torch.sort(cols[c].index_select(0, order), stable=True)[1])
    rows = cols.index_select(1, order)
    new = torch.ones(n, dtype=torch.int64, device=x.device)
    new[1:] = (rows[:, 1:] != rows[:, :-1]).any(0)
    return torch.empty_like(order).scatter_(0, order, new.cumsum(0) - 1)


def _run_lengths(vals: torch.Tensor) -> torch.Tensor:
    """Along the last dim of sorted ``vals``: each entry's place in its run of equal values,
    from 1 (NaN, unequal to itself, is a run of its own)."""
    pos = torch.arange(vals.shape[-1], device=vals.device).expand(vals.shape)
    start = torch.ones(vals.shape, dtype=torch.bool, device=vals.device)
    start[..., 1:] = vals[..., 1:] != vals[..., :-1]
    return pos - torch.cummax(torch.where(start, pos, 0), -1).values + 1


def logit_ties(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool | Visible,
    rows: torch.Tensor | None,
) -> torch.Tensor | None:
    """The most visible keys whose logit ``q_i . k_j`` equals one value, per row ``[B, rows,
    1]``, where the logits lie on a grid of at most ``n_k^2`` values (integer-like inputs,
    as the ``ties`` family's), else None: distinct keys then share a weight, and so the
    weight's exp rounding and the sums' repeated additions, which :func:`key_repeats` does
    not see. Every logit on such a grid is exact in float64 (fewer than 2^53 values)."""
    n = k.shape[-2]
    reach = float((q.abs().amax(-2) * k.abs().amax(-2)).sum(-1).amax()) if n else 0.0
    if not math.isfinite(reach) or n < 2:
        return None
    # values on the grid within [-reach, reach]: 2 reach / 2^(g_q + g_k) + 1 <= n^2 (logs:
    # grids of subnormals, or of 2^-600 each, would underflow)
    if reach > 0 and math.log2(2 * reach) - _grid_log2(q) - _grid_log2(k) > math.log2(n * n - 1):
        return None

    def ties(blk: Block) -> dict[str, torch.Tensor]:
        x = blk.masked(blk.q @ blk.k.transpose(-1, -2), math.nan, inplace=True)
        vals = torch.sort(x, dim=-1).values  # NaN (hidden) last, each its own run
        return {"m": _run_lengths(vals).amax(-1, keepdim=True).to(torch.float64)}

    return stream(ties, q, k, v, causal, rows)["m"]


def sees_all(causal: bool | Visible) -> bool:
    """Whether every row sees every key (no causal mask, window or key mask)."""
    vis = causal if isinstance(causal, Visible) else Visible(bool(causal))
    return not vis.causal and vis.window is None and vis.key_mask is None


def padding_max(Y: torch.Tensor, causal: bool | Visible) -> torch.Tensor | None:
    """The largest of ``Y [B, n, C]`` over the keys a key mask hides, ``[B, 1, C]``
    (``-inf`` where it hides none), None without a key mask: a kernel may take a shift over
    a sequence's unmasked keys, form every key's exp against it and mask the padding by a
    product. (A tile's keys past the causal diagonal or a window's edge are masked before
    the row's maximum it shifts by, as that maximum must leave them out.)"""
    vis = causal if isinstance(causal, Visible) else Visible(bool(causal))
    if vis.key_mask is None or Y.shape[-2] == 0:
        return None
    return Y.masked_fill(vis.key_mask.unsqueeze(-1), -math.inf).amax(-2, keepdim=True)


def sequence_max(
    causal: bool | Visible, exponents: Callable[[], torch.Tensor]
) -> torch.Tensor | None:
    """The largest of the key exponents ``exponents()`` ``[B, n_k, C]`` over the keys of the
    sequence that the padding mask keeps, ``[B, 1, C]``: a shift a kernel may take over keys
    that a row does not see (future ones, or ones outside its window). None (and
    ``exponents`` not called) where every row sees every such key."""
    vis = causal if isinstance(causal, Visible) else Visible(bool(causal))
    if not vis.causal:
        return None
    Y = exponents()
    if Y.shape[-2] == 0:
        return None
    if vis.key_mask is not None:
        Y = Y.masked_fill(~vis.key_mask.unsqueeze(-1), -math.inf)
    return Y.amax(-2, keepdim=True)


def stream(
    fn: Callable[[Block], dict[str, torch.Tensor]],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool | Visible,
    rows: torch.Tensor | None = None,
    budget: int = BUDGET,
    width: int = 1,
) -> dict[str, torch.Tensor]:
    """``fn`` over the row blocks (``width`` float64 entries per row and visible key); its
    per-row outputs (``[B, r, ...]``) concatenated on dim 1. Inputs ``[..., B, n, d]``
    float64; ``causal`` a bool or a :class:`Visible`."""
    vis = causal if isinstance(causal, Visible) else Visible(bool(causal))
    parts: dict[str, list[torch.Tensor]] = {}
    for blk in blocks(
        q, k, v, vis.causal, rows, budget, width, window=vis.window, key_mask=vis.key_mask
    ):
        for key, val in fn(blk).items():
            parts.setdefault(key, []).append(val)
    return {key: torch.cat(val, dim=1) for key, val in parts.items()}


def row_positions(rows: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Where query rows ``idx`` sit among the judged ``rows``, for arrays formed once per
    judged row (``idx`` itself where every row is judged): ``rows`` in any order (a review:
    ``searchsorted`` on rows out of order gave a row another row's share)."""
    if rows is None:
        return lambda idx: idx
    order = torch.argsort(rows, stable=True)
    ordered = rows[order]
    return lambda idx: order[torch.searchsorted(ordered, idx)]


#: Keys per row whose deviation |v_j - y_i| is formed exactly (the heaviest by weight).
TOP_KEYS = 16


def sq_deviation(
    weights: Sequence[torch.Tensor],
    v: torch.Tensor,
    y: torch.Tensor,
    products: Sequence[torch.Tensor] | None = None,
) -> list:
    """``sum_j w_ij (v_j - y_i)^2`` ``[B, r, d_v]`` for each ``w [B, r, m]`` of ``weights``,
    expanded into products with ``v`` and ``v^2`` (no ``[r, m, d_v]`` temporary; a model
    term, evaluated in float64 and clamped at 0 against cancellation). ``products``: each
    weight's ``w @ [v^2, v]``, where the caller formed it."""
    dv = v.shape[-1]
    if products is None:
        vv = torch.cat([v * v, v], -1)  # one product for both (a [r, m] weight is read once)
        products = [w @ vv for w in weights]
    out = []
    for w, wv in zip(weights, products, strict=True):
        out.append(
            (wv[..., :dv] - 2 * y * wv[..., dv:] + y * y * w.sum(-1, keepdim=True)).clamp_min(0.0)
        )
    return out


@dataclass(frozen=True)
class Normalized:
    """Normalized weights of a row block in float64 with certified radii.

    ``p [B, r, m]`` with ``|p - p_exact| <= pi``; ``y = p v [B, r, d_v]`` with
    ``|y - y_exact| <= eps_y``; ``v [B, m, d_v]`` the values ``y`` weighs.
    """

    p: torch.Tensor
    pi: torch.Tensor
    y: torch.Tensor
    eps_y: torch.Tensor
    v: torch.Tensor
    center: torch.Tensor | None = None
    #: whether ``p`` may be negative (False: ``p >= 0``, as :func:`normalize` forms it)
    signed: bool = True
    #: ``[B, r, 1]``, at least the exact ``sum_j exp(l_j - M)`` (:func:`normalize`'s
    #: normalizer in the units of the row's largest visible log-weight ``M``); None where
    #: not formed
    norm: torch.Tensor | None = None
    #: the row block whose values ``v`` are (:meth:`Block.per_key` forms :attr:`vv` once
    #: per stream), or None
    block: Block | None = field(default=None, compare=False, repr=False)

    @property
    def p_up(self) -> torch.Tensor:
        """Upper bound of the exact weights."""
        return self.p + self.pi

    @property
    def p_lo(self) -> torch.Tensor:
        """Lower bound of the exact weights (>= 0)."""
        return (self.p - self.pi).clamp_min(0.0)

    @functools.cached_property
    def _heavy(self) -> tuple[torch.Tensor, ...]:
        """What :meth:`deviation` needs of every weight it is given (one per block, shared by
        the shift models): each row's :data:`TOP_KEYS` heaviest keys, ``|v_j - y_i|`` and
        ``|v_j - c| + |y_i - c|`` on them, and ``|v - c|``, ``|y - c|``."""
        v, y = self.v, self.y
        m = v.shape[-2]
        c = v.mean(-2, keepdim=True) if self.center is None else self.center  # [B, 1, d_v]
        vc = (v - c).abs()
        yc = (y - c).abs()
        # (by |p|: signed weights; hidden keys, p = 0, never displace a visible one)
        top = (self.p.abs() if self.signed else self.p).topk(min(TOP_KEYS, m), dim=-1).indices
        at = top.unsqueeze(-1).expand(*top.shape, v.shape[-1])
        v_top = torch.gather(v.unsqueeze(1).expand(v.shape[0], top.shape[1], *v.shape[1:]), 2, at)
        d_top = (v_top - y.unsqueeze(-2)).abs()  # [B, r, K, d_v]
        tri_top = (v_top - c.unsqueeze(-2)).abs().add_(yc.unsqueeze(-2))
        return top, d_top, tri_top, vc, yc

    @property
    def v_center(self) -> torch.Tensor:
        """``|v - c|`` (:meth:`deviation`'s products with the weights: ``w @ v_center``)."""
        return self._heavy[3]

    def deviation(
        self, weights: Sequence[torch.Tensor], products: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """An upper bound of ``sum_j w_ij |v_j - y_exact_i|`` ``[B, r, d_v]`` for each ``w
        [B, r, m]`` (>= 0) of ``weights``.

        Exact (``|v_j - y_i|``) on each row's :data:`TOP_KEYS` heaviest keys by ``|p|``; on
        the others ``|v_j - c| + |y_i - c|`` (the triangle inequality; ``c`` the block's
        ``center``, else the mean of ``v``), the sum over every key (a product with ``|v -
        c|``: no ``[r, m, d_v]`` temporary) less that over the heaviest. Rows whose weight is
        spread are near the mean (within 2x of the exact sum); rows with a few heavy keys are
        exact on them. Plus ``eps_y_i sum_j w_ij``. ``inf`` where a weight is.
        ``products``: each weight's ``w @`` :attr:`v_center`, where the caller formed it.
        """
        top, d_top, tri_top, vc, yc = self._heavy
        m, K = self.v.shape[-2], top.shape[-1]
        out = []
        for i, w in enumerate(weights):
            w_sum = w.sum(-1, keepdim=True)
            w_top = torch.gather(w, -1, top).unsqueeze(-1)
            wvc = w @ vc if products is None else products[i]
            # |v - c| and |y - c| each within 1 rounding: the sum over every key rounded
            # up, that over the heaviest down (their products and sums, and the factors'
            # own roundings), then the difference and the sum (relative to their results)
            # (TINY: the products that underflow, in the sum and in the heaviest's)
            tri = upper((wvc + yc * w_sum + 2 * TINY) * (1 + 2 * U64), m + 5)
            tri.sub_((w_top * tri_top).sum(-2).mul_((1 - 2 * U64) * (1 - gamma(K + 5, U64))))
            exact = upper(((w_top * d_top).sum(-2) + TINY) * (1 + 2 * U64), K + 5)
            dev = upper(tri.clamp_min_(0.0).add_(exact), 3)
            dev = upper(dev + w_sum * self.eps_y + TINY, m + 5)
            out.append(dev.nan_to_num_(nan=math.inf))  # inf - inf, inf * 0: a weight is inf
        return out

    @functools.cached_property
    def p2(self) -> torch.Tensor:
        """``p^2`` ``[B, r, m]``, the weight of the probabilistic models' variances."""
        return self.p * self.p

    @functools.cached_property
    def vv(self) -> torch.Tensor:
        """``[v^2, v]`` ``[B, m, 2 d_v]``: what :func:`sq_deviation`'s products take, once
        per stream (:meth:`Block.per_key`) or block."""
        if self.block is not None and self.v is self.block.v:
            return self.block.per_key("[v^2, v]", lambda v: torch.cat([v * v, v], -1))
        return torch.cat([self.v * self.v, self.v], -1)

    @functools.cached_property
    def _p2_products(self) -> torch.Tensor:
        return self.p2 @ self.vv

    @property
    def q_n(self) -> torch.Tensor:
        """``sum_j p_ij^2 v_j^2`` ``[B, r, d_v]`` (a model term; the product that
        :attr:`sq_dev` takes too)."""
        return self._p2_products[..., : self.v.shape[-1]]

    @functools.cached_property
    def sq_dev(self) -> torch.Tensor:
        """``sum_j p_ij^2 (v_j - y_i)^2`` (:func:`sq_deviation`; a model term)."""
        return sq_deviation([self.p2], self.v, self.y, [self._p2_products])[0]


def normalize(
    logw: torch.Tensor,
    sigma: torch.Tensor,
    v: torch.Tensor,
    blk: Block,
    top: torch.Tensor | None = None,
    inplace: bool = False,
) -> Normalized:
    """Softmax of float64 log-weights ``logw [B, r, m]`` known within ``sigma`` of the exact
    ones (hidden keys masked), and the weighted values ``y`` with their radii.

    Computed as ``e_j = exp(-D_j)``, ``D_j = M - logw_j`` (``M`` the row maximum),
    ``p_j = e_j / S``, ``S = sum e``. Each exact exponential ``exp(l_j - M)`` (``|l_j -
    logw_j| <= sigma_j``) is ``e_j exp(+-g_j)``, up to ``2^-1022`` absolute where it
    underflows, with ``g_j = sigma_j + (1 + a) u D_j / (1 - u) + log1p(2 k u)`` (the
    subtraction's rounding and the float64 exp's model, :data:`ELEMENTARY` ``"libm"``: ``k``
    ulps, ``a`` times the argument's rounding); so the exact normalizer lies in ``[S / (1 +
    gamma_{m-1}) - G - m 2^-1022, S / (1 - gamma_{m-1}) + e^{g_max} (G + m 2^-1022)]`` with
    ``G = sum_j e_j g_j`` (``e^{-g} >= 1 - g``, ``e^g <= 1 + g e^{g_max}``), and
    ``|p_exact_j - p_j| <= p_j expm1(g_j + alpha) + eta`` with ``alpha`` the log of the
    normalizer's ratio to ``S`` (one division's rounding in) and ``eta`` the underflow's
    share. Per-row reductions only, no second log-sum-exp: the radius is first order in
    ``sigma_j`` and ``u D_j``, as tight as interval arithmetic on the softmax.
    ``top``: ``[B, r, 1]``, each row's largest visible ``logw``, where the caller holds it;
    ``inplace``: ``sigma`` is the caller's temporary (its hidden keys are set to 0 in it).
    """
    from attnprec.analysis.precision import ELEMENTARY

    libm = ELEMENTARY["libm"]
    # the terms each row sums: its visible keys (a hidden key's e is 0, its sums exact),
    # so that a row's radii do not depend on the rows that share its block
    n = blk.visible.view(-1, 1)
    eta = 2.0**-1022
    sigma = blk.masked(sigma, 0.0, inplace)
    M = blk.visible_amax(logw, -1) if top is None else top
    M = torch.where(torch.isfinite(M), M, torch.zeros_like(M))  # a row without keys
    # nD = -D <= 0; keys past 2000 (hidden ones too) have e = 0 and are covered by eta
    nD = blk.masked(torch.sub(logw, M).clamp_min_(-2000.0), -2000.0, inplace=True)
    e = torch.exp(nD)
    S = e.sum(-1, keepdim=True)
    c1 = (1 + libm.exp_arg) * U64 / (1 - U64)
    c0 = math.log1p(2 * libm.exp * U64)
    g_max = upper(sigma.amax(-1, keepdim=True) + c1 * 2000.0 + c0, 4)
    gs = gamma((n - 1).clamp_min(1), U64)
    S_ex = S / (1 - gs)  # >= sum e exactly
    G = upper(
        torch.einsum("...j,...j->...", e, sigma).unsqueeze(-1)
        - c1 * torch.einsum("...j,...j->...", e, nD).unsqueeze(-1)
        + c0 * S_ex,
        2 * n + 8,
    )
    p = e.div_(S.clamp_min(1e-300))  # (e is not read again)
    low = S / (1 + gs) * (1 - 8 * U64) - upper(G + n * eta, 4)
    high = upper(S_ex + torch.exp(g_max) * upper(G + n * eta, 2), 4)
    ok = low > 0
    lo_safe = torch.where(ok, low, torch.ones_like(low))
    alpha = torch.maximum(
        torch.log(S / ((1 - U64) * lo_safe)), torch.log((1 + U64) * high / S.clamp_min(1e-300))
    )
    alpha = torch.where(ok, upper(alpha.clamp_min(0.0), 4) + 16 * U64, math.inf)
    eta_row = torch.where(ok, upper(eta * torch.exp(g_max) / lo_safe, 4), math.inf)
    # t and pi: sums and products of nonnegative terms, a few roundings each (t into nD's
    # storage, pi into t's: nD is not read again)
    t = torch.add(sigma, nD, alpha=-c1, out=nD).add_(alpha + c0).mul_(1 + gamma(6, U64))
    pi = torch.expm1(t, out=t).mul_(p).nan_to_num_(nan=math.inf)
    pi = pi.add_(eta_row).mul_(1 + gamma(8, U64))
    pi = blk.masked(pi.clamp_max_(1 + 4 * U64), 0.0, inplace=True)
    y = p @ v
    # (pi + gamma p) |v|: one product (a [r, m] weight read once costs about a product);
    # TINY: the products of y and of this sum that underflow
    eps_y = upper(torch.addcmul(pi, p, gamma(n + 1, U64)) @ v.abs() + 2 * TINY, 2 * n + 5)
    return Normalized(p, pi, y, eps_y, v, blk.center, signed=False, norm=high, block=blk)


def normalize_signed(
    blk: Block, w: torch.Tensor, e_w: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, Normalized, torch.Tensor, torch.Tensor]:
    """Signed weights ``w [B, r, m]`` within ``e_w`` of the exact ones, normalized with
    certified radii: ``(w, e_w)`` with hidden keys masked, :class:`Normalized` (``p = w /
    D``, ``y = w v / D``), ``pos [B, r]`` where the lower bound ``|D| - e_D`` of the exact
    normalizer's modulus is positive, and that lower bound ``Dl`` (1 where it is not: the
    radii there mean nothing, the callers' bounds are infinite). A normalizer of either
    sign: negating a row's weights changes neither its output nor, the rounding models
    being symmetric, its errors. The sums and products over the ``m`` keys are m roundings
    on a term's path, a few more on top; ``gamma_m`` on ``sum |w|`` covers D's own sum."""
    m = w.shape[-1]
    w, e_w = blk.masked(w, 0.0), blk.masked(e_w, 0.0)
    va = v.abs()
    D = w.sum(-1)
    e_D = upper(e_w.sum(-1) + gamma(m, U64) * w.abs().sum(-1), m + 4)
    D_lo = D.abs() - e_D
    pos = D_lo > 0
    Dl = torch.where(pos, D_lo, torch.ones_like(D_lo))
    # TINY: the products that underflow (N's and these sums'), and the quotients y and p
    # below the normal range (a relative rounding does not cover them)
    e_N = upper(e_w @ va + gamma(m + 1, U64) * (w.abs() @ va) + 3 * TINY, m + 5)
    y = (w @ v) / D.unsqueeze(-1)
    eps_y = upper(
        (e_N + y.abs() * e_D.unsqueeze(-1) + TINY) / Dl.unsqueeze(-1) + U64 * y.abs() + 2 * TINY, 8
    )
    p = w / D.unsqueeze(-1)
    pi = upper(
        (e_w + p.abs() * e_D.unsqueeze(-1) + TINY) / Dl.unsqueeze(-1) + U64 * p.abs() + 2 * TINY, 8
    )
    return w, e_w, Normalized(p, pi, y, eps_y, v, blk.center, block=blk), pos, Dl


def logits64(
    q: torch.Tensor, k: torch.Tensor, sc: float, k_abs: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``s = sc q.k`` in float64, a bound on its error (any summation order), and
    ``|q|.|k|`` (each ``[B, r, m]``); ``k_abs``: ``|k|`` if the caller holds it."""
    d = q.shape[-1]
    x = (q @ k.transpose(-1, -2)).mul_(sc)
    absdot = q.abs() @ (k.abs() if k_abs is None else k_abs).transpose(-1, -2)
    # |sc| (gamma_{d+1} |q|.|k| + d 2^-1074) + u |x| / (1 - u): d products underflowing by
    # 2^-1075 each, if at all; the constants carry this evaluation's roundings (absdot's d)
    up = 1 + gamma(d + 8, U64)
    sig = x.abs().mul_(U64 / (1 - U64) * up)
    sig.add_(absdot, alpha=abs(sc) * gamma(d + 1, U64) * up).add_(abs(sc) * d * 2.0**-1074 * up)
    return x, sig, absdot


def softcapped(x: torch.Tensor, sig: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-capped logits ``cap tanh(x / cap)`` in float64 and their error, from logits
    ``x`` within ``sig``: the map is 1-Lipschitz (``sig`` passes), plus the float64 division,
    tanh (within 4 ulp, the assumption the float64 exp also rests on) and product, each of
    which may underflow: ``x / cap`` by ``2^-1075``, which the cap multiplies back (a review:
    1.1e15x under the error of tiny logits with a large cap, if not)."""
    t = torch.tanh(x / cap)
    xc = cap * t
    return xc, upper(sig + 8 * U64 * (xc.abs() + x.abs()) + (abs(cap) + 2) * 2.0**-1074, 2)
