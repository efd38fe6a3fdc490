"""The one quotient model of every normalized method: ``y = sum_j w_j v_j / sum_j w_j``.

A kernel computes ``N^ = sum_j t_j rho^N_j v~_j`` and ``D^ = sum_j t_j rho^D_j`` (terms
``t_j`` of the exact weights, grouped per key; ``rho`` the product of every rounding on a
term's path to the numerator or the normalizer, in any summation order; ``v~`` the values
as loaded), plus absolute underflow terms, then ``fl(N^ / D^)`` and the store. Since
``sum_j t_j (v_j - y) = 0`` for the exact ``y`` (first-order free),

    N^ - y D^ = sum_j t_j (rho^N_j - 1)(v~_j - y) + sum_j t_j (v~_j - v_j)
              + y sum_j t_j (rho^N_j - rho^D_j) + (underflow),

so with ``A_j >= |rho^N_j - 1|``, ``C_j >= |rho^N_j - rho^D_j|`` and ``D^ >= D_lo``,

    |N^ / D^ - y| <= [sum_j |t_j| A_j (|v_j - y| + dv_j) + sum_j |t_j| dv_j
                      + |y| sum_j |t_j| C_j + b_N + |y| b_D] / D_lo

(all relative to ``W = sum_j t_j``; docs/bounds/attention.md). Each method supplies the
per-key aggregates (:class:`Terms`); :func:`quotient` evaluates this *sound* bound and its
*probabilistic* companion: the first-order error ``sum_r c_r delta_r`` of independent
mean-zero rounding errors with variance proxy ``u_r^2 / 3``, bounded by
``tail_lambda(delta) sqrt(V / 3)``, plus the second-order remainder of the sound bound.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from attnprec.analysis.bounds._rows import Normalized, sq_deviation
from attnprec.analysis.bounds.rounding import U64, store_error, upper
from attnprec.analysis.precision import Precision

__all__ = [
    "Terms",
    "Basis",
    "Mix",
    "quotient",
    "folded_shift",
    "largest_weight",
    "hull",
    "finish",
    "unbounded",
    "larger",
    "flushed",
]


class Basis:
    """A row block's shared per-key weights ``W_i [B, r, m]`` (>= 0), formed on first use,
    and the aggregates :func:`quotient` takes of them (the deviation bound, products with
    value-shaped matrices, sums, the squared deviation), each formed once: a method whose
    per-key factors are affine in a few per-key quantities (``W_i = p x_i``) evaluates
    every model and level from them, without a ``[B, r, m]`` pass of its own.

    ``weights``: each weight's maker, which writes it into the ``[B, r, m]`` tensor it is
    given and returns it. ``mats``: the value-shaped matrices ``[B, m, d_v]`` the
    aggregates multiply (``"at"``). ``groups``: names whose weights are formed side by
    side in one ``[B, G r, m]`` tensor, so that their products with the same right-hand
    side (``[|v - c|, *mats]``, or ``[v^2, v]`` for ``"sq"``) are one matrix product: a
    ``[r, m]`` weight read once costs about a product's time, and the right-hand side is
    then read once for the group (1.36 against 1.62 ms for three weights of 40 x 13,000
    and 48 columns). A weight in no group is formed alone. A matrix of zeros in ``mats``
    (the values' load errors where every load is exact) is left out of the products."""

    def __init__(
        self,
        nz: Normalized,
        weights: dict[str, Callable[[torch.Tensor], torch.Tensor]],
        mats: tuple[torch.Tensor, ...] = (),
        groups: tuple[tuple[str, ...], ...] = (),
    ) -> None:
        self.nz, self._make = nz, weights
        # an all-zero matrix (exact loads: no value error) has zero products, not formed
        self._mats = tuple(x for x in mats if bool(x.any()))
        self._zero = tuple(x for x in mats if not any(x is y for y in self._mats))
        self._group = {name: g for g in groups for name in g}
        self._bufs: dict[tuple[str, ...], torch.Tensor] = {}
        self._rhs: torch.Tensor | None = None
        self._w: dict[str, torch.Tensor] = {}
        self._agg: dict[tuple[str, str], torch.Tensor] = {}

    def weight(self, name: str) -> torch.Tensor:
        if name not in self._w:
            p = self.nz.p
            g = self._group.get(name, (name,))
            if g not in self._bufs:
                self._bufs[g] = p.new_empty((p.shape[0], len(g), *p.shape[1:]))
            self._w[name] = self._make[name](self._bufs[g][:, g.index(name)])
        return self._w[name]

    def _stacked(self, name: str, kind: str, rhs: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``W @ rhs()`` of ``name``'s weight, formed with those of its group, once."""
        if (name, kind) not in self._agg:
            g = self._group.get(name, (name,))
            for other in g:
                self.weight(other)
            buf = self._bufs[g]
            B, G, r, m = buf.shape
            prods = (buf.view(B, G * r, m) @ rhs()).view(B, G, r, -1)
            for i, other in enumerate(g):
                self._agg[(other, kind)] = prods[:, i]
        return self._agg[(name, kind)]

    def _products(self, name: str) -> torch.Tensor:
        """``W @ [|v - c|, *mats]``, once."""

        def rhs() -> torch.Tensor:
            if self._rhs is None:
                self._rhs = torch.cat([self.nz.v_center, *self._mats], -1)
            return self._rhs

        return self._stacked(name, "prod", rhs)

    def agg(self, name: str, kind: str | torch.Tensor) -> torch.Tensor:
        """``kind``: ``"dev"`` (:meth:`Normalized.deviation`), ``"sum"`` (over keys),
        ``"sq"`` (:func:`sq_deviation`), or one of ``mats`` (``W @`` it)."""
        if isinstance(kind, torch.Tensor):
            if any(x is kind for x in self._zero):
                return kind.new_zeros((*self.nz.p.shape[:-1], kind.shape[-1]))
            i = next(i for i, x in enumerate(self._mats) if x is kind)
            dv = kind.shape[-1]
            return self._products(name)[..., (i + 1) * dv : (i + 2) * dv]
        if (name, kind) not in self._agg:
            w = self.weight(name)
            if kind == "dev":
                dv = self.nz.v.shape[-1]
                val = self.nz.deviation([w], [self._products(name)[..., :dv]])[0]
            elif kind == "sum":
                val = w.sum(-1, keepdim=True)
            else:
                wv = self._stacked(name, "vv", lambda: self.nz.vv)
                val = sq_deviation([w], self.nz.v, self.nz.y, [wv])[0]
            self._agg[(name, kind)] = val
        return self._agg[(name, kind)]


class Mix:
    """A per-key weight ``sum_i c_i W_i`` of a :class:`Basis`'s weights (``c_i >= 0``:
    numbers or ``[B, r, 1]`` row factors), never formed: each aggregate is the same
    combination of the basis weights' (every one is linear in the weight; the deviation
    and squared-deviation bounds are sums of nonnegative bounds), rounded up."""

    def __init__(self, basis: Basis, coefs: dict[str, float | torch.Tensor]) -> None:
        self.basis = basis
        self.coefs = {k: c for k, c in coefs.items() if not (isinstance(c, float) and c == 0)}

    def agg(self, kind: str | torch.Tensor) -> torch.Tensor:
        """:meth:`Basis.agg` of the combination."""
        parts = [c * self.basis.agg(name, kind) for name, c in self.coefs.items()]
        if not parts:
            return torch.zeros((), dtype=torch.float64)
        # the products and the sum, and the coefficients' and weights' own formation (a
        # few roundings each)
        total = upper(functools.reduce(torch.add, parts), 2 * len(parts) + 8)
        return total.nan_to_num_(nan=math.inf)  # 0 * inf: a weight is inf


def _dev(nz: Normalized, w: torch.Tensor | Mix) -> torch.Tensor:
    return w.agg("dev") if isinstance(w, Mix) else nz.deviation([w])[0]


def _load(w: torch.Tensor | Mix, mag: torch.Tensor | Mix, x: torch.Tensor) -> torch.Tensor:
    """``(w + mag) @ x``."""
    if isinstance(w, torch.Tensor) and isinstance(mag, torch.Tensor):
        return (w + mag) @ x
    a, b = (u.agg(x) if isinstance(u, Mix) else u @ x for u in (w, mag))
    return a + b


def flushed(
    n_ex: torch.Tensor,
    value: torch.Tensor,
    u_e: float | torch.Tensor,
    u_sub: float | torch.Tensor,
    w_lo: torch.Tensor,
) -> torch.Tensor:
    """Per key ``[B, r, m]``, the absolute error (relative to ``W``, for ``b_num`` and
    ``b_den``) of its ``n_ex`` exps that may fall below the normal range (its terms' own
    and the rescalings of the sums that hold them).

    Such an exp (:meth:`.Precision.exp_underflow`) returns a value between 0 and its
    exact result (flush to zero), or that result within one subnormal spacing ``u_sub``
    (gradual underflow, an approximate instruction); either way it is off by at most
    ``u_e``. So a key's error is at most ``u_e`` per exp, and at most the computed value
    of its terms that may be lost (``value``: their exact weight relative to ``W`` times
    the factors of their path) plus ``u_sub`` per exp; the lesser of the two. A rescaling
    below the normal range scales terms that are themselves below it there (each is at
    most every factor on its path), so only the keys that may fall there count. ``value``
    is taken with three roundings' margin already (its caller's :func:`.rounding.upper`
    of 3 or more). ``w_lo [B, r]``: a lower bound of ``W`` in the kernel's units (the
    ``u`` are absolute there); ``u_e``, ``u_sub``: floats or ``[B, r]``. Trailing
    dimensions past ``[B, r]`` (keys, channels, value columns) broadcast."""
    extra = (1,) * (max(n_ex.dim(), value.dim()) - w_lo.dim())

    def unit(u: float | torch.Tensor, n_ops: int) -> torch.Tensor:
        return upper(u * torch.ones_like(w_lo) / w_lo, n_ops).reshape(*w_lo.shape, *extra)

    # (value + u_sub n_ex) (1 + gamma_3) as value (1 + gamma_3) + u_sub' n_ex: the caller's
    # value carries that factor (its upper), two passes fewer over [B, r, m]
    lost = torch.addcmul(value, n_ex, unit(u_sub, 4))
    return torch.minimum(lost, n_ex * unit(u_e, 2), out=lost)


@dataclass(frozen=True)
class Terms:
    """What a method's kernel does to the terms of one row block (all relative to ``W``).

    Attributes
    ----------
    a, lin_a : torch.Tensor or Mix
        ``[B, r, m]``: ``sum_g |t_g| A_g / W`` per key (sound), and its first-order part.
    c, lin_c : torch.Tensor
        ``[B, r, 1]``: ``sum_j sum_g |t_g| C_g / W`` over the row's keys (numerator vs
        normalizer paths), and its first-order part.
    mag : torch.Tensor or Mix
        ``[B, r, m]``: ``sum_g |t_g| / W`` (multiplies the value load error).
    den_lo : torch.Tensor
        ``[B, r]``: a lower bound of ``D^ / W`` (<= 0 where the normalizer may vanish).
    b_num, b_den : torch.Tensor
        ``[B, r, d_v]``, ``[B, r]``: absolute errors of ``N^ / W`` and ``D^ / W``
        (underflow, flush to zero).
    var_key : torch.Tensor or Mix
        ``[B, r, m]``: the first-order variance proxy (times 3) per key of the terms'
        independent relative errors, ``sum_g t_g^2 Var(A_g) / W^2``; it multiplies
        ``(v_j - y)^2``.
    var_row : torch.Tensor
        ``[B, r, d_v]``: the rest of the first-order variance proxy (times 3): errors shared
        by several keys, loads, products and the sums.
    var_dev : torch.Tensor or float
        Multiplies ``sum_j p_j^2 (v_j - y)^2`` in the variance proxy: errors that scale a
        partial sum of the deviations (state rescalings: under the random-order model a
        partial sum of ``b`` of ``n`` centred terms has ``E[S_b^2] <= n / (4 (n - 1))``
        times that sum).
    coh : torch.Tensor or float
        ``[B, r, d_v]``: first-order errors charged at their worst case (not random: errors
        shared by many keys whose sign the model does not know), at their modulus; the
        probabilistic level adds them to the tail of the rest or takes them in its
        variance (as a bounded variable of proxy ``coh^2``), whichever is less.
    """

    a: torch.Tensor | Mix
    lin_a: torch.Tensor | Mix
    c: torch.Tensor
    lin_c: torch.Tensor
    mag: torch.Tensor | Mix
    den_lo: torch.Tensor
    b_num: torch.Tensor
    b_den: torch.Tensor
    var_key: torch.Tensor | Mix
    var_row: torch.Tensor
    var_dev: torch.Tensor | float = 0.0
    coh: torch.Tensor | float = 0.0


def quotient(
    nz: Normalized,
    t: Terms,
    dv: torch.Tensor,
    lam: float,
    hull: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    absorb: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds on ``|N^ / D^ - y|`` (before the division rounds): (sound, probabilistic).

    ``dv`` the load error bound of the values ``nz.v`` (same shape), ``lam``
    :func:`.rounding.tail_lambda` of the per-element failure probability. ``inf`` where the
    normalizer's lower bound is not positive. ``hull``: for kernels whose weights are
    nonnegative and whose largest weight has a positive floor (:func:`largest_weight`, so
    ``D^ > 0``): ``(lo, hi, slack)`` with ``N^ / D^`` within ``slack`` of ``[lo, hi]``
    (the values as loaded, over the visible keys); the error is then also at most
    ``max(hi - y, y - lo) + slack``, finite whatever the weights' errors. ``absorb``: per
    key, the normalized weight of its terms a positive sum may absorb ``[B, r, m]`` (None:
    none; :func:`absorbable`), charged coherently to the probabilistic level.
    """
    m = nz.v.shape[-2]
    if isinstance(t.a, torch.Tensor) and isinstance(t.lin_a, torch.Tensor):
        dev_a, dev_l = nz.deviation([t.a, t.lin_a])
    else:
        dev_a, dev_l = _dev(nz, t.a), _dev(nz, t.lin_a)
    y_abs = nz.y.abs() + nz.eps_y
    load = _load(t.a, t.mag, dv)
    det = t.b_num + y_abs * t.b_den.unsqueeze(-1)
    num = dev_a + load + y_abs * t.c + det
    den = t.den_lo.unsqueeze(-1)
    sound = upper(num / den.clamp_min(1e-300), 3 * m + 12)
    sound = torch.where(den > 0, sound, torch.full_like(sound, math.inf))
    lin = dev_l + _load(t.lin_a, t.mag, dv) + y_abs * t.lin_c
    if isinstance(t.var_key, Mix):
        var = t.var_key.agg("sq")
    else:
        (var,) = sq_deviation([t.var_key], nz.v, nz.y, [t.var_key @ nz.vv])
    var = var + t.var_row + t.var_dev * nz.sq_dev
    remainder = (sound - lin - det).clamp_min(0.0)
    # the worst-case part: in the variance, a variable bounded by coh is lam coh at the
    # tail, lam times its worst case; beside it, coh (either is a bound of the inputs
    # alone, so the lesser holds at the same confidence)
    tail = torch.minimum(
        torch.sqrt(var / 3 + t.coh * t.coh) * lam, torch.sqrt(var / 3) * lam + t.coh
    )
    typical = tail * (1 + 4 * U64) + det + remainder
    if absorb is not None:
        # their first-order effect sum_j a_j (v_j - y), at its modulus
        typical = typical + absorb @ nz.v.abs() + y_abs * absorb.sum(-1, keepdim=True)
    typical = torch.where(torch.isnan(typical), sound, torch.minimum(typical, sound))
    if hull is not None:
        lo, hi, slack = hull
        e_hull = upper(torch.maximum(hi - nz.y, nz.y - lo) + nz.eps_y + slack, 4)
        sound, typical = torch.minimum(sound, e_hull), torch.minimum(typical, e_hull)
    return sound, typical


def absorbable(p: torch.Tensor, u: float, in_sequence: bool = False) -> torch.Tensor | None:
    """The weights ``p`` (``[B, r, m]``, normalized) at most ``2 u``, the rest 0 (None where
    there is none): the terms a positive sum in unit roundoff ``u`` may make one-signed.

    Added to a partial sum ``S`` no smaller than the normalizer's largest term, a weight
    below ``u S`` is dropped whole (its error is ``-w``, of one sign for every such key)
    and one of a few ulps of ``S`` rounds by a residue that does not average out: after
    an attention sink or an outlier logit, a sequential fp32 normalizer lost ``(count) u``
    where the independent model expects ``sqrt(count) u`` (a review: correct kernels 2-4x
    outside the level). :func:`quotient` charges their first-order effect ``sum_j p_j
    (v_j - y)`` at its modulus, coherently (docs/bounds/attention.md, "Absorbed terms").
    ``in_sequence``: ``p`` of either sign, and only the weights at most ``2 u`` of those
    before them in sequence order or of those larger (``|p|``'s exclusive prefix sums along
    the keys, and in descending order: what a sequential sum absorbs, a sink at its start
    included, and one over the terms sorted by size, a sink anywhere; the weights below
    ``2 u`` of the normalizer are most of a row's at 16-bit accumulation and small n, where
    no such sum absorbs them, and charging them loosened taylor's level 1.9x there).
    """
    if not in_sequence:
        small = p <= 2 * u
        if not bool(small.any()):
            return None
        return torch.where(small, p.abs(), 0.0)
    a = p.abs()
    if not bool((a <= 2 * u).any()):  # (none below 2 u of the whole)
        return None
    before = torch.zeros_like(a)
    before[..., 1:] = a[..., :-1].cumsum(-1)  # (no inclusive sum less the entry: cancels)
    srt, at = a.sort(dim=-1, descending=True, stable=True)  # (ties in key order: one sum's)
    larger = torch.zeros_like(a)
    larger[..., 1:] = srt[..., :-1].cumsum(-1)
    larger = torch.empty_like(a).scatter_(-1, at, larger)
    small = (a <= 2 * u * torch.maximum(before, larger)) & (a > 0)
    if not bool(small.any()):
        return None
    return torch.where(small, a, 0.0)


def folded_shift(m_abs: torch.Tensor, precision: Precision) -> torch.Tensor:
    """How far above or below 0 a kernel may compute the exp argument of the term at its
    shift ``m`` (``|m| <= m_abs``), and by how much any term's argument may exceed 0 (each
    term's is at most that one's: rounding is monotone): where one FMA takes the term's
    exponent with the shift folded, the folded constant's rounding, ``fl(m C)`` in log2
    units (``exp2(fma(s, C, -fl(m C)))``, ``C = scale log2 e``: FlashAttention), half an ulp
    of ``|m| log2 e``'s binade times ln 2, or ``fl(m scale)`` in natural units (``fma(s,
    scale, -fl(m scale))``, then exp), half an ulp of ``|m|``'s (the FMA itself is exact
    there); 0 where the kernel subtracts the shift from the term's computed exponent."""
    fc, log2e = precision.compute, math.log2(math.e) * (1 + 2 * U64)
    half_ulp = torch.maximum(
        fc.rounding_error(m_abs), fc.rounding_error(m_abs * log2e) * math.log(2)
    )
    return upper(half_ulp * (1 + fc.u) ** 2, 4)


