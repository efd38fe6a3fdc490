"""Ball-arithmetic references: python-flint ``arb`` or ``mpmath.iv`` intervals.

Every quantity is an enclosure of the exact value (inputs are exact: a float64 converts to
a ball of radius zero); each operation returns an enclosure of its exact result (arb's
propagated radii; mpmath.iv's outward rounding). The output balls therefore contain the
exact attention outputs, and :func:`ball_to_float` turns a ball into the float64 nearest
its midpoint and a radius rounded upward that includes that conversion.

Matrices are numpy object arrays of balls; the arb backend multiplies them with
``arb_mat`` (fast), the mpmath backend with numpy's object matmul.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import numpy as np
from mpmath import iv

from attnprec import _progress as progress

flint: Any
try:
    import flint
except ImportError:  # pragma: no cover - python-flint is optional
    flint = None

HAVE_FLINT = flint is not None

#: Working precisions (bits) tried in turn until every output is settled.
PRECISIONS = (128, 256, 512, 1024)


def exact_score_bits(q: np.ndarray, k: np.ndarray) -> int:
    """Bits that hold every score ``scale q.k`` of float64 ``q`` and ``k`` exactly: the
    binades from the largest product's top to the least one's last bit, the sum's carries
    and the scale's 53 bits (a multiple of 64). Past 1024 only for products spanning
    hundreds of binades (a review: ``q.k = 1e320 + O(1)``, inexact at 1024 bits, made
    ``exp(s)`` a ball about 0 and every row NaN on every backend)."""

    def exps(x: np.ndarray) -> tuple[int, int]:
        nz = np.abs(x[x != 0])
        if not nz.size:
            return 0, 0
        e = np.frexp(nz)[1]
        return int(e.max()), int(e.min()) - 53

    (q_hi, q_lo), (k_hi, k_lo) = exps(q), exps(k)
    d = max(q.shape[-1], 1)
    bits = (q_hi + k_hi) - (q_lo + k_lo) + math.ceil(math.log2(d)) + 2 + 53
    return -(-bits // 64) * 64


#: An output is settled when its radius is <= SETTLE * max(|value|, max_j |v_jc|).
SETTLE = 2.0**-60

Obj = np.ndarray  # numpy object array of balls


class _Backend:
    name = ""

    def __init__(self, prec: int) -> None:
        self.prec = prec

    def __enter__(self) -> _Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def num(self, x: float) -> Any:
        raise NotImplementedError

    def arr(self, a: np.ndarray) -> Obj:
        return np.frompyfunc(self.num, 1, 1)(a)

    def exp(self, a: Obj) -> Obj:
        raise NotImplementedError

    def sqrt(self, x: Any) -> Any:
        raise NotImplementedError

    def tanh(self, a: Obj) -> Obj:
        """tanh of each enclosure, from its endpoints (tanh is increasing): exact points
        keep it finite where the enclosure is wide (a softcap's ``s / cap`` of 1e309)."""
        raise NotImplementedError

    def matmul(self, a: Obj, b: Obj) -> Obj:
        return a @ b

    def contains_zero(self, x: Any) -> bool:
        raise NotImplementedError

    def midrad(self, x: Any) -> MidRad | None:
        """Exact midpoint and radius as ``((man, exp), (man, exp))``, None if not finite."""
        raise NotImplementedError


class ArbBackend(_Backend):
    name = "arb"

    def __enter__(self) -> ArbBackend:
        assert flint is not None
        self._saved = flint.ctx.prec
        flint.ctx.prec = self.prec
        return self

    def __exit__(self, *exc: object) -> None:
        flint.ctx.prec = self._saved

    def num(self, x: float) -> Any:
        return flint.arb(float(x))

    def exp(self, a: Obj) -> Obj:
        return np.frompyfunc(lambda x: x.exp(), 1, 1)(a)

    def sqrt(self, x: Any) -> Any:
        return x.sqrt()

    def tanh(self, a: Obj) -> Obj:
        return np.frompyfunc(lambda x: x.lower().tanh().union(x.upper().tanh()), 1, 1)(a)

    def matmul(self, a: Obj, b: Obj) -> Obj:
        if a.shape[1] == 0:
            return np.full((a.shape[0], b.shape[1]), self.num(0.0), dtype=object)
        c = flint.arb_mat(a.tolist()) * flint.arb_mat(b.tolist())
        out = np.empty(a.shape[0] * b.shape[1], dtype=object)
        out[:] = c.entries()
        return out.reshape(a.shape[0], b.shape[1])

    def contains_zero(self, x: Any) -> bool:
        return bool(x.contains(0))

    def midrad(self, x: Any) -> MidRad | None:
        if not x.is_finite():
            return None
        (m, e), (r, f) = x.mid().man_exp(), x.rad().man_exp()
        return (int(m), int(e)), (int(r), int(f))


class MpmathBackend(_Backend):
    name = "mpmath"

    def __enter__(self) -> MpmathBackend:
        self._saved = iv.prec
        iv.prec = self.prec
        return self

    def __exit__(self, *exc: object) -> None:
        iv.prec = self._saved

    def num(self, x: float) -> Any:
        return iv.mpf(float(x))

    def exp(self, a: Obj) -> Obj:
        return np.frompyfunc(iv.exp, 1, 1)(a)

    def sqrt(self, x: Any) -> Any:
        return iv.sqrt(x)

    def tanh(self, a: Obj) -> Obj:
        def at(t: Any) -> Any:  # an exact point: (1 - e) / (1 + e), e = exp(-2|t|) <= 1
            e = iv.exp(-2 * abs(t))
            y = (1 - e) / (1 + e)
            return y if t >= 0 else -y

        return np.frompyfunc(lambda x: iv.mpf([at(x.a).a, at(x.b).b]), 1, 1)(a)

    def matmul(self, a: Obj, b: Obj) -> Obj:
        if a.shape[1] == 0:
            return np.full((a.shape[0], b.shape[1]), self.num(0.0), dtype=object)
        return a @ b

    def contains_zero(self, x: Any) -> bool:
        return bool(0 in x)

    def midrad(self, x: Any) -> MidRad | None:
        ends = []
        for sign, man, exp, _ in x._mpi_:  # raw mpf tuples
            if not man and exp:  # inf or nan (zero is (0, 0, 0, 0))
                return None
            ends.append((-int(man) if sign else int(man), int(exp)))
        (a, e1), (b, e2) = ends
        # endpoints of very different magnitudes: the smaller one rounded outward to a grid
        # 1100 bits below the larger's top bit (the ball only widens, by far less than an
        # ulp of any float64 it is converted to), so that no shift builds a huge integer
        floor = max(abs(a).bit_length() + e1, abs(b).bit_length() + e2) - 1100
        if e1 < floor:
            a, e1 = a >> (floor - e1), floor  # toward -inf
        if e2 < floor:
            b, e2 = -(-b >> (floor - e2)), floor  # toward +inf
        e = min(e1, e2)
        lo, hi = a << (e1 - e), b << (e2 - e)
        return (lo + hi, e - 1), (hi - lo, e - 1)


BACKENDS: dict[str, type[_Backend]] = {"arb": ArbBackend, "mpmath": MpmathBackend}


MidRad = tuple[tuple[int, int], tuple[int, int]]


def _to_float(man: int, exp: int) -> float:
    """man * 2^exp correctly rounded to float64 (CPython's int division rounds correctly)."""
    # Magnitudes far outside the float64 range are decided from the bit length, without
    # building 2^|exp| (a midpoint such as 2^-(10^15) would exhaust memory).
    top = abs(man).bit_length() + exp
    # (signs from comparisons: float(man) itself may overflow)
    if man == 0 or top < -1076:  # below half the smallest subnormal: rounds to 0
        return -0.0 if man < 0 else 0.0
    if top > 1025:
        return -math.inf if man < 0 else math.inf
    try:
        return float(man << exp) if exp >= 0 else man / (1 << -exp)
    except OverflowError:
        return -math.inf if man < 0 else math.inf


def _is_exact(value: float, man: int, exp: int) -> bool:
    if value == 0 or not math.isfinite(value):
        return man == 0
    n, d = value.as_integer_ratio()
    return n << max(-exp, 0) == (man << max(exp, 0)) * d


def float_up(x: Fraction) -> float:
    """The least float64 >= x (inf past the range)."""
    try:
        f = float(x)
    except OverflowError:
        return math.inf
    return math.nextafter(f, math.inf) if Fraction(f) < x else f


def ball_to_float(b: MidRad | None) -> tuple[float, float, float]:
    """(value, radius, ball radius): value the float64 nearest the midpoint; radius, rounded
    up, covers the ball and the conversion (|mid - value| <= ulp(value)/2, zero when exact);
    the ball radius alone (rounded up) decides whether the ball is settled."""
    if b is None:
        return math.nan, math.inf, math.inf
    (m, e), (r, f) = b
    value = _to_float(m, e)
    if not math.isfinite(value):
        return value, math.inf, math.inf
    rb = _to_float(r, f)
    if r:
        rb = math.nextafter(rb, math.inf)
    if value == 0 and max(abs(m).bit_length() + e, r.bit_length() + f) <= -1075:
        return value, 2.0**-1074, rb  # |exact| <= |mid| + r < 2^-1074
    # |mid - value| <= ulp(value) / 2, rounded up (below the normal range, ulp / 2 = 2^-1075
    # is not a float64: 2^-1074)
    conv = 0.0 if _is_exact(value, m, e) else max(math.ulp(value) / 2, 2.0**-1074)
    radius = rb + conv
    back = radius - rb  # TwoSum: the addition's exact error, rounded up where it is > 0
    if (rb - (radius - back)) + (conv - back) > 0:
        radius = math.nextafter(radius, math.inf)
    return value, radius, rb


# --- weights -------------------------------------------------------------------------------


def _horner(be: _Backend, s: Obj, coeffs: Sequence[Any]) -> Obj:
    w = np.full(s.shape, coeffs[-1], dtype=object)
    for c in reversed(coeffs[:-1]):
        w = w * s + c
    return w


def _elu1(be: _Backend, x: np.ndarray) -> Obj:
    # elu(x) + 1: x + 1 for x > 0, exp(x) otherwise (the branch is decided on the exact x).
    xs = be.arr(x)
    return np.where(x > 0, xs + be.num(1.0), be.exp(xs))


def weights(
    be: _Backend,
    method: str,
    q: np.ndarray,
    k: np.ndarray,
    p: dict[str, Any],
    fk: Obj | None = None,
) -> Obj:
    """Enclosures of the unnormalized weights w_ij (docs/internals.md), for one batch item;
    ``fk``: the keys' :func:`features` where the caller holds them.

    Factors common to a whole row (FAVOR's exp(-|q'|^2/2) and 1/sqrt(m)) cancel in the
    normalization and are left out.
    """
    scale: float = p.get("scale", 1.0)  # linear has none and uses none
    if method not in FEATURED:
        s = be.matmul(be.arr(q), be.arr(k).T) * be.num(scale)
        if p.get("softcap") is not None:  # cap tanh(s / cap)
            cap = be.num(p["softcap"])
            # arrays on the left: mpmath's interval scalars do not defer to numpy's arrays
            s = be.tanh(s * (be.num(1.0) / cap)) * cap
        if method == "softmax":
            return be.exp(s)
        if method == "taylor":
            coeffs = [be.num(1.0)]
            for i in range(1, p["degree"] + 1):
                coeffs.append(coeffs[-1] / be.num(float(i)))
            return _horner(be, s, coeffs)
        if method == "polynomial":
            return _horner(be, s, [be.num(c) for c in p["coeffs"]])
        if method != "semiring":  # pragma: no cover - dispatch is validated by the caller
            raise AssertionError(method)
        w = np.full(s.shape, be.num(0.0), dtype=object)
        for c, lam in p["terms"]:
            w = w + be.exp(s * be.num(lam)) * be.num(c)
        return w
    fk = features(be, method, k, p, keys=True) if fk is None else fk
    return be.matmul(features(be, method, q, p, keys=False), fk.T)


#: The methods whose weights are products of query and key features (:func:`features`).
FEATURED = ("log", "linear", "favor")


def features(be: _Backend, method: str, x: np.ndarray, p: dict[str, Any], keys: bool) -> Obj:
    """Enclosures of the feature-map methods' query (``keys`` False) or key features of
    ``x``, ``[n, F]``."""
    scale: float = p.get("scale", 1.0)
    if method == "log":
        f = be.exp(be.arr(x) * be.num(scale))
    elif method == "linear":
        if p["feature_map"] == "elu1":
            f = _elu1(be, x)
        else:  # features computed by the caller, taken as exact
            f = be.arr(p["phi_k" if keys else "phi_q"])
    else:  # favor
        xw = be.matmul(be.arr(x), be.arr(p["projection"]).T) * be.sqrt(be.num(scale))
        if keys:
            xa = be.arr(x)
            norm = (xa * xa).sum(axis=1, keepdims=True) if x.shape[1] else be.num(0.0)
            xw = xw - norm * (be.num(scale) / be.num(2.0))
        f = be.exp(xw)
    return f


def _settle_ref(v: np.ndarray) -> np.ndarray:
    return np.abs(v).max(axis=0) if v.shape[0] else np.zeros(v.shape[1])


def _convert(
    be: _Backend, y: Obj, bad_rows: np.ndarray, ref: np.ndarray
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Floats of the output balls, and whether every output off ``bad_rows`` is settled."""
    val = np.empty(y.shape)
    rad = np.empty(y.shape)
    settled = True
    for idx in np.ndindex(*y.shape):
        val[idx], rad[idx], rb = ball_to_float(be.midrad(y[idx]))
        # (a midpoint past float64's range is not settled: inf <= SETTLE * inf held, and
        # a ball 10^(+-1e199) wide around 1 was returned as value inf, radius inf)
        near = math.isfinite(val[idx]) and rb <= SETTLE * max(abs(val[idx]), ref[idx[1]])
        if not (bad_rows[idx[0]] or near):
            settled = False
    rad[bad_rows] = math.inf
    return val, rad, settled


#: (row, key) pairs per row block of :func:`normalized` (a few ball objects each, about
#: 200 bytes in all): memory O(block) at any length.
BALL_PAIRS = 2**18


def normalized(
    be_cls: type[_Backend],
    method: str,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    causal: bool,
    p: dict[str, Any],
    pos: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """y_i = sum_j w_ij v_j / sum_j w_ij for one batch item: (value, radius).

    Over blocks of rows of at most :data:`BALL_PAIRS` (row, key) pairs (causal: the keys up
    to the block's last row), each settled on its own (:data:`PRECISIONS`) against the
    values' largest magnitudes over every key: a block's balls are those of the whole
    sequence at the precision the block settles at. ``pos``: the positions of ``q``'s rows
    in the sequence, increasing (default ``0 .. n_q - 1``; what a causal row sees)."""
    n_q, n_k = q.shape[0], k.shape[0]
    pos = np.arange(n_q) if pos is None else pos
    ref = _settle_ref(v)
    rows = max(1, BALL_PAIRS // max(n_k, 1))
    val, rad = np.empty((n_q, v.shape[1])), np.empty((n_q, v.shape[1]))
    # the key features, once per precision for every block (elementwise per key: a
    # block's slice is what it would form)
    cache: dict[int, Obj] = {}

    def key_side(be: _Backend, prec: int, m: int) -> Obj | None:
        if method not in FEATURED:
            return None
        if prec not in cache:
            cache[prec] = features(be, method, k, p, keys=True)
        return cache[prec][:m]

    for i0 in range(0, n_q, rows):
        i1 = min(n_q, i0 + rows)
        m = min(n_k, int(pos[i1 - 1]) + 1) if causal else n_k
        pb = dict(p)
        if "phi_q" in p:
            pb["phi_q"] = p["phi_q"][i0:i1]
        val[i0:i1], rad[i0:i1] = _normalized_block(
            be_cls, method, q[i0:i1], k[:m], v[:m], pos[i0:i1] if causal else None, pb, ref,
            key_side,
        )  # fmt: skip
        progress.rows(i1, n_q)
    return val, rad


def _normalized_block(
    be_cls: type[_Backend],
    method: str,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    last: np.ndarray | None,
    p: dict[str, Any],
    ref: np.ndarray,
    key_side: Callable[[_Backend, int, int], Obj | None],
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`normalized`'s rows, each seeing the keys up to ``last[r]`` (None: every
    key), settled against ``ref``; ``key_side(be, prec, m)``: the first ``m`` keys'
    features at that precision, or None."""
    n_k = k.shape[0]
    top = exact_score_bits(q, k) if method not in FEATURED else 0
    for prec in PRECISIONS + ((top,) if top > PRECISIONS[-1] else ()):
        with be_cls(prec) as be:
            w = weights(be, method, q, k, p, key_side(be, prec, n_k))
            if last is not None:
                w[np.arange(n_k)[None, :] > last[:, None]] = be.num(0.0)
            vv = np.concatenate([v, np.ones((n_k, 1))], axis=1)
            nd = be.matmul(w, be.arr(vv))
            num, den = nd[:, :-1], nd[:, -1]
            bad = np.array([be.contains_zero(d) for d in den], dtype=bool)
            safe = np.where(bad, be.num(1.0), den)
            val, rad, settled = _convert(be, num / safe[:, None], bad, ref)
            # Refine while a normalizer not exactly zero is still unresolved.
            unresolved = any(ball_to_float(be.midrad(d))[2] != 0 for d in den[bad])
        if settled and not unresolved:
            break
    # The normalizer's ball contains 0 even at the highest precision: the output is
    # undefined (0 / 0) or unresolved, so no value is claimed (NaN) and no bound (inf).
    val[bad] = math.nan
    return val, rad


#: ``setup(be) -> step`` for :func:`recurrence`: the recurrence's parameters as balls of
#: ``be``'s precision, and ``step(lo, hi, h, emit) -> (h, y)`` its tokens ``lo..hi-1`` from
#: the state ``h`` (None before the first token), with ``y [nb, m, d_v]`` the outputs of the
#: m tokens that ``emit`` (bool, one per token lo..hi-1) marks, None when it marks none.
Step = Callable[[int, int, Any, np.ndarray], tuple[Any, Any]]


def recurrence(
    be_cls: type[_Backend], want: np.ndarray, setup: Callable[[_Backend], Step], chunk: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """The outputs ``want`` (bool per token, at least one) of a causal recurrence, as
    (value, radius) ``[nb, want.sum(), d_v]``: ``setup``'s steps (:data:`Step`) over chunks
    of ``chunk`` tokens up to the last token wanted, at 128 bits then doubled until every
    output ball has radius <= SETTLE |value| (or up to 1024 bits; the radius is certified
    either way)."""
    last = int(np.flatnonzero(want)[-1]) + 1
    for prec in PRECISIONS:
        with be_cls(prec) as be:
            step, h, ys = setup(be), None, []
            for lo in range(0, last, chunk):
                hi = min(lo + chunk, last)
                h, y = step(lo, hi, h, want[lo:hi])
                if y is not None:
                    ys.append(y)
                progress.rows(hi, last)
            y = np.concatenate(ys, axis=1)
            flat = y.reshape(-1, y.shape[-1])
            val, rad, settled = _convert(
                be, flat, np.zeros(flat.shape[0], dtype=bool), np.zeros(flat.shape[1])
            )
        if settled:
            break
    return val.reshape(y.shape), rad.reshape(y.shape)


def gated(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, log_g: np.ndarray, scale: float
) -> Callable[[_Backend], Step]:
    """The :func:`recurrence` setup of o_t = scale sum_{j<=t} sum_c q_tc (prod_{l=j+1..t}
    g_lc) k_jc v_j, i.e. S_t = diag(g_t) S_{t-1} + k_t v_t^T, o_t = scale q_t S_t, on
    ``[nb, n, d]`` float64 arrays taken as exact (``log_g [nb, n, d_k]``, g = exp(log_g)).

    Chunked: with L_t = log_g_lo + ... + log_g_t the chunk-local prefix sums (balls) and
    E = exp(L), the outputs of a chunk are ``(q E) S_{lo-1} + tril((q E) (k / E)^T) v`` (the
    causal factorized product within the chunk, ``arb_mat`` products) and the state passed
    on is ``S_{hi-1} = E_{hi-1} (S_{lo-1} + (k / E)^T v)``: O(n (C + d_v) d_k) work and
    O(C (C + d) + d_k d_v) balls for chunks of C tokens. The triangle's product is formed
    for the emitted rows only, so sampled rows cost the state's recurrence alone.

    A reset (``log_g = -inf``, a gate of exactly 0) ends a piece of the chunk: the piece
    from it on takes ``L`` from 0 in the reset channels and the state entering it with
    those channels' rows zeroed (exactly what ``diag(g)`` does), so no ``exp(-inf)`` or
    ``k / 0`` is formed. So does a log-gate below ``-2^40``, with the state's rows times
    its own ``exp(log_g)`` (a ball of an exact point): summed into ``L`` it made the sum
    inexact by more than 1 at any precision (-1e308 - 0.5), ``exp(L)`` a ball about 0 and
    ``k / E`` NaN (a review).
    """
    if log_g.size and (log_g == log_g[..., :1]).all():
        log_g = log_g[..., :1]  # one gate per token for every channel: one exp per token
    reset = np.isinf(log_g)
    cut = reset | (log_g < -(2.0**40))

    def setup(be: _Backend) -> Step:
        sc, zero = be.num(scale), be.num(0.0)

        def piece(b: int, a: int, z: int, s: Any, rows: np.ndarray) -> tuple[Any, Any]:
            """Tokens a..z-1 of sequence b (no reset after a), its rows ``rows`` (from a)."""
            lg = log_g[b, a:z].copy()
            if cut[b, a].any():
                # the entering state's rows times the cut channels' gates: 0 at a reset
                factor = be.exp(be.arr(np.where(cut[b, a] & ~reset[b, a], lg[0], 0.0)))
                factor = factor * be.arr((~reset[b, a]).astype(np.float64))
                lg[0] = np.where(cut[b, a], 0.0, lg[0])
                s = None if s is None else s * factor[:, None]
            e = be.exp(np.add.accumulate(be.arr(lg), axis=0))
            kt, vb = be.arr(k[b, a:z]) / e, be.arr(v[b, a:z])
            y = None
            if rows.size:
                qt = be.arr(q[b, a + rows]) * e[rows]
                w = be.matmul(qt, kt.T)
                w[rows[:, None] < np.arange(z - a)] = zero  # causal: keys j <= t
                y = be.matmul(w, vb)
                y = (y if s is None else y + be.matmul(qt, s)) * sc
            upd = be.matmul(kt.T, vb)
            return (upd if s is None else s + upd) * e[-1][:, None], y

        def step(lo: int, hi: int, h: Any, emit: np.ndarray) -> tuple[Any, Any]:
            rows = np.flatnonzero(emit)
            hs, ys = [], []
            for b in range(q.shape[0]):
                s = None if h is None else h[b]
                cuts = [lo, *(lo + np.flatnonzero(cut[b, lo + 1 : hi].any(-1)) + 1), hi]
                parts = []
                for a, z in zip(cuts[:-1], cuts[1:], strict=True):
                    at = rows[(rows >= a - lo) & (rows < z - lo)] - (a - lo)
                    s, y = piece(b, a, z, s, at)
                    if y is not None:
                        parts.append(y)
                if rows.size:
                    ys.append(np.concatenate(parts, axis=0))
                hs.append(s)
            return hs, np.stack(ys) if ys else None

        return step

    return setup


#: (row, key) pairs per block of the tropical screening's float64 temporaries (a few
#: arrays of this many entries, 8 MB each).
TROPICAL_PAIRS = 2**20


def tropical(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    causal: bool,
    scale: float,
    pos: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Max-plus attention, y_i = mean of v_j over argmax_j s_ij, in exact rational arithmetic.

    Candidates are screened in float64 with the rigorous bound |fl(q.k) - q.k| <= gamma_d
    |q|.|k| (any summation order); the survivors' scores are compared exactly (Fractions),
    and a row with one survivor takes its value exactly. The screening streams over blocks
    of rows and keys of :data:`TROPICAL_PAIRS` pairs, twice (each row's largest lower end,
    then the keys whose upper end reaches it): memory O(block) at any length. Rows whose
    every score is exactly 0 (a zero query, scale 0) tie every key they see: their means
    come from exact prefix sums of v, not from a rational per key and row. ``pos``: the
    positions of ``q``'s rows, increasing (default ``0 .. n_q - 1``).
    """
    n_q, n_k, d = q.shape[0], k.shape[0], q.shape[1]
    pos = np.arange(n_q) if pos is None else pos
    sgn = (scale > 0) - (scale < 0)
    u = 2.0**-53
    g = d * u / (1 - d * u) * (1 + 4 * u)
    qa, ka = np.abs(q), np.abs(k)
    rows = max(1, min(n_q, TROPICAL_PAIRS // max(n_k, 1)))
    step = max(1, TROPICAL_PAIRS // rows)  # keys per block

    def screened(i0: int, i1: int, j0: int, j1: int) -> tuple[np.ndarray, np.ndarray, Any]:
        """The block's enclosures ``[lo, hi]`` of the exact scores, and the pairs seen."""
        with np.errstate(over="ignore", invalid="ignore"):  # inf/NaN bounds keep j (below)
            s = sgn * (q[i0:i1] @ k[j0:j1].T)
            # + d 2^-1073: products that underflow (abs. error <= 2^-1075 each, also in the
            # bound)
            err = g * (qa[i0:i1] @ ka[j0:j1].T) * (1 + (d + 2) * 2 * u) + d * 2.0**-1073
            lo, hi = s - err, s + err
        seen = np.arange(j0, j1)[None, :] <= pos[i0:i1, None] if causal else True
        return lo, hi, seen

    val = np.empty((n_q, v.shape[1]))
    rad = np.zeros_like(val)
    zero = ~(q != 0).any(-1) if sgn else np.ones(n_q, dtype=bool)
    sums, upto = [Fraction(0)] * v.shape[1], 0  # exact sums of v over keys 0 .. upto - 1

    def put(i: int, total: list[Fraction], count: int) -> None:
        for c, t in enumerate(total):
            mean = t / count
            val[i, c] = float(mean)
            rad[i, c] = float_up(abs(mean - Fraction(val[i, c])))

    for i0 in range(0, n_q, rows):
        i1 = min(n_q, i0 + rows)
        end = min(n_k, int(pos[i1 - 1]) + 1) if causal else n_k
        blocks = [(j0, min(end, j0 + step)) for j0 in range(0, end, step)]
        best = np.full(i1 - i0, -np.inf)
        for j0, j1 in blocks:
            lo, _, seen = screened(i0, i1, j0, j1)
            best = np.maximum(best, np.where(np.isfinite(lo) & seen, lo, -np.inf).max(-1))
        cand: list[list[int]] = [[] for _ in range(i1 - i0)]
        for j0, j1 in blocks:
            _, hi, seen = screened(i0, i1, j0, j1)
            # not (hi < best): keeps the j whose float bound overflowed (compared exactly)
            keep = ~(hi < best[:, None]) & seen & ~zero[i0:i1, None]
            for r, j in zip(*np.nonzero(keep), strict=True):
                cand[r].append(j0 + int(j))
        for r, js in enumerate(cand):
            i = i0 + r
            if zero[i]:  # (rows in increasing order: the sums only grow)
                m = int(pos[i]) + 1 if causal else n_k
                for j in range(upto, m):
                    sums = [t + Fraction(x) for t, x in zip(sums, v[j], strict=True)]
                upto = max(upto, m)
                put(i, sums, m)
                continue
            if len(js) == 1:  # the argmax, certainly
                val[i] = v[js[0]] + 0.0  # (+0.0 for -0.0, as the rationals give)
                continue
            qi = [Fraction(a) for a in q[i]]
            exact = {
                j: sgn * sum(map(operator.mul, qi, map(Fraction, k[j])), Fraction(0)) for j in js
            }
            top = max(exact.values())
            ties = [j for j in js if exact[j] == top]
            put(
                i,
                [sum(map(Fraction, v[ties, c]), Fraction(0)) for c in range(v.shape[1])],
                len(ties),
            )
        progress.rows(i1, n_q)
    return val, rad


FeatureMap = Callable[[Any], Any]
