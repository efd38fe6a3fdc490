"""Rounding bound of softmax attention and of the exact semirings, for any schedule.

The graph (docs/bounds/attention.md, "Softmax and exact semirings"): q, k, v loaded from
storage to compute (exact when compute holds storage); logits ``s = scale q.k`` (the
scale applied to q or to the dot, a dot of d products in any order, FMA or not); per
semiring term ``l_r = lam_r s + log c_r``; a shift by a running maximum (the row maximum,
or the maximum so far in online softmax, rescaling the accumulators by
``exp(M_old - M_new)`` up to once per block of keys); exp; the sum over terms;
``sum_j w_j v_j`` and ``sum_j w_j`` in accumulate, in any order; one division; one store.
:class:`~attnprec.analysis.precision.Precision` fixes the formats, the elementary-function
model and the block (None: any schedule).

Each weight's computed value is ``w_j phi_j`` with ``phi_j`` in
``[exp(-Lambda_j) (1 - k_e)^(1 + R), exp(Lambda_j) (1 + k_e)^(1 + R)]``: ``Lambda_j`` the
exponent error (the logit's, plus ``(3 + 2 a) u_c`` times the distance to the row maximum:
the shift, the scale constant, the argument rounding inside exp and the rescalings, whose
arguments telescope to that distance), ``k_e`` the exp error, ``R`` the rescalings;
:mod:`.quotient` does the rest.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import torch

from attnprec._device import scaled as device_scaled
from attnprec.analysis.bounds._rows import (
    BUDGET,
    Block,
    Visible,
    logits64,
    normalize,
    softcapped,
    stream,
)
from attnprec.analysis.bounds.quotient import (
    Basis,
    Mix,
    Terms,
    _load,
    absorbable,
    finish,
    flushed,
    folded_shift,
    hull,
    larger,
    largest_weight,
    quotient,
    unbounded,
)
from attnprec.analysis.bounds.rounding import (
    U64,
    excess,
    exp_down,
    exp_up,
    gamma,
    lse_bound,
    order_sq,
    upper,
)
from attnprec.analysis.precision import ONE_PASS, Format, Precision, round_to

__all__ = ["softmax_rounding", "schedule", "Loaded", "exact_product", "rep_units"]


def exact_product(sc: float) -> bool:
    """Whether multiplying by ``sc`` is exact (``sc = +-2^e``; barring under/overflow)."""
    mant, _ = math.frexp(sc)
    return sc != 0 and abs(mant) == 0.5


def scaled_underflow(sc: float, precision: Precision) -> float:
    """Absolute error of a scaled operand ``fl(sc x)`` beyond its relative rounding: the
    product may land below the normal range (or be flushed to zero), a loss of up to the
    products' underflow whatever ``|sc|`` (a review: q's fp16 subnormals times ``1/sqrt(d)``
    against keys of 65504, 1.7x outside the bound; fp32 ``q sc`` flushed, 7.6x). None for
    a power of two at least 1, which shifts the exponent up exactly."""
    if exact_product(sc) and abs(sc) >= 1:
        return 0.0
    return max(precision.compute.underflow, precision.accumulate.underflow)


def scale_roundings(sc: float, precision: Precision) -> tuple[int, int]:
    """``(products, representations)``: the roundings a logit's terms pass for the scale
    ``sc`` where the declaration lets a kernel apply it (:attr:`Precision.constants`). On
    q, on k or on the dot: one product (none for a power of two) and the constant rounded
    to compute (none where compute holds it); with ``"any"`` also its root on q and on k
    (PyTorch's math SDPA, whose outputs match that form exactly): two of each, unless the
    root is a power of two, or held."""
    fc = precision.compute
    one = (0 if exact_product(sc) else 1, rep_units(sc, fc))
    if precision.constants == "folded":
        return one
    r = math.sqrt(abs(sc))
    return (
        max(one[0], 0 if exact_product(r) else 2),
        max(one[1], 2 * rep_units(r, fc)),
    )


#: log2(e) rounded up: a kernel that takes exp2 folds it into its scale (Triton's tutorial)
LOG2E_UP = math.nextafter(math.log2(math.e), math.inf)


def folded_constant(sc: float) -> float:
    """The largest factor a kernel may multiply an operand (q or k) by for the scale ``sc``:
    the scale or its root, either with log2(e) folded in (``exp2``)."""
    c = abs(sc) * LOG2E_UP
    return max(abs(sc), math.sqrt(abs(sc)), c, math.sqrt(c))


def scaled_operands_over(
    x: torch.Tensor, sc: float, precision: Precision, ld: Loaded
) -> torch.Tensor:
    """``[B]``: whether an operand of ``x [B, n, d]`` (queries or keys), loaded and
    multiplied by the scale or its root as a kernel may (:func:`scale_roundings`), reaches
    the products' overflow: over every row of the sequence, as a kernel may form the
    logits of masked keys too, whose NaN an additive mask does not remove (a review: a
    future key's ``fl(32768 sqrt(16))`` in fp16, a NaN row under a finite bound)."""
    lim, _ = precision.products_overflow()
    f = folded_constant(sc) * (1 + precision.compute.u) ** 2 * (1 + 4 * U64)
    if x.numel() == 0:
        return torch.zeros(x.shape[:-2], dtype=torch.bool)
    return upper(ld.abs(x).flatten(-2).amax(-1) * f, 2) >= lim


def rep_units(c: float, fmt: Any) -> int:
    """The constant ``c`` as the format ``fmt`` holds it, in units of its unit roundoff:
    ``ceil(|fl(c) - c| / (u |c|))``, 0 where it holds ``c`` (a kernel multiplying by a
    Python float first rounds it to its tensor's format, as PyTorch does). At most 1 in
    the normal range; below it, more (``1e-6`` in fp16: 28; a review found the count of
    one unit there), and ``1 / u`` where ``c`` flushes to 0.

    Raises
    ------
    ValueError
        Where ``fmt`` holds the constant (the scale or its root) as inf, naming ``scale``.
    """
    if c == 0:
        return 0
    held = float(round_to(torch.tensor([c], dtype=torch.float64), fmt)[0])
    if not math.isfinite(held):  # (a kernel multiplying by it returns inf or NaN)
        raise ValueError(f"scale: {c!r} overflows the compute format {Format.of(fmt).name}")
    err = abs(held - c)  # (exact: both within a factor 2, or held 0)
    if err == 0:
        return 0
    return math.ceil(Fraction(err) / (Fraction(abs(c)) * Fraction(Format.of(fmt).u)))


def schedule(
    precision: Precision, n: torch.Tensor, span: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rescalings R, summation depth) of a sum of ``n`` keys (tensor) under the
    declaration's ``block`` and ``block_sums``.

    Blocks of B keys (B = 1 when None: any schedule): each block summed in any order
    (depth B - 1); with more than one block, per block one rescaling (a product) and one
    addition of the block sum, and two more of each for combining parallel segments:
    R = ceil(n / B) + 1, depth = (B - 1) + 2 ceil(n / B) + 2 (``block_sums="separate"``).
    A running sum that may join a block's sum (``"any"``) passes each later block's
    additions too: depth (n - 1) + 2 ceil(n / B) + 2. One block: R = 0, depth n - 1.
    ``span``: where the keys a row sees are not a prefix of the sequence (a window, a key
    mask), the extent from its first to its last visible key: a kernel's blocks of B
    positions (at any alignment) hold them in up to ``min(n, ceil(span / B) + 1)`` blocks
    (a review: one visible key per block of 64 rescaled at each, counted as one block).
    """
    b = 1 if precision.block is None else precision.block
    nb = torch.ceil(n / b)
    if span is not None and precision.block is not None and precision.block < ONE_PASS:
        nb = torch.minimum(n, torch.ceil(span / b) + 1).maximum(nb)
    multi = (nb > 1).to(n.dtype)
    R = multi * (nb + 1)
    # (blocks of one key: the running sum's one addition per block is the term's own)
    inner = n if precision.block_sums == "any" and b > 1 else torch.clamp(n, max=b)
    dep = (inner - 1).clamp_min(0) + multi * (2 * nb + 2)
    return R, dep


#: Entries of a softmax row block's ``[rows, keys]`` temporaries (:func:`softmax_rounding`).
SOFTMAX_BUDGET = 4 * BUDGET


class Loaded:
    """Bounds on the operands as a kernel holds them after loading them into compute.

    ``ul`` and ``hl``: relative and absolute error of one load (``ul = 0`` when compute
    holds storage; ``hl`` is then still ``compute.underflow`` where storage has values
    below compute's normal range, which a flush-to-zero format may treat as 0, e.g. bf16
    subnormals in fp32); ``abs(x)`` bounds ``|x~|``; ``err(x)`` bounds ``|x~ - x|`` (``hl``
    only for a nonzero ``x`` below compute's normal range); ``over(x)`` marks entries that
    overflow the compute format on loading.
    """

    def __init__(self, precision: Precision) -> None:
        fc, fs = precision.compute, precision.storage
        exact = precision.loads_exactly()
        # a load into a narrower compute is a conversion: it rounds as the declaration's
        # rounding (rtz: up to 2u, a review: a truncating fp32 -> bf16 load 1.98x outside u)
        u_r, eta_r = fc.rounding_units(precision.rounding)
        self.ul = 0.0 if exact else u_r
        self.hl = eta_r if not exact else 0.0
        if fs.min_subnormal < fc.min_normal:
            self.hl = max(self.hl, fc.underflow)
        self.limit = math.inf if exact else fc.overflow()
        self._tiny = fc.min_normal

    def abs(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs() * (1 + self.ul) + self.hl

    def dot(self, q: torch.Tensor, k_l1: float) -> tuple[float, Any]:
        """``(kappa, rho)`` with ``kappa |q|.|k| + rho >= sum_c |q~_c k~_c|`` for the
        float64 ``|q|.|k|`` (within gamma_d of the exact one): ``(1 + ul)^2 / (1 -
        gamma_d)``, and ``rho = hl (1 + ul)(|q|_1 + k_l1) + d hl^2`` ``[B, r, 1]`` (0 when
        ``hl`` is), ``k_l1`` at least every key's ``|k|_1``; each raised by 4 roundings."""
        d = q.shape[-1]
        kappa = (1 + self.ul) ** 2 / (1 - gamma(d, U64)) * (1 + 4 * U64)
        if self.hl == 0:
            return kappa, 0.0
        q_l1 = q.abs().sum(-1, keepdim=True)
        return kappa, upper(self.hl * (1 + self.ul) * (q_l1 + k_l1) + d * self.hl**2, d + 4)

    def err(self, x: torch.Tensor) -> torch.Tensor:
        # a load at or above compute's normal range rounds (or holds) within ul and
        # flushes nothing, a zero loads exactly: exact loads of normal values have no
        # error, whose products the bounds then skip (Basis)
        a = x.abs()
        if self.hl == 0:
            return a * self.ul
        return torch.where((a < self._tiny) & (a > 0), self.hl, 0.0) + a * self.ul

    def over(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs() >= self.limit

    def rows_over(self, q: torch.Tensor, key_over: torch.Tensor) -> torch.Tensor:
        """``[B, r, 1]``: the rows whose query ``q [B, r, d]`` overflows compute on loading,
        or all, where a key of the sequence does (``key_over [B, n]``: its key or value),
        seen or not: a kernel may load masked keys and values too, and an additive mask or
        a masked weight times an inf value keeps their NaN (a review: a masked key of 1e5
        in fp16 compute, NaN rows under finite bounds in softmax and taylor)."""
        return (self.over(q).any(-1) | key_over.any(-1, keepdim=True)).unsqueeze(-1)


def softmax_rounding(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Precision,
    sc: float,
    causal: bool | Visible,
    terms: tuple[tuple[float, float], ...],
    lam: float,
    rows: torch.Tensor | None = None,
    softcap: float | None = None,
) -> dict[str, torch.Tensor]:
    """Per output element ``[B, rows, d_v]``: ``"sound"`` and ``"typical"`` bounds on
    ``|kernel - exact method on the stored inputs|`` and boolean masks named after the
    intermediates that may overflow (where the bounds are inf).

    ``q, k, v``: the stored inputs, float64 ``[B, n, d]``; ``terms``: ``((c_r, lam_r),
    ...)`` of the semiring (``((1.0, 1.0),)`` for softmax); ``lam``: the tail factor of the
    probabilistic bound (:func:`.rounding.tail_lambda`).
    """
    # Under any schedule (block None) a kernel may also shift a row by the largest logit of
    # every key of the sequence, masked future ones included (then once, no rescaling),
    # where it forms one division, or one lse in two passes (a review: such a two-pass log
    # form 2.5-173x outside a bound without it): a split of split-KV shifts by a maximum
    # of its own keys
    vis = causal if isinstance(causal, Visible) else Visible(bool(causal))
    wide = (
        precision.block is None
        and vis.causal
        and (precision.sums != "log" or precision.passes == 2)
    )

    plain_causal = vis.causal and vis.window is None and vis.key_mask is None
    ld = Loaded(precision)
    keys = _Keys(k, v, ld, plain_causal)
    k_l1 = (1 + ld.ul) * keys.k_l1 + k.shape[-1] * ld.hl  # every loaded key's |k~|_1
    q_l1 = float(upper(q.abs().sum(-1).amax(), q.shape[-1])) if q.numel() else 0.0
    q_l1 = (1 + ld.ul) * q_l1 + q.shape[-1] * ld.hl  # every loaded query's |q~|_1
    le = _LogitError(precision, sc, q.shape[-1], softcap, upper(k_l1, 4), upper(q_l1, 4))
    keys.codes = _code_factors(q, k, v, precision)
    keys.chords = len(terms) == 1 and _chord_reach(q, keys, le, precision)
    keys.scaled_over = scaled_operands_over(k, sc, precision, ld)
    # the channels' largest |k~|, load error and |k| over every key (the wide shift's
    # envelope)
    k_env = (keys.ka.amax(-2), ld.err(k).amax(-2), keys.k_abs.amax(-2)) if wide else None

    desc = _descale_out_of_range(q, k, v, precision, sc)

    def block(blk: Block) -> dict[str, torch.Tensor]:
        tops = None
        if k_env is not None:  # the block's own logits are the caller's (x)
            env = k_env
            tops = lambda x: _row_tops(  # noqa: E731
                blk.q, k, le, ld, terms, vis.key_mask, env, (blk.k0, x)
            )
        out = _block(blk, keys, precision, le, terms, lam, tops)
        if desc is None:
            return out
        d_logit, d_value = desc
        fcn = precision.compute.name
        reasons = {
            f"descale scale s_q s_k in {fcn}": d_logit[:, blk.idx, None],
            f"value descale s_v / c_p in {fcn}": d_value[..., None],
        }
        return {**out, **unbounded(out["sound"], out["typical"], reasons)}

    # Four budgets per block: its ~1,400 row-level operations (two shift models, both
    # levels) are a fixed cost per block, and the block's passes are threaded over both
    # cores once they are large; at n = 4096 0.44 -> 0.34 s (140 MB instead of 67 MB),
    # while the other methods' bounds gain nothing and double their memory
    # (benchmarks/bench_scale.py, docs/benchmarks.md)
    return stream(block, q, k, v, causal, rows, budget=SOFTMAX_BUDGET)


def _descale_out_of_range(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, precision: Precision, sc: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """With scale factors (``precision.scaling``): the rows ``[B, n]`` whose logit descale
    ``scale s_q s_k`` (products in compute, in any order) may leave compute's normal range,
    and the heads ``[B, 1]`` whose value descale may, where the relative error is no longer
    ``u_c``: a constant below it (an fp16 compute holds ``2^-30`` as 0, every logit 0; a
    flush-to-zero fp32 one a subnormal ``s_v`` as 0, every output 0) or past its largest.
    The constants a kernel may form: ``s_q``, ``s_k``, ``s_v`` themselves, their products
    with the scale and each other, and ``s_v / c_p`` (``weights_scale``; ``1 / c_p`` is
    normal, :class:`Precision` checks ``c_p``). The scales from the stored ``q, k, v``,
    within far less than the margin of 2 of the kernel's (from the given ones). None
    without scaling."""
    if precision.scaling is None:
        return None
    fc = precision.compute

    def out(x: torch.Tensor) -> torch.Tensor:
        return (x < 2 * fc.min_normal) | (x > fc.max / 2)

    sq, sk = precision.row_scales(q), precision.row_scales(k)
    lo_k, hi_k = sk.amin(-1, keepdim=True), sk.amax(-1, keepdim=True)  # [B, 1]
    a = abs(sc)
    # every constant and partial product (s_q, s_k, scale s_q, scale s_k, s_q s_k) and the
    # whole, at the extremes
    parts = [sq, lo_k, hi_k, a * sq, a * lo_k, a * hi_k, sq * lo_k, sq * hi_k]
    parts += [a * sq * lo_k, a * sq * hi_k]
    bad = torch.zeros_like(sq, dtype=torch.bool)
    for x in parts:
        bad = bad | out(x.expand_as(sq))
    # the value descale: s_v and s_v / c_p at each head's extremes (a block scale's too)
    sv = precision.row_scales(v)
    lo_v, hi_v = sv.amin(-1, keepdim=True), sv.amax(-1, keepdim=True)
    c = precision.weights_scale
    v_bad = out(lo_v) | out(hi_v) | out(lo_v / c) | out(hi_v / c)
    return bad, v_bad


def _code_factors(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, precision: Precision
) -> tuple[torch.Tensor, float] | None:
    """With scale factors, a kernel's dot and value sums take the codes ``x / s`` (the
    descales come after): ``(1 / (s_q s_k_min)) [B, n]`` (each row's codes' dot against
    its ``|q|.|k|``) and ``max(1, 1 / s_v_min)`` (the values' codes against ``|v|``), the
    keys' least scales (exact for one scale per tensor). None without scaling."""
    if precision.scaling is None:
        return None

    s_q, s_k, s_v = precision.row_scales(q), precision.row_scales(k), precision.row_scales(v)
    dot = upper(1 / (s_q * s_k.amin(-1, keepdim=True)), 2)
    return dot, max(1.0, float(upper(1 / s_v.min(), 1))) if v.numel() else 1.0


class _Keys:
    """The key side of a sequence, once for all row blocks (each takes its keys' slice):
    the loads' model ``ld``, ``|k|``, ``|k~|``, ``k^2``, ``|v~|``, the values' load error, the load
    overflows; with the plain causal mask (every block starts at key 0) the prefix sums of
    ``|v~|`` and the prefix extremes of the loaded values."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, ld: Loaded, prefix: bool) -> None:
        self.ld = ld
        self.chords = False  # the exps' chords (_chord_reach), set by the caller
        self.codes: tuple[torch.Tensor, float] | None = None  # _code_factors, by the caller
        self.scaled_over = torch.zeros(k.shape[:-2], dtype=torch.bool)  # by the caller
        self.k_abs, self.ka, self.k2 = k.abs(), ld.abs(k), k * k
        self.k_top = self.k_abs.amax(-2)  # [B, d]: each channel's largest |k| over every key
        # the largest |k|_1 of the sequence (Loaded.dot), raised by its d roundings
        self.k_l1 = float(upper(self.k_abs.sum(-1).amax(), k.shape[-1])) if k.numel() else 0.0
        self.va, self.v_err = ld.abs(v), ld.err(v)
        self.over = ld.over(k).any(-1) | ld.over(v).any(-1)
        self.prefix = prefix
        if prefix:
            self.va_cum = torch.cumsum(self.va, -2)
            self.v_lo = torch.cummin(v - self.v_err, -2).values
            self.v_hi = torch.cummax(v + self.v_err, -2).values


class _LogitError:
    """The kernel's logit error ``|s^ - s| <= sigma`` (before and after soft-capping), from
    a bound ``e_dot`` on its dot product's error; elementwise and increasing in every
    argument, so per-row maxima bound every key's (:func:`_row_tops`).

    The scale constant's common rounding is in the shift. A power-of-two scale multiplies
    exactly (``us = 0``); a representable one has no rounding of its own (``uk = 0``).
    Once per sequence (``d`` the head dimension)."""

    def __init__(
        self,
        precision: Precision,
        sc: float,
        d: int,
        softcap: float | None,
        k_l1: float,
        q_l1: float,
    ) -> None:
        fc, fa = precision.compute, precision.accumulate
        self.uc, ua = fc.u, fa.u
        # a semiring term's lam_r s, or s / tau as kernels write SoftMaxPlus: a division,
        # within the declared div (a review: exp(s / tau) in fp32, 1.12x outside the bound
        # that took it for one rounded product)
        self.r_lam = max(self.uc, precision.op_error("div"))
        # a semiring term's log c_r: rounded once, or a log in compute within the declared
        # ulps plus its absolute floor (a review: an fp32 log 3.9 ulps off at log c = 69,
        # 1.27x outside the bound that took it for one rounding)
        self._log_rel = max(self.uc, precision.op_error("log"))
        self._log_floor = precision.log_floor()
        up = precision.product_u()
        # a product or sum that underflows (flushed to zero included: Format.underflow)
        self.eta_p = max(fc.underflow, fa.underflow)
        self.us = 0.0 if exact_product(sc) else self.uc
        self.scaled = precision.scaling is not None
        if self.scaled:
            self.us = self.uc  # the logits' descale: scale * s_q * s_k, a rounded constant
        # per term the products by the scale (or its roots), and their representations,
        # common to every logit (scale_roundings)
        n_s, n_r = scale_roundings(sc, precision)
        self.root = n_s == 2  # (the root's product on each key's entries: the level)
        n_s = max(n_s, int(self.us > 0))
        self.th_dot = excess(n_s * math.log1p(self.uc) + math.log1p(up) + (d - 1) * math.log1p(ua))
        self.sc, self.d, self.softcap = sc, d, softcap
        self.k_t = precision.op_error("tanh")
        self.uk = n_r * self.uc
        r = math.sqrt(abs(sc))
        # a scaled operand's underflow times the other's modulus: sc q~_c's times |k~_c|
        # (the scale on q or k: k_l1, q_l1 >= every loaded key's, query's |.|_1), the dot's,
        # or sqrt(sc) on both sides: each root's product's times the other's
        self.s_under = upper(
            max(
                scaled_underflow(sc, precision) * (max(k_l1, q_l1) + 1),
                scaled_underflow(r, precision) * (r * (1 + self.uc) * (k_l1 + q_l1) + d),
            ),
            6,
        )

    def log_c(self, c: float) -> float:
        """The error of a semiring term's ``log c`` as the kernel holds it."""
        lc = abs(math.log(c))
        return self._log_rel * lc + (self._log_floor if lc > 0 else 0.0)

    def dot(self, absdot: torch.Tensor, kappa: float, rho: Any) -> torch.Tensor:
        """``e_dot = (1 + th) P - (1 - gamma_{d+1}) |q|.|k| + 2 d eta_p`` with ``P = kappa
        absdot + rho >= sum_c |q~_c k~_c|`` (:meth:`Loaded.dot`; ``absdot`` the float64
        ``|q|.|k|``, within gamma_d of the exact one, rounded down; ``rho`` ``[B, r, 1]`` or
        0): affine in ``absdot``. Its coefficient, a difference of numbers near 1, is
        raised by 8 roundings of 1; the products and the sum by ``g8``. Into ``absdot``."""
        g8 = 1 + gamma(8, U64)
        c1 = (kappa * (1 + self.th_dot) * g8 - (1 - gamma(self.d + 1, U64)) + 8 * U64) * g8
        c0 = (rho * (1 + self.th_dot) + 2 * self.d * self.eta_p) * (g8 * g8)
        return absdot.mul_(c1).add_(c0)

    def sigma(self, e_dot: torch.Tensor, x_abs: torch.Tensor, sig64: torch.Tensor) -> torch.Tensor:
        """``|sc| e_dot (1 + us)^2 + us (1 + us) |x| + sig64`` (nonnegative terms; into
        ``e_dot``), the scaled operand's underflow, and where scaled the descale constant
        ``scale * s_q * s_k`` (two products in compute, per block of keys: a relative error
        of each logit)."""
        g8, us, uc = 1 + gamma(8, U64), self.us, self.uc
        sigma = e_dot.mul_(abs(self.sc) * (1 + us) ** 2 * g8).add_(x_abs, alpha=us * (1 + us) * g8)
        sigma = sigma.add_(self.s_under * (1 + us) * g8)
        if self.scaled:
            sigma = upper(sigma + 2 * uc * (1 + uc) ** 2 * (x_abs + sigma), 4)
        return sigma.add_(sig64)

    def folded(self, sigma: torch.Tensor, x_abs: torch.Tensor, x_top: Any) -> torch.Tensor:
        """``sigma + u_c max(|x| + sigma, x_top)`` (into ``sigma``): a kernel may fold
        log2(e) into its scale and take ``exp2(fl(s C) - m')`` (Triton's tutorial) or
        ``exp2(fma(s, C, -fl(m_b C)))`` (FlashAttention), rounding an *unshifted* scaled
        logit: its own (``u_c |s^|``), or a block's running maximum (``u_c |m^_b|``, which
        differs between blocks, so it does not cancel). For key j of block b, ``s_j <= m_b
        <= `` the row's largest, so ``|m_b| <= max(|s_j|, top+)``: ``x_abs`` the logits'
        moduli as exp takes them (soft-capped), ``x_top`` ``[B, r, 1]`` at least ``top+``
        plus its error. The constant's own rounding scales every exponent alike and
        telescopes to the distance to the shift (``uk``)."""
        env = torch.add(x_abs, sigma)
        env = torch.maximum(env, x_top, out=env) if isinstance(x_top, torch.Tensor) else env
        return sigma.add_(env, alpha=self.uc).mul_(1.0 + gamma(5, U64))  # (upper, in place)

    def capped(self, sigma: torch.Tensor, x_abs: torch.Tensor) -> torch.Tensor:
        """Soft-capping: the kernel divides by cap, as a division within the declared ulps
        or as a product with the reciprocal rounded (``(r_lam + u_c) |s|`` covers both: a
        review found a 2-ulp fp32 division 1.24x outside the ``2 u_c |s|`` of the second
        alone), takes tanh (``k_t`` relative), multiplies by cap (``u_c``); the map is
        1-Lipschitz, so the logit's error passes and these add."""
        if self.softcap is None:
            return sigma
        cap, uc, k_t = self.softcap, self.uc, self.k_t
        tabs = torch.tanh(x_abs / cap)
        arg = (self.r_lam + uc) * (x_abs + sigma)
        return upper(sigma + arg + cap * (k_t + uc * (1 + k_t)) * tabs, 4)


def _softcap_out(cap: float, fc: Any) -> bool:
    """Whether compute holds neither ``cap`` nor ``1 / cap`` within its normal range (the
    soft-cap's model takes each with one relative rounding: ``fl(1 / 1e-5)`` is inf in
    fp16, and ``0 * inf`` a NaN)."""
    return not all(fc.min_normal <= c * (1 + 2 * U64) < fc.max for c in (cap, 1 / cap))


def _chord_reach(q: torch.Tensor, keys: _Keys, le: _LogitError, precision: Precision) -> bool:
    """Whether the exponent errors of every term of the sequence stay within
    :data:`CHORD_SPAN` (one term): ``(c_d D + g7 sigma)`` at most ``(2(3 + 2a) + 4(1 + k_l))
    u_c (2 X + 2 S) + S`` with ``X = |sc| max_i |q_i|_1 max_j |k_j|_inf >= |s_ij|`` and ``S =
    ((d + 4) u_p + 2 u_l + 2 u_c) X`` about the logits' errors. Decided once per sequence, so
    that a row's bound does not depend on the rows that share its block (the chords are
    sound for any span; this decides tightness and speed)."""
    if q.numel() == 0 or keys.k_abs.numel() == 0:
        return False
    uc, a = precision.compute.u, precision.elementary.exp_arg
    up = precision.product_u()
    kl = precision.op_error("log")
    X = abs(le.sc) * float(q.abs().sum(-1).amax()) * float(keys.k_abs.amax())
    S = ((le.d + 4) * up + 2 * keys.ld.ul + 2 * uc) * X * 1.01
    est = (2 * (3 + 2 * a) + 4 * (1 + kl)) * uc * (2 * X + 2 * S) + S
    return est * (1 + gamma(8, U64)) <= CHORD_SPAN


def _row_tops(
    q: torch.Tensor,
    k: torch.Tensor,
    le: _LogitError,
    ld: Loaded,
    terms: tuple[tuple[float, float], ...],
    key_mask: torch.Tensor | None,
    k_env: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    near: tuple[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``[B, r]``: each row's largest term exponent *as the kernel computes it* (an upper
    bound) over every key of the sequence that the padding mask keeps, over key chunks
    within the budget: from each row's largest and least logit, one float64 error bound
    for all its keys (the logits' :func:`logits64` bound with ``|q|.|k|`` at most ``|q| .
    max_j |k_j|``) and the kernel's own logit error at that envelope (a hidden key's
    computed logit may exceed every visible one's by more than the exact ones differ):
    ``k_env`` ``([B, d], [B, d], [B, d])``, the channels' largest ``|k~|``, load error and
    ``|k|``; ``le``, ``ld`` the logits' and the loads' error models.
    ``near``: ``(j0, x)``, the rows' float64 logits ``sc q.k`` ``[B, r, m]`` (any order of
    evaluation) of keys ``j0 .. j0 + m - 1``, formed by the caller."""
    B, r, d = q.shape
    sc, softcap = le.sc, le.softcap
    hi = torch.full((B, r), -math.inf, dtype=torch.float64)
    lo = torch.full((B, r), math.inf, dtype=torch.float64)
    n_k = k.shape[-2]
    j0, x0 = (0, None) if near is None else near
    m0 = 0 if x0 is None else x0.shape[-1]
    step = max(1, device_scaled(SOFTMAX_BUDGET) // max(B * r, 1))  # [B, r, step] temporaries
    chunks = [(a, min(a + step, j0)) for a in range(0, j0, step)]
    chunks += [(a, min(a + step, n_k)) for a in range(j0 + m0, n_k, step)]
    for a, z in [(j0, j0 + m0)] + chunks:
        if z <= a:
            continue
        # the other keys' q.k unscaled: rounding is monotone, so the extremes of the
        # rounded sc q.k are the rounded sc times those of q.k (swapped where sc < 0)
        scaled = a == j0 and x0 is not None
        x = x0 if x0 is not None and scaled else q @ k[..., a:z, :].transpose(-1, -2)
        if key_mask is not None:  # (scaled first: a masked row's infinities times sc = 0)
            x = x if scaled else x.mul_(sc)
            scaled, keep = True, key_mask[..., None, a:z]
            x_hi = x.masked_fill(~keep, -math.inf).amax(-1)
            x_lo = x.masked_fill(~keep, math.inf).amin(-1)
        else:
            x_lo, x_hi = x.amin(-1), x.amax(-1)  # (torch.aminmax is 10x slower here)
        if not scaled:
            x_lo, x_hi = (x_lo * sc, x_hi * sc) if sc >= 0 else (x_hi * sc, x_lo * sc)
        hi, lo = torch.maximum(hi, x_hi), torch.minimum(lo, x_lo)
    kA, kE, kmax = (t.unsqueeze(-1) for t in k_env)  # [B, d, 1]
    absdot = upper((q.abs() @ kmax).squeeze(-1), d + 2)
    x_abs = torch.maximum(hi.abs(), lo.abs())
    err = upper(abs(sc) * (gamma(d + 1, U64) * absdot + d * 2.0**-1074) + 2 * U64 * x_abs, d + 8)
    # the kernel's error: e_dot <= th P + (P - |q|.|k|) + ..., where P - |q|.|k| <= L =
    # sum_c (err(q_c) |k~_c| + |q_c| err(k_c)) (the loads), both at the envelope
    P = upper(ld.abs(q) @ kA, d + 2).squeeze(-1)
    L = upper(ld.err(q) @ kA + q.abs() @ kE, 2 * d + 2).squeeze(-1)
    g8 = 1 + gamma(8, U64)
    e_dot = upper((le.th_dot * g8 + gamma(16, U64)) * P + g8 * g8 * L + 2 * d * le.eta_p * g8, 4)
    sig = le.sigma(e_dot, x_abs, err)
    if softcap is not None:  # monotone and 1-Lipschitz; float64 tanh within 4 ulp
        sig = le.capped(sig, x_abs)
        err = upper(err + 8 * U64 * (softcap + x_abs) + 2.0**-1074, 2)
        hi, lo = softcap * torch.tanh(hi / softcap), softcap * torch.tanh(lo / softcap)
        x_abs = torch.maximum(hi.abs(), lo.abs())
    sig = le.folded(sig, x_abs, None)  # (x_abs bounds every key's and maximum's modulus)
    uc = le.uc
    err = upper(torch.maximum(err, sig), 2)  # sig includes err (in place of sig64)
    top = torch.stack(
        [
            lam_r * (hi if lam_r >= 0 else lo)
            + abs(lam_r) * err
            + math.log(c)
            + (1 + uc) * ((le.r_lam + uc) * abs(lam_r) * x_abs + le.log_c(c))
            for c, lam_r in terms
        ]
    ).amax(0)
    # the stack's float64 roundings, upward (-inf: a row whose every key is padding)
    return torch.where(torch.isfinite(top), top + 4 * U64 * (top.abs() + err) + 2.0**-1074, top)


def _log_input(precision: Precision, lo: Any) -> Any:
    """The error of ``log l`` from rounding ``l`` into compute first (a log in compute
    takes its argument there), where compute does not hold accumulate, for ``l >=
    e^-lo``: ``-log(1 - u_r - eta_r e^lo)``, ``inf`` where that reaches ``log 2`` (``l``
    may flush to 0 there); 0 where compute holds accumulate (a review: 0.82 u_c of a
    two-pass kernel's realized lse error of 8.38 u_c, where 7.81 u_c was charged)."""
    fc = precision.compute
    if fc.holds(precision.accumulate):
        return 0.0
    u_r, eta_r = fc.rounding_units(precision.rounding)
    conv = upper(u_r + eta_r * torch.exp(torch.as_tensor(lo, dtype=torch.float64)), 2)
    return torch.where(conv < 0.5, -torch.log1p(-conv.clamp_max(0.5)) * (1 + 4 * U64), math.inf)


class _LseForm:
    """Split-KV softmax (FlashAttention's split kernel, flash-decoding): each split of the
    keys normalized on its own, shifted by a maximum ``m_s`` of its own keys (so ``l_s``
    is at least its largest weight: not in a wide shift's model), ``o_s = acc_s / l_s``,
    its normalizer kept as the log ``lse_s = m_s + log l_s`` in compute, and the splits
    combined as ``sum_s exp(lse_s - lse) o_s`` with ``lse = log sum_s exp(lse_s - max) +
    max`` (docs/bounds/attention.md,
    "Split-KV softmax"). As a quotient ``N^ / e^lse`` every term keeps its linear factors
    and gains: a common exponent error (``lse_s``'s two roundings: ``u |lse_s| + k_l
    |log l_s|``, shared by both paths), a numerator-only factor ``fN`` (the subtraction
    ``lse_s - lse`` and its exp, the division by ``l_s``, the product by ``o_s``) and a
    normalizer-only ``fD`` (the combine's subtraction and exp, ``log`` of its sum and the
    addition of the maximum). ``|lse_s| <= |M| + dist + lnn``, ``lse - lse_s <= dist +
    2 lnn + theta`` with ``lnn`` a bound on ``|log l_s|``. The combine's sum over splits
    is within the schedule's depth (the splits are blocks).

    Pairwise merges (``Precision.merges``: at most J per split, merges with a state empty
    for the row among them; docs/bounds/attention.md, "Split-KV softmax"): the exp form (``m =
    max``, ``w = exp(lse - m)``, ``o = (w_a o_a + w_b o_b) / s``, ``lse = m + log s``, ``s =
    w_a + w_b``) and the sigmoid form (``o = o_a - sigmoid(lse_b - lse_a)(o_a - o_b)``,
    ``lse = lse_a - logsigmoid(lse_a - lse_b)``). The output is ``sum_s alpha_s o_s`` times
    numerator-only factors, with ``alpha`` the exact softmax of ``lse_s + E_s`` (by
    induction over the merges: a merge's weights and the lse it rounds see the same ``s``;
    the sigmoid's weights sum to 1 exactly), and ``|E_s|`` at most the sum over the merges
    on its path of each merge's exponent error: the lesser side's subtraction and the
    argument roundings inside its exp (or sigmoid's), ``(1 + exp_arg) u gap + k_e`` with
    ``gap <= dist + 2 lnn + 2 Theta``; the new lse's ``u |lse| (1 + k_l + u) + k_l log s +
    f_l + u`` (``1 <= s <= 2 (1 + k_e)``, ``f_l`` the log's absolute floor); the sigmoid
    form's lse also ``(2 + exp_arg) u`` times any gap, ``<= dmax + 2 lnn + 2 Theta``. These
    are common to the two paths: theta gains J times them, linear in ``dist`` and in
    Theta, a bound on every term's theta (solved for). Per merge the numerator takes two
    products, a sum, a division, ``1 / (1 + delta_s)`` and the merged state's rounding to
    ``merge_format``; per split, its output's rounding to the output format (an attention
    call's); the sigmoid form adds ``c_sig sigmoid |o_a - o_b|`` absolute, at most ``J
    c_sig`` times the states' hull's width in all."""

    def __init__(
        self,
        precision: Precision,
        top: torch.Tensor,
        stop: torch.Tensor,
        nvis: torch.Tensor,
        n_t: int,
    ) -> None:
        self.precision = precision
        self.uc = precision.compute.u
        self.up = precision.product_u()
        self.kl, self.ke = precision.op_error("log"), precision.op_error("exp")
        self.exp_arg = precision.elementary.exp_arg
        self.kd = precision.op_error("div")
        top, stop = top[0], stop[0]  # [B, r, 1]
        self.M = torch.where(torch.isfinite(top), top.abs() + stop, 0.0)
        self.log_n = torch.log(nvis.clamp_min(1) * n_t)[:, None]  # [r, 1]
        # a log's absolute floor near 1: lse_s's log l_s, and each merge's log s
        el = precision.elementary
        self.log_floor = precision.log_floor()
        # theta's coefficient of dist (a constant, or per row with merges)
        self.b: Any = self.uc * (1 + self.kl + self.uc) * (1 + 2 * self.uc)
        # pairwise merges: a split passes at most J, a merge with a state empty for the row
        # (lse -inf) among them: its output is still held in merge_format and its lse
        # still takes log(1) (vLLM's, FlashInfer's; a review: one such merge into bf16
        # 1,422x outside the bound that charged min(J, nvis - 1)); of them at most nvis - 1
        # merge two nonempty states, the rest (J_e) have no gap: exp(-inf) = 0 and
        # sigmoid(-inf) = 0 are exact [r, 1]
        self.J = precision.merges or 0
        self.J_row = torch.full_like(nvis, float(self.J), dtype=torch.float64)[:, None]
        J_full = (nvis - 1).clamp_min(0).to(torch.float64)[:, None].clamp_max(float(self.J))
        self.J_full, self.J_e = J_full, self.J_row - J_full
        # per merge, E's coefficients of dist and of Theta: the lesser side's subtraction
        # and the argument roundings inside its exp (or sigmoid's), ca times its gap <=
        # dist + 2 lnn + 2 Theta; the new lse's |lse| (b); the sigmoid form's lse, cs times
        # any gap (logsigmoid's subtraction, min(y, 0), its exp's argument)
        c_g = self.uc * (1 + self.uc)
        self.ca = (1 + el.exp_arg) * c_g
        self.cs = (2 + el.exp_arg) * c_g
        self.c_d = self.ca + self.b
        self.c_T = 2 * self.ca + self.b + 2 * self.cs
        # Theta's own coefficient per row: an empty merge's lse rounds by b alone
        self.c_T_row = self.J_full * self.c_T + self.J_e * self.b
        # the sigmoid form's per-merge error relative to sigmoid |o_a - o_b|: sigmoid's own
        # (an exp, an addition, a division), o_a - o_b and the product
        c_sig = float(excess(math.log1p(self.ke) + math.log1p(self.uc) + math.log1p(self.kd)))
        self.c_sig = (c_sig + 3 * c_g) * (1 + 4 * U64)
        # numerator-only, per merge: two products, a sum, a division, 1 / (1 + delta_s) and
        # the merged state held in merge_format; per split: its output as an attention
        # call returns it, rounded to the output format (once)
        # (conversions: they round as the declaration's ``rounding``, and below the
        # normal range by eta_m, eta_s absolute: ``absolute``; a review: subnormal states
        # 3.3x outside at J = 64, truncated ones 1.4x at J = 16)
        fm = precision.output_format if precision.merge_format is None else precision.merge_format
        fo = precision.output_format
        self.fm, self.fo = fm, fo
        (u_m, self.eta_m), (u_s, self.eta_s) = (
            f.rounding_units(precision.rounding) for f in (fm, fo)
        )
        self.lkN_m = (
            2 * math.log1p(self.up) + math.log1p(self.kd) - math.log1p(-self.uc) + math.log1p(u_m)
        )
        self.lkN_s = math.log1p(u_s) if self.J else 0.0
        # each split divides in compute: where its sums are held in a format compute does
        # not hold, acc_s and l_s are taken into it first (quotient.finish's conversions:
        # relative here, the absolute part in :meth:`absolute`)
        fc, fa = precision.compute, precision.accumulate
        held = fc.holds(fa)
        self.u_c, self.eta_c = (0.0, 0.0) if held else fc.rounding_units(precision.rounding)
        self.lkN_s += math.log1p(self.u_c) - math.log1p(-self.u_c)
        self.b1 = self.b
        if self.J:  # theta's coefficient of dist, per row
            self.b = self.b + self.J_full * self.c_d + self.J_e * self.b1
        # gap = dist + 2 lnn + 2 theta bounds lse - lse_s (factors)
        self.e = self.ca * (1 + 2 * self.b)
        self.Theta: Any = 0.0

    def factors(
        self,
        lam_max: torch.Tensor,
        dmax: torch.Tensor,
        h_log: Any,
        log_s: torch.Tensor,
        lo: Any = 0.0,
    ) -> tuple[float, torch.Tensor, float, torch.Tensor, torch.Tensor]:
        """The per-term factors as affine functions of the distance ``dist`` to the row
        maximum, from row bounds of the linear exponent errors ``lam_max >= max Lambda`` and
        of the distances ``dmax``, ``h_log`` the exps' log-factor, ``log_s``, the log of
        the sums' factors' ratio ``s_hi / s_lo``, and ``lo >= -log`` of a split's largest
        weight (:func:`.quotient.largest_weight`): ``(b, a, e, eN, eD)`` with ``theta = b
        dist + a`` (added to the exponent error), ``log fN = e dist + eN`` and ``log fD = e
        dist + eD`` (all >= 0).

        ``lnn`` bounds ``|log l_s|`` (a split sum of exp(<= 0) terms, the largest at least
        ``e^-lo``); ``theta = (u (M + dist + lnn)(1 + k_l + u) + k_l lnn + f_l)(1 + 2u) +
        c_l``, the common exponent error (``f_l`` the log's absolute floor, ``c_l`` the
        rounding of ``l_s`` into compute for its log: :func:`_log_input`); ``gap = dist + 2 lnn + 2
        theta`` bounds ``lse - lse_s`` (``lse <= top + lnn + theta``, ``lse_s >= x_j -
        theta``, with room for the combine's own rounding); both linear in ``dist``, so
        each factor is one exp."""
        uc, kl, fl, el_arg = self.uc, self.kl, self.log_floor, self.exp_arg
        lnn = torch.maximum(self.log_n + lam_max + h_log + log_s, torch.as_tensor(lo))
        self.lnn = lnn  # [B, r, 1]
        b = self.b
        a = (uc * (self.M + lnn) * (1 + kl + uc) + kl * lnn + fl) * (1 + 2 * uc)
        a = a + _log_input(self.precision, lo)  # (l_s >= e^-lo, its largest weight)
        if self.J:  # theta = b1 dist + a, plus J (c_d dist + a_m0 + c_T Theta) (merges)
            J, J_e = self.J_full, self.J_e
            log_2 = math.log(2 * (1 + self.ke) * (1 + uc)) * (1 + 2 * U64)  # >= log s
            # an empty merge's: exp(0) (its weight, s), log s and the addition of m
            a_e = (
                math.log1p(self.ke)
                + (uc * (self.M + lnn) * (1 + kl + uc) + kl * log_2 + fl) * (1 + 2 * uc)
                + math.log1p(uc)
            )
            a_m0 = a_e + self.ca * 2 * lnn + self.cs * (dmax + 2 * lnn)
            # Theta >= theta at the row's largest distance (its own coefficient < 1/2,
            # else inf: the merges' errors feed on themselves)
            merged = J * (self.c_d * dmax + a_m0) + J_e * (self.b1 * dmax + a_e)
            rest = upper(self.b1 * dmax + a + merged, 8)
            ok = self.c_T_row < 0.5
            Theta = torch.where(
                ok, rest / (1 - self.c_T_row).clamp_min(0.5) * (1 + gamma(4, U64)), math.inf
            )
            self.Theta = Theta
            a = upper(a + J * a_m0 + J_e * a_e + self.c_T_row * Theta, 8)
        # g = c_a gap + log(1 + k_e), gap = (1 + 2 b) dist + 2 lnn + 2 a: the combine's
        # subtraction lse_s - lse and the argument roundings inside its exp (c_a = (1 +
        # exp_arg) c_g; a review: exp_arg was the merges' only)
        e0 = self.ca * (2 * lnn + 2 * a) + math.log1p(self.ke)
        lkN = math.log1p(self.kd) + math.log1p(self.up) + self.J_row * self.lkN_m + self.lkN_s
        lkD = kl * lnn + fl + uc * (self.M + lnn) * (1 + kl + uc)
        # the combine's weights sum to within delta of 1: the same factors at the row's
        # largest distance (for kappa)
        gmax = dmax * (1 + 2 * b) + 2 * lnn + 2 * a
        self._log_delta = (
            2 * self.ca * gmax
            + 2 * math.log1p(self.ke)
            + kl * lnn
            + fl
            + uc * (self.M + lnn) * (1 + kl + uc)
            + log_s
            + math.log1p(self.kd)
            + math.log1p(self.up)
            + self.J_row * self.lkN_m
            + self.lkN_s
        )
        # and at most e^lift (1 + k_e) each: the maximum's term is exp(0) = 1 exactly (the
        # combine subtracts its shift; Precision.sums declares no folded constant there), so
        # the sum is >= 1, but its log may return down to -f_l (the declared floor: a
        # review's log(1) = -4u, 1.14x outside the bound that took it >= 0). lse = fl(M +
        # log S) with M the largest lse_s, a float: rounding is monotone, so fl(M - f_l)
        # is M where f_l is below half the gap under M, else within f_l plus that half gap:
        # lse_s - lse <= 2 f_l, each weight an exp of at most that (its argument's
        # roundings in); there are at most as many splits as visible keys (log_n), each
        # product and sum within up and s_hi (<= e^log_s)
        lift = 2 * fl * (1 + 2 * uc) * (1 + (1 + el_arg) * uc)
        self._log_cap = (
            self.log_n
            + lift * (1 + 4 * U64)
            + math.log1p(self.ke)
            + math.log1p(self.up)
            + log_s
            + self.J_row * self.lkN_m
            + self.lkN_s
        )
        return b, a, self.e, e0 + lkN, e0 + lkD

    def absolute(self, v_top: torch.Tensor, l_lo: torch.Tensor) -> torch.Tensor:
        """The conversions' absolute parts in the output: each merged state's ``eta_m``
        (at most J per row), each split output's ``eta_s`` (with merges), and its sums'
        into compute, ``eta_c (1 + |o_s|) / (l_lo (1 - u_c) - eta_c)`` (``|o_s| <= v_top``,
        the values' largest modulus within the hull's slack; ``l_s >= l_lo`` in its units,
        else inf), scaled by the later merges' and the combine's weights, which sum to at
        most ``e^min(log delta, log cap)`` (from the last :meth:`factors`)."""
        w = torch.exp(upper(torch.minimum(self._log_delta, self._log_cap), 2))
        eta_s = self.eta_s if self.J else 0.0
        conv: Any = 0.0
        if self.eta_c > 0:
            room = l_lo * (1 - self.u_c) - self.eta_c
            conv = torch.where(
                room > 0, self.eta_c * (1 + v_top) / room.clamp_min(1e-300), math.inf
            )
            conv = upper(conv, 4)
        return upper((self.J_row * self.eta_m + eta_s + conv) * w, 4)

    def kappa(self, kappa: torch.Tensor) -> torch.Tensor:
        """The hull's slack factor: each split's output within ``kappa`` of its values'
        hull, then scaled by ``sum_s`` of the combine's weights, within ``delta`` of 1 and
        at most the number of splits times ``1 + k_e`` (from the last :meth:`factors`)."""
        return excess(torch.log1p(kappa) + torch.minimum(self._log_delta, self._log_cap), 8)


def _total(w: torch.Tensor | Mix) -> torch.Tensor:
    """A per-key weight's sum over the keys ``[B, r, 1]``."""
    return w.agg("sum") if isinstance(w, Mix) else w.sum(-1, keepdim=True)


def _axpy(x: torch.Tensor, y: torch.Tensor, c: Any) -> torch.Tensor:
    """``x + c y`` (two roundings at most) for a coefficient ``c``, a float or, with
    merges, per row."""
    return torch.add(x, y, alpha=c) if isinstance(c, float) else torch.addcmul(x, y, c)


#: Blocks whose terms' exponent errors vary by at most this much within each row take the
#: exps' chords (at most 0.4% above them, 0.8% for the normalizer's factor) from shared
#: per-key sums; the rest form each exp per key.
CHORD_SPAN = 2.0**-7


def _chord(x0: torch.Tensor, span: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E, k)`` with ``e^{x0 + t} - 1 <= E + k t`` for ``0 <= t <= span`` (``x0 >= 0``
    raised by 8 roundings, as :func:`.rounding.excess` does): the chord of the convex
    ``e^x - 1`` over ``[x0, x0 + span]``, ``k = e^x0 (e^span - 1) / span``."""
    x = upper(x0, 8)
    slope = torch.where(span > 0, torch.expm1(span) / span.clamp_min(2.0**-1022), 1.0)
    return upper(torch.expm1(x), 2), upper(torch.exp(x) * slope, 6)


def _block(
    blk: Block,
    keys: _Keys,
    precision: Precision,
    le: _LogitError,
    terms: tuple[tuple[float, float], ...],
    lam: float,
    wide: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One row block's bounds, the larger over the shift models: a running maximum, and
    where ``wide`` is given, a shift of each row, once, by ``wide(x)`` ``[B, r]`` (>= its
    largest visible term exponent; ``x`` the block's float64 logits, hidden keys too).
    What does not depend on the shift is evaluated once. ``le``: the logits' error model
    (with the scale and the soft-cap)."""
    fc, fa = precision.compute, precision.accumulate
    el = precision.elementary
    uc, ua = fc.u, fa.u
    up = precision.product_u()
    eta_p = le.eta_p
    ld, sc, softcap = keys.ld, le.sc, le.softcap
    q, k, v = blk.q, blk.k, blk.v
    d, m = q.shape[-1], k.shape[-2]
    nvis = blk.visible  # [r]
    R_run, dep = schedule(precision, nvis, blk.span)
    dep3 = dep[:, None]

    # Logits: |s^ - s| <= sigma (_LogitError)
    scaled, th_dot, uk = le.scaled, le.th_dot, le.uk
    kj = blk.held  # the block's keys in the sequence
    x, sig64, absdot = logits64(q, k, sc, keys.k_abs[:, kj])
    shifts = [None] if wide is None else [None, wide(x)]
    x_abs = x.abs()
    k_ld, rho = ld.dot(q, keys.k_l1)  # k_ld absdot + rho >= sum_c |q~_c k~_c|
    # each row's largest |q|.|k| over its visible keys (the products' overflow, below)
    # before le.dot overwrites absdot; and over the keys it does not see, sum_c |q_c| max_j
    # |k_jc| (a kernel may form a hidden key's logit, a block past the diagonal or a window's
    # edge, padding, and an additive mask keeps its NaN: a review's padding logit of 8e4 in
    # fp16 gave NaN rows under finite bounds)
    absdot_max = blk.visible_amax(absdot, -1).clamp_min_(0.0)
    if blk.mask is not None or m < keys.k_abs.shape[-2]:
        absdot_max = torch.maximum(absdot_max, upper(q.abs() @ keys.k_top.unsqueeze(-1), d))
    sigma = blk.masked(le.sigma(le.dot(absdot, k_ld, rho), x_abs, sig64), 0.0, inplace=True)
    x_raw = x
    if softcap is not None:
        sigma = blk.masked(le.capped(sigma, x_abs), 0.0)
        x, sig64 = softcapped(x, sig64, softcap)
        x_abs = x.abs()
    n_t = len(terms)
    # a two-pass kernel (Precision.passes): its exps and rescalings reach one sum each
    two = precision.passes == 2
    plain = n_t == 1 and terms[0] == (1.0, 1.0)
    # the running maxima a kernel shifts by (_LogitError.folded): at most the row's largest
    # visible logit (positive multiples lam_r of it in a semiring; any other: its largest
    # modulus), within the row's largest error
    x_top = blk.visible_amax(x if all(lam_r > 0 for _, lam_r in terms) else x_abs, -1)
    x_top = x_top.clamp_min_(0.0).add_(sigma.amax(-1, keepdim=True))
    sigma = blk.masked(le.folded(sigma, x_abs, x_top), 0.0, inplace=True)
    smax = sigma.amax(-1, keepdim=True)
    if plain:
        lt, sig_all, lt_err = x.unsqueeze(0), sigma.unsqueeze(0), [sig64]
    else:
        sig_t, lt_list, lt_err = [], [], []
        for c, lam_r in terms:
            a_l, xa = abs(lam_r), x.abs()
            rl = (1 + uc) * ((le.r_lam + uc) * a_l * xa + le.log_c(c))
            sig_t.append(a_l * sigma + rl)
            lt_list.append(lam_r * x + math.log(c))
            lt_err.append(a_l * sig64 + U64 * (2 * a_l * xa + 3 * abs(math.log(c))))
        lt, sig_all = torch.stack(lt_list), blk.masked(torch.stack(sig_t), 0.0, inplace=True)
    # the largest term exponent of the row (over its visible keys)
    top = blk.visible_amax(lt, (0, -1))
    stop = smax.unsqueeze(0) if plain else sig_all.amax((0, -1), keepdim=True)
    # distance of each term exponent to the row's largest, as the kernel sees it (0 where
    # hidden: below every visible one, so the row maxima below stay the visible ones')
    dist_row = blk.masked(torch.sub(top, lt).add_(sig_all).add_(stop), 0.0, inplace=True)
    # exact log-weights: log sum_r c_r exp(lam_r s), and their error
    if plain:
        logw, sigw = x, sig64
    else:
        lts = lt.movedim(0, -1)
        lerr = torch.stack(lt_err, -1).amax(-1)
        logw = torch.logsumexp(lts, -1)
        sigw = upper(lse_bound(lts, U64, min_normal=2.0**-1022) + lerr, 4)
    nz = normalize(logw, sigw, v, blk, top[0] if plain else None, inplace=True)

    # The weights' cast (numerator path) and the descales, products in compute: the
    # numerator's terms carry a factor within e_n of 1, the normalizer's within e_d (it
    # sums the weights before or after the cast); eta_w: the cast's absolute part.
    fw = precision.weights
    # (the cast is a conversion: it rounds as the declaration's ``rounding``)
    u_w, eta_w = (0.0, 0.0) if fw is None else fw.rounding_units(precision.rounding)
    if fw is not None:
        e_n = float(excess(math.log1p(u_w) + 3 * math.log1p(uc)))
    else:
        e_n = 2 * uc + uc * uc if scaled else 0.0
    e_d = e_n
    eta_w /= precision.weights_scale
    # the value descales (scale factors): each key block's product by s_v and its addition,
    # in units of c_p, and the division by c_p, each may underflow (flush included)
    eta_desc = 0.0
    if precision.scaling is not None:
        per = precision.scaling
        n_b = 1 if isinstance(per, str) else -(-keys.k_abs.shape[-2] // per)
        eta_desc = (2 * n_b / precision.weights_scale + 1) * fc.underflow
    k_e = precision.op_error("exp")
    l1k = math.log1p(k_e)
    l1m = math.log1p(-k_e) if k_e < 1 else -math.inf
    log_sum = math.log1p(uc) * (n_t - 1)
    # the sums' paths, as logs: s_hi = e^{lg_hi}, s_lo = e^{lg_lo}
    lg_hi, lg_lo = dep3 * math.log1p(ua), dep3 * math.log1p(-ua)
    s_hi, s_lo = torch.exp(lg_hi), torch.exp(lg_lo)
    C_lin = up + 2 * dep3 * ua + e_n + e_d
    # hidden keys have p = pi = 0 (normalize), so these vanish there
    p_lo = nz.p_lo
    va, v_err = keys.va[:, kj], keys.v_err[:, kj]
    # sum of |v~_j| over each row's visible keys (raw_num and an overflow check below)
    if blk.mask is None:
        vis_va = va.sum(-2, keepdim=True).expand(va.shape[0], nvis.numel(), va.shape[-1])
    elif keys.prefix:
        vis_va = keys.va_cum[:, blk.idx]
    else:
        vis_va = blk.mask.to(torch.float64) @ va
    # Probabilistic: independent per-key exponent errors, and what keys share. Model terms
    # (float64, no upward rounding): order_sq(dot, sum_c (q_c k_c)^2, d) written out; its
    # spread sum_c (q_c k_c)^2 / d - dot^2 / d^2 is >= 0 (Cauchy-Schwarz), so it merges into
    # the coefficients of sum_c (q_c k_c)^2 and of (sc dot)^2 (that of the latter stays > 0)
    sq = (q * q) @ keys.k2[:, kj].transpose(-1, -2)  # sum_c (q_c k_c)^2
    n_ld = 0 if ld.ul == 0 else 2
    lam2 = max(lam_r * lam_r for _, lam_r in terms)
    o_first = (d * (d + 1) * (2 * d + 1) / 6 - 1) / d**2 if d >= 2 else 0.0
    o_second = d * (d + 1) / 6 - 1 if d >= 2 else 0.0
    c_sq = up * up + (1 + le.root) * uc * uc + n_ld * ld.ul * ld.ul + ua * ua * o_second / d
    c_sq = sc * sc * c_sq
    c_x2 = ua * ua * (o_first - o_second / d**2) + uc * uc
    if not plain:  # a term's lam_r s (or s / tau)
        c_x2 += le.r_lam**2
    c_0 = k_e**2 + e_d * e_d
    # a two-pass kernel's second pass, with its normalizer as a value: it may divide each
    # weight, exp(s_j - m) / l (a numerator-only rounding)
    div2 = math.log1p(precision.op_error("div")) if two and precision.sums != "log" else 0.0
    c_0 += div2 * div2
    if softcap is not None:  # the cap's own roundings (its map passes the rest)
        c_x2 += (le.r_lam + uc) ** 2
        t_cap = softcap * precision.op_error("tanh")
        c_0 += lam2 * t_cap * t_cap  # (inf past float64, named below; ** raised OverflowError)
    # lam^2 times the logit's variance plus the exp's and the normalizer's, per key
    var_dot = sq.mul_(lam2 * c_sq).addcmul_(x_raw, x_raw, value=lam2 * c_x2).add_(c_0)
    p2 = nz.p2
    var_scale = torch.zeros_like(nz.y)
    if uk > 0:
        px = nz.p * x
        var_scale = (uk * (px @ v - nz.y * px.sum(-1, keepdim=True))) ** 2
    coh_desc: torch.Tensor | float = 0.0
    if scaled:  # the descale constants' roundings, shared by blocks of keys: worst case
        pax = nz.p * x.abs()
        coh_desc = 2 * uc * (pax @ v.abs() + nz.y.abs() * pax.sum(-1, True))
    q_n = nz.q_n
    p2_sum = p2.sum(-1, keepdim=True)
    seq_n, seq_d = blk.in_sequence(nz.p, nz.v)
    # The largest weight's exp argument under a running maximum (largest_weight), and the
    # most any weight's may exceed 0: a folded shift's rounding (folded_shift; reviews: 2^-8
    # in fp16 compute at s C near 2^15, e^-8 at m scale = 16,728 folded in natural units,
    # 1.78x outside the log2 fold's alone), m the row's largest term exponent (one
    # division) or a split's own, up to the largest visible one's modulus; a semiring's
    # term exponent recomputed in the FMA (lam_r C and log c_r folded: its roundings, twice)
    lam_top = max(abs(lam_r) for _, lam_r in terms)
    lc_top = max(abs(math.log(c)) for c, _ in terms)
    m_one = torch.where(torch.isfinite(top[0]), top[0].abs(), 0.0) + stop[0]
    x_vis = blk.visible_amax(x_abs, -1).clamp_min(0.0)
    m_split = torch.maximum(m_one, lam_top * x_vis + lc_top + stop[0])
    rec: Any = 0.0
    if not plain:
        rec = functools.reduce(
            torch.maximum,
            [2 * (1 + uc) * ((le.r_lam + uc) * abs(lr) * x_vis + le.log_c(c)) for c, lr in terms],
        )
    a_one, a_split = (
        upper(folded_shift(mm, precision) + rec, 2).squeeze(-1) for mm in (m_one, m_split)
    )
    kappa = excess(math.log1p(up) + math.log1p(e_n) + lg_hi - lg_lo - math.log1p(-e_d))
    # logs of the path factors (1 + up)(1 + e_n) s_hi, (1 - up)(1 - e_n) s_lo, (1 - e_d) s_lo,
    # (1 + e_d) s_hi of the numerator's and the normalizer's terms
    lK1 = math.log1p(up) + math.log1p(e_n) + lg_hi
    lK2 = math.log1p(-up) + math.log1p(-e_n) + lg_lo
    lK3 = math.log1p(-e_d) + lg_lo
    lK4 = math.log1p(e_d) + lg_hi
    if keys.prefix:
        vr = keys.v_lo[:, blk.idx], keys.v_hi[:, blk.idx]
    else:
        vr = blk.vrange(v - v_err, v + v_err)
    y_abs = nz.y.abs() + nz.eps_y
    v_top = torch.maximum(vr[0].abs(), vr[1].abs())  # the visible values' largest |v|
    dv = v.shape[-1]
    full = lambda row: row.unsqueeze(-1).expand(*row.shape, dv)  # noqa: E731
    acc_lim, p_name = precision.products_overflow()
    # the dot's magnitudes: of the loaded operands (times the scale, on q or on the dot),
    # of the scaled q and k themselves (the scale or its root on either), and with scale
    # factors of the codes (a review: fl(1024 q) past fp16 with logits of 600, and e4m3
    # codes' products of 448^2, NaN outputs under finite bounds)
    dot_top = upper(absdot_max * k_ld + rho, 2).squeeze(-1) * (1 + th_dot)
    # (the constant a kernel multiplies by may carry log2(e), folded for exp2: a hidden
    # key's fl(46080 C) is inf in fp16, NaN under its additive mask; a review)
    logit_over = dot_top * max(1.0, abs(sc) * LOG2E_UP) >= acc_lim
    s_op = folded_constant(sc) * (1 + le.uc) ** 2
    logit_over |= upper(ld.abs(q).amax(-1) * s_op, 2) >= acc_lim
    logit_over |= keys.scaled_over.unsqueeze(-1)
    code_v = 1.0
    if keys.codes is not None:
        code_dot, code_v = keys.codes
        logit_over |= dot_top * code_dot[:, blk.idx] >= acc_lim
    shared_reasons = {
        f"load into {fc.name}": ld.rows_over(q, keys.over).expand(*x.shape[:2], dv),
        f"logits q.k in {p_name}": full(logit_over),
    }
    if softcap is not None and _softcap_out(softcap, fc):  # cap and 1 / cap in compute
        shared_reasons[f"soft-cap constants in {fc.name}"] = full(torch.ones_like(logit_over))
    if not plain:  # a term's exponent lam_r s + log c, products and sums in compute
        lam_top = max(abs(lam_r) for _, lam_r in terms)
        lc_top = max(abs(math.log(c)) + le.log_c(c) for c, _ in terms)
        s_top = blk.visible_amax(x_abs, -1).squeeze(-1).clamp_min(0.0) + smax.squeeze(-1)
        if softcap is None:  # (a hidden key's logit too: absdot_max)
            s_top = torch.maximum(
                s_top, upper(abs(sc) * absdot_max.squeeze(-1), 2) + smax.squeeze(-1)
            )
        shared_reasons[f"term exponents lam s + log c in {p_name}"] = full(
            upper(lam_top * s_top + lc_top, 4) * LOG2E_UP * (1 + le.r_lam) * (1 + uc) >= acc_lim
        )
    # a weight as a kernel multiplies it: times weights_scale before its cast (FP8)
    w_times = max(1.0, precision.weights_scale) if fw is not None else 1.0
    g7 = 1 + gamma(7, U64)
    one_div = precision.sums == "linear" or two
    lse = None if one_div else _LseForm(precision, top, stop, nvis, n_t)
    kl, fl = precision.op_error("log"), precision.log_floor()
    log_n2 = torch.log(nvis.clamp_min(1) * n_t)[:, None]  # [r, 1]
    # Each term's exponent error is affine in its distance to the row maximum and its
    # logit error (over a semiring's terms, their largest: dist0, sig0), and every factor
    # below is that, or the exp of it: the per-key sums of both shift models and both
    # levels come from the shared weights p dist0, p sig0 (a Basis), and the exps are
    # formed per key only in blocks where they are far from linear (_chord).
    dist0 = dist_row[0] if n_t == 1 else dist_row.amax(0)
    sig0 = sig_all[0] if n_t == 1 else sig_all.amax(0)
    dmax, smx = dist0.amax(-1, keepdim=True), stop[0]
    if fw is not None:
        # The weights' cast: each row's largest weight sum_r exp(t_rj - m) in the kernel's
        # units, from the inputs (exact t, or the computed exponents within sig0 of it),
        # with m >= the computed term exponents its shift has seen: the key's own (a
        # running maximum or a split may start at it), or the row's (one shift: one block,
        # a wide shift, no splits). The logs' float64 errors sigw; their sums' roundings,
        # 8 U64 of the largest partial sum. (A mixture's terms reach n_t only where they
        # meet: its worst case made ordinary rows of e4m3 weights times 256 unbounded.)
        w_key, w_row = (
            exp_up(blk.visible_amax(lg + err + 8 * U64 * (lg.abs() + err), -1))
            for lg, err in (
                (logw - lt.amax(0), 2 * (sigw + sig0)),
                (logw - top[0], sigw + sig0 + blk.visible_amax(sigw, -1) + stop[0]),
            )
        )
    var_c = uc * uc * (1 + el.exp_arg**2)
    # the first-order variance's per-key weight: p^2 (u_c^2 (1 + a^2) (dist0 + s)^2 + ...),
    # the wide shift's s in "v1" and in var_dev (which multiplies sum p^2 (v - y)^2)
    basis = Basis(
        nz,
        {
            "1": lambda o: torch.add(nz.p, nz.pi, out=o),  # nz.p_up
            "d": lambda o: torch.mul(p_up, dist0, out=o),
            "s": lambda o: torch.mul(p_up, sig0, out=o),
            "v1": lambda o: torch.mul(p2, dist0, out=o),
            "vk": lambda o: torch.mul(var_dot.addcmul_(dist0, dist0, value=var_c), p2, out=o),
        },
        (v_err, va),
        (("1", "d", "s"), ("vk", "v1")),
    )
    p_up = basis.weight("1")
    p_up_sum = p_up.sum(-1, keepdim=True)
    p_lo_sum = p_lo.sum(-1)
    lKc = torch.maximum(lK1 - lK3, lK4 - lK2)

    flush = precision.exp_flush_matters()

    def model(group: Sequence[torch.Tensor | None]) -> dict[str, torch.Tensor] | None:
        # Several shift models at once where all take the chords (their row-level terms
        # stacked on a leading dim: the model's cost is per-row operations); None where
        # they do not (then one at a time)
        M = len(group)
        wide_m = [shift is not None for shift in group]
        w_mask = torch.tensor(wide_m).view(M, 1, 1) if M > 1 else torch.tensor(wide_m[0])
        # split-KV's terms (partial sums as logs): each split shifts by a maximum of its
        # own keys, so a wide shift's model is the one division's (Precision.sums); where
        # models are stacked, splits() keeps its terms to the running maximum's
        lse_m = None if lse is None or all(wide_m) else lse

        def splits(x: Any) -> Any:
            if M == 1:
                return x
            x = torch.as_tensor(x, dtype=torch.float64)
            return torch.where(w_mask.view(M, *[1] * max(x.dim() - 1, 3)), 0.0, x)

        if M == 1:
            R = R_run if group[0] is None else torch.zeros_like(R_run)
        else:  # [M, 1, r]
            R = torch.stack([R_run if w is None else torch.zeros_like(R_run) for w in group], 0)
            R = R.unsqueeze(1)
        R3 = R[..., None]
        # the shift, the argument inside exp, the rescalings (their arguments telescope),
        # and the scale constant: multiples of u_c times the distance to the shift
        # (float64: a bool mask times a Python float is float32, which dropped g7)
        c_arg = (1 + el.exp_arg) * (1 + (R3 > 0).to(torch.float64)) + uk / uc
        # a wide shift lies this far above the row's largest term exponent: every term's
        # distance grows by it
        above = [None if w is None else (w[..., None] - top[0]).clamp_min(0.0) for w in group]
        s: Any = (
            above[0]
            if M == 1
            else torch.stack([torch.zeros_like(top[0]) if x is None else x for x in above], 0)
        )
        s = 0.0 if s is None else s
        dm = dmax + s
        n_exp = 1 + R3
        h0 = n_exp * l1k + log_sum
        # per key, Lambda = lam_d dist + g7 sig (nonnegative terms, their roundings in g7)
        lam_d = c_arg * uc * g7
        # split-KV (sums held as logs): theta = b dist + a added to Lambda, numerator-only
        # and normalizer-only factors log fN = e dist + eN, log fD = e dist + eD
        # (_LseForm); none when linear
        b: Any = 0.0 if lse_m is None else splits(lse_m.b)
        e: Any = 0.0 if lse_m is None else splits(lse_m.e)
        # The exponents of A and L below, per key: t + (cd s + a + ...), t = cd dist0 + g7
        # sig0 in [0, tmax] (one term); of H: t less e dist0. Chords for one term where t
        # spans little; else per key, with Lambda's largest over the terms.
        cd = lam_d + b + e
        tmax = upper(cd * dmax + g7 * smx, 6)  # cd's own roundings too
        chord = keys.chords  # (the sequence's; tmax, each row's own span, sets the chords)
        if M > 1 and not (chord and not flush):
            return None
        if chord:
            lam_max = upper(lam_d * dm + g7 * smx, 3)
        else:
            lam_key = torch.mul(dist_row, lam_d).add_(sig_all, alpha=g7)
            lam_key = lam_key[0] if n_t == 1 else lam_key.amax(0)  # [B, r, m]
            lam_max = upper(lam_key.amax(-1, keepdim=True) + lam_d * s, 2)
        a: Any = 0.0
        eN: Any = 0.0
        eD: Any = 0.0
        if lse_m is not None:
            # (a split's largest weight: its exp's argument within a_split of 0)
            lo = upper(a_split.unsqueeze(-1) - l1m, 2)
            b, a, e, eN, eD = map(splits, lse_m.factors(lam_max, dm, h0, lg_hi - lg_lo, lo))
        gap = smax.squeeze(-1) + (s.squeeze(-1) if isinstance(s, torch.Tensor) else 0.0)
        w_down = -(l1m + (n_t - 1) * math.log1p(-uc) + math.log1p(-e_d))
        # the largest weight the kernel computes under a running maximum (its own split's,
        # with split-KV), 0 where it may flush (the normalizer then may vanish, and the
        # hull stands down)
        top_w = largest_weight(a_one if lse_m is None else a_split, 1, precision, e_d, eta_w)
        top_w2 = top_w
        lnn: Any = 0.0
        a_N: Any = a  # the numerator's exponent error; a: the normalizer's (one pass: both)
        if two:
            # |log l| <= lnn: the first pass's l is a sum of at most nvis n_t weights, each
            # within its factors, and at least the model's floor w_lo (with no a) or, under
            # a running maximum, its largest weight
            w_lo0 = (
                upper(lam_d * s + upper(lam_d * dmax + g7 * smx, 6) + w_down, 8) + gap[..., None]
            )
            floor = torch.where(top_w > 0, -torch.log(top_w.clamp_min(2.0**-1074)), math.inf)
            lo2 = torch.where(
                w_mask[..., None] if M > 1 else w_mask,
                w_lo0,
                torch.minimum(w_lo0, floor[..., None]),
            )
            lnn = torch.maximum(upper(log_n2 + lam_max + h0 + lg_hi - lg_lo, 4), lo2)
            a_N = div2
        if two and precision.sums != "linear":
            # the first pass's normalizer as its log, lse = m + log l in compute: the log's
            # and the addition's roundings, a factor of the normalizer alone (a); the second
            # pass's argument s_j - lse, lnn past the first's s_j - m: an exponent error of
            # the numerator's terms (a_N; the value form's division div2 where either may
            # be the kernel's). Each on its own side, once: sum_j e^{s_j - lse} v_j is
            # N / (l e^delta), delta the lse's error (a review: both on both sides, twice
            # what a kernel realizes)
            a_lse = (uc * (m_one + s + lnn) * (1 + kl + uc) + kl * lnn + fl) * (1 + 2 * uc)
            # (and l rounded into compute for its log: l >= e^-lo2; inf where it may
            # flush, named below as a normalizer that may vanish)
            a = upper(a_lse + _log_input(precision, lo2), 4)
            a_N = upper((1 + el.exp_arg) * uc * (1 + uc) * lnn, 4).clamp_min(div2)
        if two:
            top_w2 = top_w * torch.exp(-torch.as_tensor(a).squeeze(-1))
        k0 = cd * s + a
        # A >= max(H (1 + up)(1 + e_n) s_hi fN - 1, 1 - L (1 - up)(1 - e_n) s_lo / fN) with
        # H = exp(Lambda + theta + n_exp l1k + log_sum), L = exp(n_exp l1m - log_sum -
        # Lambda - theta), formed from logs (no cancellation): as 1 - e^-x <= e^x - 1, the
        # larger exponent's excess (the two exponents differ at second order)
        xA0 = k0 + eN + torch.maximum(h0 + lK1, -(n_exp * l1m - log_sum + lK2))
        # c_row >= max(K1 fN - K3 / fD, K4 fD - K2 / fN) (K_i = e^{lK_i}): as
        # (K3 / fD) (e^{lK1 - lK3 + lfN + lfD} - 1) and the like, with K3 / fD, K2 / fN <= 1
        xc0 = 2 * e * s + eN + eD + lKc
        # L / fD >= e^{zeta - t}
        zeta = n_exp * l1m - log_sum - k0 - eD
        lH0 = (lam_d + b) * s + a + h0
        lin0 = n_exp * k_e + (n_t - 1) * uc + up + dep3 * ua + e_n
        if chord:
            EA, kA = _chord(xA0, tmax)
            a_t: torch.Tensor | Mix = Mix(basis, {"1": EA, "d": kA * cd, "s": kA * g7})
            H_max = upper(torch.exp(upper(lH0 + tmax, 6)), 2)  # >= every key's H
            if lse_m is not None:
                Ec, kc = _chord(xc0, upper(2 * e * dmax, 4))
                C_sum = Mix(basis, {"1": H_max * Ec, "d": H_max * kc * (2 * e)}).agg("sum")
                C_sum = upper(C_sum, m + 8)
            elif two:  # the normalizer's |rho^D - 1| <= A (its path factors within A's)
                C_sum = _total(a_t)
            else:
                C_sum = upper(H_max * p_up_sum * excess(xc0, 8), m + 8)
            # e^{-t} >= 1 - t, and p_lo <= p_up
            below = Mix(basis, {"d": cd, "s": g7}).agg("sum").squeeze(-1)
            den_sum = p_lo_sum * (1 - gamma(m + 2, U64)) - upper(below, m + 4)
            den_lo = torch.exp(zeta.squeeze(-1)) * (1 - 32 * U64) * den_sum
            tH_max = upper((lam_d + b) * dmax + g7 * smx, 6)
        else:
            t_H = _axpy(lam_key, dist0, b) if lse_m is not None else lam_key
            tH_max = t_H.amax(-1, keepdim=True)
            t_A = _axpy(t_H, dist0, e) if lse_m is not None else t_H
            a_t = excess(torch.add(t_A, xA0), 8).mul_(p_up)
            H = torch.add(t_H, lH0).exp_()  # (t_A may be t_H)
            if lse_m is not None:
                c_row = excess(torch.mul(dist0, 2 * e).add_(xc0), 8)
                C_sum = upper((p_up * H * c_row).sum(-1, keepdim=True), m + 8)
            elif two:
                C_sum = upper(_total(a_t), m + 4)
            else:
                C_sum = upper(torch.einsum("...j,...j->...", p_up, H).unsqueeze(-1), m + 4)
                C_sum = upper(C_sum * excess(xc0, 8), 2)
            den_lo = torch.einsum("...j,...j->...", p_lo, torch.sub(zeta, t_A).exp_())
        den_lo = den_lo * (s_lo * (1 - e_d)).squeeze(-1)
        # first order: A's exponent plus the roundings, and log fN
        lin_a: torch.Tensor | Mix = Mix(basis, {"1": k0 + eN + lin0, "d": cd, "s": g7})
        if n_t > 1:
            lin_a = torch.add(t_A, k0 + eN + lin0).mul_(p_up)
        lin_D: torch.Tensor | Mix = lin_a
        if two:
            # The second pass: one exp per term, shifted by the first pass's last maximum (no
            # rescaling): the numerator's A and its first order, and C_j <= |rho^N_j - 1| +
            # |rho^D_j - 1|, the normalizer's within A (above) with its rescalings
            lam_dN = ((1 + el.exp_arg) + uk / uc) * uc * g7
            k0N = lam_dN * s + a_N
            xAN = k0N + torch.maximum(l1k + log_sum + lK1, -(l1m - log_sum + lK2))
            lin0N = k_e + (n_t - 1) * uc + up + dep3 * ua + e_n
            if chord:
                EN, kN = _chord(xAN, upper(lam_dN * dmax + g7 * smx, 6))
                a_t = Mix(basis, {"1": EN, "d": kN * lam_dN, "s": kN * g7})
                C_sum = upper(C_sum + _total(a_t), 2)
            else:
                t_N = torch.mul(dist_row, lam_dN).add_(sig_all, alpha=g7)
                t_N = t_N[0] if n_t == 1 else t_N.amax(0)
                a_t = excess(torch.add(t_N, xAN), 8).mul_(p_up)
                C_sum = upper(C_sum + _total(a_t), m + 4)
            if n_t > 1:
                lin_a = torch.add(t_N, k0N + lin0N).mul_(p_up)
            else:
                lin_a = Mix(basis, {"1": k0N + lin0N, "d": lam_dN, "s": g7})
        # Underflow, relative to the kernel's normalizer W >= exp(-max Lambda - max sigma)
        # times its largest term's exp error (no rescaling follows it), a mixture's
        # products and the weights' cast
        w_lo = exp_down(-(upper((lam_d + b) * s + a + tH_max + w_down, 6).squeeze(-1) + gap))
        # An exp below T_e is off by up to U_e absolute, where its argument may lie below
        # log T_e: a term's, where its distance to the shift plus its exponent error
        # reaches -log T_e (a margin of 1 for this evaluation); a rescaling's (R per key
        # and term, scaling the sums before it), where a visible term's does (its
        # argument is at least minus that term's distance). Found where that can matter
        # (fp16 compute), else charged to every exp.
        U_e = precision.exp_underflow() * (1 + uc) ** n_t
        # (products w v and rescalings, and as many sums, each may underflow or flush)
        fixed_den = upper(nvis * eta_w + R * fa.underflow, 4)
        fixed_num = upper(eta_w * vis_va + ((2 * nvis + 2 * R) * eta_p + eta_desc)[..., None], 4)
        b_low: torch.Tensor | None = None
        # A two-pass kernel's second-pass weights are normalized (exp(s_j - lse), or exp(s_j
        # - m) / l): each that may fall below T_e (or a quotient below the normal range) is
        # off by U_e absolute in the output (a review: fp16 compute, 8 keys at 0 and 200
        # at -7.5 with v = 1, weights of 6.8e-5 flushed to an output of 0, 10.7x outside)
        two_abs: Any = 0.0
        if flush:  # (one model at a time)
            thr = -precision.exp_exact_log() - 1
            # split-KV's combine: exp(lse_s - lse), lse - lse_s <= dist + 2 lnn + theta
            lnn2 = 0.0 if lse_m is None else 2 * lse_m.lnn + 2 * lse_m.Theta
            far = upper((1 + lam_d) * dm + g7 * smx, 4) + lnn2  # >= every term's reach
            low_den = torch.zeros_like(w_lo)
            low_num = torch.zeros_like(vis_va)
            # (a two-pass kernel's second-pass weights, exp(s_j - lse) or exp(s_j - m) / l,
            # lie up to lnn further down: below)
            lnn_a = upper(lnn + a + a_N, 2) if two else 0.0
            if bool((far + lnn_a > thr).any()):
                reach = torch.mul(dist_row, 1 + lam_d).add_(sig_all, alpha=g7)
                reach = blk.masked(reach.add_((1 + lam_d) * s), 0.0, inplace=True)
                n_low = (reach > thr).sum(0, dtype=torch.float64)  # [B, r, m]: a key's terms
                low_den, low_num = n_low.sum(-1), n_low @ va
                far = reach.amax((0, -1)).unsqueeze(-1) + lnn2
                # (a key's terms at most its weight, each within H K of its exact share,
                # and split-KV's numerator factor fN)
                low = n_low > 0
                n_ex = torch.addcmul(n_low, low, (R * n_t).reshape(-1, 1).to(n_low))
                if lse_m is not None and not lse_m.J:
                    # split-KV's combine shifts by the lse, up to lnn2 above the row's
                    # largest term: its exps (the split's weight and the lse's sum) fall
                    # below T_e for keys up to lnn2 nearer the top (a review: keys 7.7
                    # below it, flushed splits, 2.0x outside); pairwise merges' exps are
                    # charged apart (below)
                    comb = (reach.amax(0) + lnn2) > thr
                    n_ex = n_ex + (2 * n_t) * comb
                    low = low | comb
                    # and in the hull's slack: a weight flushed while its normalizer term
                    # is kept moves the output off the values' hull (a review: 1,000 keys
                    # 6.5 below 16 under ONE_PASS, fp16 compute, 2.1x outside the hull cap)
                    n_comb = (2 * n_t) * comb.to(torch.float64)
                    low_den, low_num = low_den + n_comb.sum(-1), low_num + n_comb @ va
                # (a term's factor on either side: a two-pass numerator's a_N in place of a)
                lf = lH0 + tH_max + torch.maximum(lK1, lK4) + e * dm + eN + eD
                lf = lf + torch.as_tensor(a_N - a).clamp_min(0.0)
                hk = torch.exp(upper(lf, 4))
                u_sub = fc.underflow * (1 + uc) ** n_t
                value = torch.where(low, p_up * upper(hk, 5), 0.0)
                if not bool(torch.isfinite(hk).all()):  # (split-KV's factors unbounded:
                    value.nan_to_num_(nan=math.inf)  # 0 x inf, the per-exp charge)
                b_low = flushed(n_ex, value, U_e, u_sub, w_lo)
                if two:  # (in the output's units)
                    n_low2 = (reach + lnn_a > thr).sum(0, dtype=torch.float64)
                    two_abs = upper(U_e * (n_low2 @ va), m + 4)
            resc = U_e * R * n_t * (far.squeeze(-1) > thr)  # [B, r]
        else:
            # (split-KV's one combine: two more exps per term, the split's weight and the
            # lse's sum)
            n_exps = n_t * (3 if lse is not None and not lse.J else 1)
            two_abs = upper(U_e * n_t * vis_va, 2) if two else 0.0
            low_den, low_num = n_exps * nvis, n_exps * vis_va
            resc = (U_e * R * n_t).expand(w_lo.shape)
        raw_den = upper(U_e * low_den + nvis * (resc + eta_w) + R * fa.underflow, 4)
        raw_den = raw_den.expand(w_lo.shape)
        raw_num = upper(
            U_e * low_num + (resc + eta_w).unsqueeze(-1) * vis_va
            + ((2 * nvis + 2 * R) * eta_p + eta_desc)[..., None],
            m + 4,
        )  # fmt: skip
        if b_low is None:
            b_den = raw_den / w_lo
            b_num = raw_num / w_lo[..., None]
        else:
            b_den = upper(b_low.sum(-1) + fixed_den / w_lo, m + 4)
            b_num = upper(b_low @ va + fixed_num / w_lo[..., None], m + 4)
        if lse_m is not None and lse_m.J:
            # a merge's exp of the lesser lse (the other's is exp(0) = 1) off by U_e where
            # below T_e: the merged state, a sum >= 1 and values within v_top, off by U_e
            # v_top in o and again through s; at most nvis - 1 merges of nonempty states
            # (an empty one's weight is exp(-inf) = 0), each scaled down by the later ones
            merges = (nvis - 1).clamp_min(0).to(torch.float64)[:, None]
            charge = 4 * U_e * (1 + 2 * k_e) * merges * v_top
            if flush:  # (one model at a time) where a gap may reach below T_e
                gap_r = upper(dm + 2 * lse_m.lnn + 2 * lse_m.Theta, 4)
                charge = charge * (gap_r > -precision.exp_exact_log() - 1)
            b_num = b_num + splits(upper(charge, 4))
        den_lo = den_lo - b_den
        # (dist0 + s)^2 p^2 u_c^2 (1 + a^2) + the rest
        var_key = Mix(basis, {"vk": 1.0, "v1": 2 * var_c * s})
        # a rescaling's error scales the partial sum of the deviations before it; their
        # arguments telescope to the largest distance
        nn = nvis[:, None].clamp_min(2)
        var_dev = (R3 * k_e**2 + ((1 + el.exp_arg) * uc * dm) ** 2) * (R3 > 0) * nn / (4 * (nn - 1))
        var_dev = var_dev + var_c * s * s
        n_terms = (nvis + R)[..., None]
        # the partial sums over the orders, or in sequence order where larger (data sorted
        # or trending along the sequence, a sink at its start)
        sq_n = torch.maximum(order_sq(nz.y, q_n, n_terms), seq_n)
        sq_d = torch.maximum(order_sq(torch.ones_like(p2_sum), p2_sum, n_terms), seq_d)
        var_sum = ua * ua * (sq_n + nz.y**2 * sq_d)
        var_row = var_scale + q_n * (ld.ul**2 + up * up + e_n * e_n) + var_sum
        lin_c = p_up_sum * C_lin
        coh_m = coh_desc
        if two:
            # each term's errors on both sides, independent: sigma^2 (v_j^2 + y^2) <=
            # sigma^2 (2 (v_j - y)^2 + 3 y^2); the first pass's rescalings scale partial
            # normalizers (<= 1) alone; the lse's roundings shared by every term (worst case)
            # (var_key leaves the wide shift's argument rounding, var_c s^2 per key, to
            # var_dev, which multiplies (v_j - y)^2 alone; a review: 1.22x outside the level)
            var_row = var_row + 3 * nz.y**2 * (var_key.agg("sum") + var_c * s * s * p2_sum)
            var_row = var_row + nz.y**2 * (
                (R3 * k_e**2 + ((1 + el.exp_arg) * uc * dm) ** 2) * (R3 > 0)
            )
            var_key = Mix(basis, {"vk": 2.0, "v1": 4 * var_c * s})
            var_dev = var_c * s * s  # (the numerator's pass: no rescaling)
            lin_c = _total(lin_a) + _total(lin_D)
            wa = Mix(basis, {"1": a + a_N})
            coh_m = coh_m + wa.agg(va) + y_abs * wa.agg("sum")
        if lse_m is not None:
            # first order: the factors' logs (log fN + log fD = 2 e dist + eN + eD); their
            # errors are shared by a split's keys (worst case: fully correlated, as the
            # square of their first-order sum), with theta's
            lin_c = lin_c + Mix(basis, {"1": 2 * e * s + eN + eD, "d": 2 * e}).agg("sum")
            wg = Mix(basis, {"1": (2 * e + b) * s + eN + eD + a, "d": 2 * e + b})
            coh_m = coh_m + wg.agg(va) + y_abs * wg.agg("sum")
        t = Terms(
            a=a_t,
            lin_a=lin_a,
            c=C_sum,
            lin_c=lin_c,
            mag=Mix(basis, {"1": 1.0}),
            den_lo=den_lo,
            b_num=b_num,
            b_den=b_den,
            var_key=var_key,
            var_row=var_row,
            var_dev=var_dev,
            coh=upper(coh_m, 4),
        )
        kap = kappa if lse_m is None else torch.maximum(kappa, splits(lse_m.kappa(kappa)))
        if two:  # the sums' ratio sum_j e_j / l within e^{+-c}: the output within c of the hull
            # (lH0 and k0 carry the normalizer's a: one side's upper factor over the
            # other's lower takes a + a_N)
            c2 = lH0 + 2 * tH_max + torch.maximum(lK1, lK4) - n_exp * l1m + log_sum + k0
            c2 = c2 - torch.minimum(lK2, lK3) - a + a_N
            kap = torch.maximum(kap, excess(upper(c2, 8), 8))
        hl = None
        if not all(wide_m):  # the running maximum's (top_w); not a wide shift's
            lo_v, hi_v, slack = hull(vr, va, kap, raw_num, raw_den, top_w2)
            if M > 1:
                slack = torch.where(w_mask[..., None], math.inf, slack)
            hl = (lo_v, hi_v, slack)
        sound, typical = quotient(nz, t, v_err, lam, hl, absorb=absorbable(nz.p, ua))
        if two:
            sound, typical = sound + two_abs, typical + two_abs
        coh = max(le.log_c(c) for c, _ in terms) if n_t > 1 else 0.0
        if coh > 0:
            # a mixture's log c_r errors: one per term, shared by every key, so coherent at
            # the probabilistic level (a key's weight moves by at most the largest; one
            # term's shift alone cancels in the quotient)
            shift = nz.p @ nz.v.abs() + y_abs * nz.p.sum(-1, keepdim=True)
            typical = torch.minimum(sound, typical + upper(coh * shift, 3))
        if lse_m is not None and lse_m.J:
            # merges of the sigmoid form (o_a - sigmoid(x) (o_a - o_b)): weights that sum to 1
            # exactly, off by c_sig sigmoid |o_a - o_b| each; sigmoid times a merge's weight
            # in the output is its b side's, and each split is in at most J merges' b sides,
            # so these sum to at most J c_sig times the width of the states' hull (past the
            # hull's cap: the output leaves the hull by as much)
            # (each merge may move the states off the hull by c_sig of its width: a width
            # at most e^{J c_sig} the values')
            # (sigmoid(-inf) = 0 exactly: a merge with an empty state moves nothing)
            grow = torch.exp(upper(lse_m.J_full * lse_m.c_sig, 2))
            width = (vr[1] - vr[0] + 2 * (kap * v_top)) * grow
            merged = splits(upper(lse_m.J_full * lse_m.c_sig * width, 6))
            sound, typical = sound + merged, typical + merged
        # the normalizer the division takes is at least w_lo in the kernel's units; under a
        # running maximum, at least its largest weight, top_w (a split's too, in its units,
        # and the merge, whose split of the maximum enters with its own; a review: 0.96
        # under e4m3 with a weights_scale e4m3 does not hold)
        d_lo = torch.where(w_mask, w_lo, torch.maximum(w_lo, top_w2))
        vanish = ~(den_lo > 0) & (w_mask | (top_w2 == 0))
        if two:  # (l may flush as compute takes it for its log: _log_input)
            vanish = vanish | ~torch.isfinite(torch.as_tensor(a)).squeeze(-1)
        if lse_m is not None:
            vanish = vanish | ((top_w == 0) & ~w_mask)
        split_vanish = None
        if lse_m is not None:
            finite = torch.isfinite(sound)
            absolute = splits(lse_m.absolute(v_top * (1 + kap), d_lo.unsqueeze(-1)))
            sound, typical = sound + absolute, typical + absolute
            # (a split's normalizer that may leave compute's range: named as the division's)
            split_vanish = finite & torch.isinf(absolute)
        # Intermediates that may overflow: the bound is inf where they reach. In the
        # kernel's units every weight is exp(<= a), a folded shift's rounding: at most
        # e^a (1 + k_e) per exp (a review: a folded log-attention kernel's e^0.35, a product
        # inf under a finite bound) (values as codes where scaled, weights times
        # weights_scale where cast)
        # (a wide shift's own: |W| may lie past the row's largest term exponent's binade)
        a_w = [
            (a_one if lse_m is None else a_split)
            if w is None
            else torch.maximum(a_one, folded_shift(w.abs() + stop[0].squeeze(-1), precision))
            for w in group
        ]
        a_up = (a_w[0] if M == 1 else torch.stack(a_w, 0)).unsqueeze(-1)
        if two:  # (the second pass's logits, each within sigma, against the first's maximum)
            a_up = a_up + 2 * stop[0]
        cap = torch.exp(h0 + a_up) * s_hi * w_times  # [B, r, 1]
        # the sums the division takes: each weight at most n_t in the kernel's units, and
        # with one division (sums as values) at most e_j e^{2 sigma} n_t (its shift >= its
        # largest computed term exponent, the exact log-weights' largest M at most log n_t
        # above the terms'); split-KV divides each split in its own units, where its
        # weights reach n_t each (a review: a split of 70,000 near-equal keys in fp16)
        d_top = nvis[:, None].to(torch.float64) * n_t * cap
        n_top = cap * (vis_va * code_v) * n_t
        if one_div and nz.norm is not None:
            d_top = torch.minimum(
                upper(nz.norm * torch.exp(2 * stop.amax(0)) * n_t, 4) * cap, d_top
            )
            n_top = d_top * (v_top * code_v)
        operands = (n_top, d_top, d_lo.unsqueeze(-1))
        if two and precision.sums == "log":
            # sum_j e^{s_j - lse} v_j has no division: its sum is taken into compute (a
            # review: a division's k_div |y| charged, and its operands' overflow named)
            sound, typical, last = finish(sound, typical, y_abs, precision, ulps=0.0)
        else:
            sound, typical, last = finish(sound, typical, y_abs, precision, operands=operands)
        if split_vanish is not None and bool(split_vanish.any()):
            name = f"division N / D in {fc.name}"
            last[name] = last.get(name, torch.zeros_like(split_vanish)) | split_vanish
        prod_top, sum_top = cap * (v_top * code_v), cap * (vis_va * code_v)
        if two and precision.sums == "log":
            # the second pass's weights e^{s - lse}: its products and sums are the first
            # pass's over l e^delta >= d_lo (they were checked in the first pass's units,
            # so a row of 4,096 values of 20 was named in fp16 where its sum is 20). Under
            # a wide shift the first pass's bounds take a weight up to about 1 while d_lo
            # carries e^-gap (a review: rows 5 below the sequence's maximum named where
            # their products reach 512): there each weight is at most e^a its first-pass
            # bound (the lse's error; its shift's distance cancels in s - lse)
            dl, ea = d_lo.unsqueeze(-1), torch.exp(torch.as_tensor(a))
            wide = w_mask.view(M, 1, 1, 1) if M > 1 else w_mask
            prod_top = torch.where(wide, prod_top * ea, prod_top / dl)
            sum_top = torch.where(wide, sum_top * ea, torch.minimum(sum_top, n_top) / dl)
            # and, in either model, the quotient's own: the weights are N^_j / D^, each
            # key's |N^_j| / W within (p_j + a_j) |v_j| (and b_num), D^ / W >= den_lo (256
            # values near 4000 in fp16 accumulate: the bounds above named 241 of 256 rows
            # where every sum is about 4000)
            den = den_lo.unsqueeze(-1)
            own = (_load(t.a, t.mag, va) + t.b_num) / den.clamp_min(1e-300) + two_abs
            own = upper(own, 6) * (code_v * w_times)
            own = torch.where(den > 0, own, math.inf)
            prod_top = torch.minimum(upper(prod_top, 2), own)
            sum_top = torch.minimum(upper(sum_top, 2), own)
        reasons = {
            **shared_reasons,
            # (a weight times a value: a product, in compute or accumulate)
            f"products w v in {p_name}": prod_top >= acc_lim,
            f"numerator sum w v in {fa.name}": sum_top >= fa.overflow(),
            f"normalizer sum in {fa.name}": full(nvis * cap.squeeze(-1) >= fa.overflow()),
            # (one division: where the model's floor fails and no largest weight holds
            # the sum up; a split whose largest weight may flush divides 0 by 0)
            "normalizer may vanish": full(vanish),
            **last,
        }
        if lse_m is not None and lse_m.J:  # (merges whose errors feed on themselves: Theta inf)
            reasons["split merges in compute"] = full(
                (lse_m.c_T_row >= 0.5).squeeze(-1).expand(w_lo.shape)
            )
            # the split outputs and merged states, held in their formats: within the
            # values' hull and its slack; past a format's max they overflow or saturate (a
            # review: fp16 split outputs of +-99840 gave NaN under a finite bound, e4m3
            # states saturated at 448 7.8x outside)
            o_top = upper(v_top * (1 + 2 * kap), 4)
            for what, f in (("split outputs", lse_m.fo), ("merged states", lse_m.fm)):
                reasons[f"{what} in {f.name}"] = o_top > f.max
        if fw is not None:
            # the weights' cast: a key's weight, in the kernel's units, at most w_top (and
            # n_t, a mixture's terms each up to 1 after the shift; a review: e4m3 saturated
            # weights of 3, 3.0x outside) times cap; a format with inf overflows past its
            # threshold (e5m2 with weights_scale 57344 and a loose exp); one that saturates
            # loses mass only where a weight may exceed its max, exact and computed alike
            # one shift by the row's maximum (a wide one's model has no splits)
            one = (R == 0) & (w_mask | (lse_m is None))
            w_top = torch.where(one, w_row.squeeze(-1), w_key.squeeze(-1))
            lim, c_w = fw.overflow(precision.rounding), precision.weights_scale
            if math.isinf(lim):
                over = (n_t * c_w > fw.max) & (w_top * c_w > fw.max)
            else:  # (the exps' arguments, relative error lam_d: e^{a(1 - lam_d)} <= e^a + lam_d)
                w_top = (w_top + n_t * lam_d.squeeze(-1)).clamp_max(n_t)
                over = w_top * cap.squeeze(-1) >= lim
            reasons[f"weights cast to {fw.name}"] = full(over.expand(w_lo.shape))
        out = unbounded(sound, typical, reasons)
        if M == 1:
            return out
        return {k: v.amax(0) if v.is_floating_point() else v.any(0) for k, v in out.items()}

    # (model does not call itself: a closure that refers to itself is a reference cycle,
    # which would keep every block's [rows, keys] temporaries until the garbage collector)
    out = model(shifts) if len(shifts) > 1 else None
    if out is None:
        outs = [model([shift]) for shift in shifts]
        out = functools.reduce(larger, [o for o in outs if o is not None])
    return out