def largest_weight(
    arg: torch.Tensor, n_exps: Any, precision: Precision, rel: float = 0.0, eta: float = 0.0
) -> torch.Tensor:
    """A floor of the largest weight a kernel computes under a running maximum, in its
    units: a product of ``n_exps`` exps (a float, or per row) whose arguments lie within
    ``arg`` of 0 in all, each within ``k_e`` relative (its argument's own roundings,
    ``Elementary.exp_arg``, in), then factors within ``rel`` of 1
    (products, the weights' cast) and an absolute ``eta`` (the cast's); 0 where an exp may
    fall below ``T_e`` (flushed, or off by ``U_e`` absolute: the weight may vanish).

    An argument is 0 exactly where the kernel subtracts the shift from the term's own
    computed exponent, and the rounding of a folded constant (``fl(m C)``, a few ``u_c |m|``)
    where one FMA forms it; a method's bound of its largest term's exponent error covers
    both. Every sum of nonnegative terms rounds to at least its largest term, and no
    rescaling follows the largest, so the kernel's normalizer is at least this floor (the
    values' hull, :func:`hull`, and the division's floor ``d_lo``, :func:`finish`)."""
    k_e = precision.op_error("exp")
    arg = torch.as_tensor(arg, dtype=torch.float64)
    if k_e >= 1:
        return torch.zeros_like(arg)
    # (and the roundings inside exp before the exponential proper: Elementary.exp_arg)
    ex = torch.exp(-upper(arg * (1 + precision.elementary.exp_arg * precision.compute.u), 2))
    # (each exact exp is at least their product: every argument within arg of 0)
    ok = ex >= math.exp(precision.exp_exact_log()) * (1 + 4 * U64)
    w = ex * torch.exp(torch.as_tensor(n_exps, dtype=torch.float64) * math.log1p(-k_e))
    w = (w * (1 - 4 * U64) * (1 - rel) - eta).clamp_min(0.0)
    return torch.where(ok, w, 0.0)


def hull(
    blk_vrange: tuple[torch.Tensor, torch.Tensor],
    v_abs: torch.Tensor,
    kappa: torch.Tensor,
    raw_num: torch.Tensor,
    raw_den: torch.Tensor,
    w_lo: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``hull`` argument of :func:`quotient`: ``(lo, hi)`` the extremes of the values as
    loaded over the visible keys, and the slack ``kappa max|v~| + (raw_num + max|v~|
    raw_den) / w_lo`` for path factors within ``kappa`` of each other (``[r, 1]``), absolute
    underflow terms ``raw_num [B, r, d_v]``, ``raw_den [B, r]`` and a lower bound ``w_lo``
    (``[r]`` or ``[B, r]``) of the computed normalizer in the kernel's units
    (:func:`largest_weight`); where it is 0 the normalizer may vanish and the hull stands
    down (an infinite slack)."""
    lo, hi = blk_vrange
    vmax = torch.maximum(hi.abs(), lo.abs())
    del v_abs
    w = w_lo.unsqueeze(-1)
    raw = raw_num + vmax * raw_den.unsqueeze(-1)
    slack = torch.where(w > 0, kappa * vmax + raw / w.clamp_min(2.0**-1074), math.inf)
    return lo, hi, upper(slack, 4)


def finish(
    sound: torch.Tensor,
    typical: torch.Tensor,
    y_abs: torch.Tensor,
    precision: Precision,
    ulps: float | None = None,
    operands: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The last operation (the division ``fl(N^ / D^)``, or a product) in compute and the
    store, after errors ``sound`` and ``typical`` (the two levels) on a result of modulus
    ``y_abs``.

    Returns (sound, typical, the masks of the outputs that overflow in compute and at the
    store, named): the operation adds ``r (|y| + e1) + underflow`` to an error ``e1`` (r
    the declared division's relative error, or ``2 ulps u_c`` for another operation); the
    store rounds once to the output format (``precision.output_format``) unless it holds
    compute (then it is exact). ``operands``: for a division, upper bounds on ``|N^|`` and
    ``|D^|`` as the kernel holds them and a lower bound on ``D^`` (``d_lo``, same units,
    broadcast to the output). The division runs in compute, so where accumulate holds values
    compute does not, the sums are taken into it: each conversion rounds (``|N' - N^| <=
    u_r |N^| + eta_r``, the declaration's rounding), which moves the quotient by at most

        (2 u_r |Q| + eta_r (1 + |Q|) / d_lo) / (1 - u_r - eta_r / d_lo),  |Q| <= |y| + e1,

    charged to both levels (coherent: one pair per row; a review: linear attention with
    bf16 compute over fp32 sums 1.0012x outside on outputs that cancel, where the sound
    level had it not), and they may overflow there (a review: fp32 sums of 80,000 divided in
    fp16 compute, an inf output under a finite bound): named ``"division N / D in
    <compute>"``, as a normalizer that may vanish in compute is. A product's operand is
    such a sum too, taken into compute before the product (``o.to(fp16) * scale``): ``u_r
    (|y| + e1) + eta_r`` more (a hunt's gated kernel under "rtz" reached 0.88 of the bound
    that charged the product alone).
    """
    fc, fs = precision.compute, precision.output_format
    r = precision.op_error("div") if ulps is None else 2 * ulps * fc.u
    wide = fs.holds(fc)

    def last(e1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # (an element already unbounded for another reason is not named again here: its
        # infinite error is not an output that overflows)
        y1 = y_abs + e1
        e2 = upper(e1 + r * y1 + fc.underflow, 4)
        big_c = (y1 * (1 + r) >= fc.overflow()) & torch.isfinite(e1)
        if wide:
            return e2, big_c, torch.zeros_like(big_c)
        st = store_error(y_abs + e2, fs, precision.rounding)
        return upper(e2 + st, 2), big_c, torch.isinf(st) & torch.isfinite(e2)

    fa = precision.accumulate
    held = fc.holds(fa)
    div = torch.zeros((), dtype=torch.bool)
    if operands is not None and not held:
        n_top, d_top, d_lo = operands
        u_r, eta_r = fc.rounding_units(precision.rounding)
        room = 1 - u_r - upper(eta_r / d_lo, 2)
        # (where the caller's bound is already infinite, e.g. a normalizer that may vanish,
        # it has named why)
        div = ((n_top >= fc.overflow()) | (d_top >= fc.overflow()) | ~(room > 0)) & torch.isfinite(
            sound
        )

        def converted(e1: torch.Tensor) -> torch.Tensor:
            q = y_abs + e1
            moved = upper((2 * u_r * q + eta_r * (1 + q) / d_lo) / room.clamp_min(1e-300), 6)
            return upper(e1 + moved, 2)

        sound, typical = converted(sound), converted(typical)
    elif not held:  # a product's operand, a sum held in accumulate, taken into compute
        u_r, eta_r = fc.rounding_units(precision.rounding)

        def taken(e1: torch.Tensor) -> torch.Tensor:
            return upper(e1 + u_r * (y_abs + e1) + eta_r, 3)

        sound, typical = taken(sound), taken(typical)
    sound, big_c, big_s = last(sound)
    typical = last(typical)[0]
    reasons = {f"output in {fc.name}": big_c, f"output store to {fs.name}": big_s}
    if operands is not None and not held:
        reasons[f"division N / D in {fc.name}"] = div.expand_as(big_c)
    return sound, typical, reasons


def unbounded(
    sound: torch.Tensor, typical: torch.Tensor, reasons: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A rounding model's result: ``"sound"`` and ``"typical"`` infinite wherever a reason's
    mask (broadcast to the output) holds, and each mask as ``"unbounded:<reason>"``."""
    out = {}
    bad = torch.zeros_like(sound, dtype=torch.bool)
    for name, mask in reasons.items():
        mask = mask.expand_as(sound)
        out["unbounded:" + name] = mask
        bad = bad | mask
    return {
        "sound": torch.where(bad, math.inf, sound),
        "typical": torch.where(bad, math.inf, typical),
        **out,
    }


def larger(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Two models' results for one block (two schedules the declaration allows) as one:
    the larger bounds, and every reason of either."""
    out = dict(a)
    for key, val in b.items():
        if key not in out:
            out[key] = val
        elif val.is_floating_point():
            out[key] = torch.maximum(out[key], val)
        else:
            out[key] = out[key] | val
    return out
