"""Floating-point formats, where a computation rounds, and exact emulation of rounding.

:class:`Format` describes a binary floating-point format (fp64, fp32, tf32, fp16, bf16 and
the two OCP FP8 formats e4m3 and e5m2); :class:`Precision` says in which format a kernel
stores, computes and accumulates; :func:`round_to` rounds a float64 tensor to a format
exactly (one rounding, as the hardware does), so low-precision behaviour can be simulated
bit for bit on the CPU.

Semantics of :func:`round_to`, per format (they follow torch's casts, see docs/formats.md):

- ``"rne"`` (round to nearest, ties to even). Overflow: a value whose rounding with an
  unbounded exponent exceeds ``max`` becomes ``+-inf``, except in e4m3 (``float8_e4m3fn``,
  which has no infinity) where it saturates to ``+-max`` as torch's cast does (``+-inf``
  inputs too).
- ``"rtz"`` (round toward zero, i.e. truncation of the significand: the Triton
  interpreter's fp32->bf16 conversion). Overflow saturates to ``+-max``; ``+-inf`` stays.
- Subnormals are rounded on the fixed grid of spacing ``min_subnormal``; ``-0.0`` keeps its
  sign; NaN stays NaN (a bit-truncating conversion may turn a NaN whose payload lies in the
  dropped bits into inf; we keep NaN).

torch's own casts *from float64* to fp16/bf16/fp8 go through float32 (two roundings);
:func:`round_to` rounds once, so it matches ``x.float().to(dtype)`` bit for bit and the
direct cast ``x.to(dtype)`` only when ``x`` is a float32 value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from attnprec._formats import FORMAT_SPECS
from attnprec._validate import check_bool, check_float, check_int, check_real

__all__ = [
    "Format",
    "Precision",
    "Elementary",
    "ELEMENTARY",
    "ONE_PASS",
    "round_to",
    "scale_factors",
    "quantize",
    "fp8_weights_scale",
    "FORMATS",
    "ROUNDINGS",
]

#: The rounding modes :func:`round_to` emulates.
ROUNDINGS = ("rne", "rtz")
#: float32's least exponent: results below ``2**_F32_EMIN`` are subnormal in
#: float32 too, which flush-to-zero arithmetic reads as 0 (:attr:`Format.underflow`).
_F32_EMIN = -126


def _check_rounding(rounding: object) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding: expected one of {ROUNDINGS}, got {rounding!r}")
    return str(rounding)


@dataclass(frozen=True)
class Format:
    """A binary floating-point format.

    Attributes
    ----------
    name : str
        ``"fp64" "fp32" "tf32" "fp16" "bf16" "e4m3" "e5m2"``.
    precision : int
        Significand bits p, the implicit leading bit included.
    emin, emax : int
        Exponents of the smallest normal (``2**emin``) and of the largest binade.
    max : float
        Largest finite value (448 for e4m3, whose top significand at ``emax`` is NaN).
    has_inf : bool
        Whether the format has infinities (e4m3 does not).
    torch_dtype : torch.dtype or None
        The torch dtype that stores this format (None for tf32, a compute-only format).

    Notes
    -----
    ``u = 2**-p`` is the unit roundoff of round-to-nearest: for x in the normal range,
    ``|fl(x) - x| <= u |x|``; :meth:`rounding_error` gives the bound over the whole range.
    """

    name: str
    precision: int
    emin: int
    emax: int
    max: float
    has_inf: bool = True
    torch_dtype: torch.dtype | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # Every bound trusts these numbers: a user-built format must describe one.
        if not isinstance(self.name, str):
            raise TypeError(f"name: expected a str, got {type(self.name).__name__}")
        check_int("precision", self.precision, 2)
        # (emin = 0: the OCP MX FP4 and FP6 formats, whose least normal is 1)
        if check_int("emin", self.emin, -(2**31)) > 0:
            raise ValueError(f"emin: expected an exponent <= 0, got {self.emin}")
        emax = check_int("emax", self.emax, 1)
        object.__setattr__(self, "has_inf", check_bool("has_inf", self.has_inf))
        if self.torch_dtype is not None and not isinstance(self.torch_dtype, torch.dtype):
            raise TypeError(
                f"torch_dtype: expected a torch.dtype or None, got {self.torch_dtype!r}"
            )
        top = check_real("max", self.max)  # NumPy's float16 max as a float (its inf overflow)
        if not math.isfinite(top) or top <= 0 or math.frexp(top)[1] != emax + 1:
            raise ValueError(f"max: expected a number in [2^emax, 2^(emax + 1)), got {top!r}")
        object.__setattr__(self, "max", top)

    @property
    def u(self) -> float:
        """Unit roundoff of round-to-nearest, ``2**-precision``."""
        return 2.0**-self.precision

    @property
    def min_normal(self) -> float:
        """Smallest positive normal number, ``2**emin``."""
        return 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        """Smallest positive subnormal number, ``2**(emin - precision + 1)``."""
        return 2.0 ** (self.emin - self.precision + 1)

    @property
    def underflow(self) -> float:
        """Absolute error of one result that underflows in this format: ``min_normal`` for
        formats whose subnormals lie below float32's normal range (fp32, fp64, tf32 and
        bf16), which GPUs may flush to zero (``-ftz``; bf16 arithmetic is float32's rounded
        to bf16, so a flush reaches its subnormals too: a review's bf16 kernel built so was
        3.3x outside when they were taken as kept); ``min_subnormal`` for the others
        (fp16, FP8), whose subnormals are normal float32 numbers and whose arithmetic and
        conversions keep them (rounded to nearest, or by an approximate instruction within
        one subnormal spacing)."""
        return self.min_normal if self.emin <= _F32_EMIN else self.min_subnormal

    @classmethod
    def of(cls, fmt: Any) -> Format:
        """The format named by ``fmt``: a name, a :class:`Format` or a torch dtype.

        Raises
        ------
        ValueError
            If ``fmt`` names no known format.
        TypeError
            If ``fmt`` is of another type.
        """
        if isinstance(fmt, Format):
            return fmt
        if isinstance(fmt, str):
            if fmt not in FORMATS:
                raise ValueError(f"fmt: expected one of {tuple(FORMATS)}, got {fmt!r}")
            return FORMATS[fmt]
        if isinstance(fmt, torch.dtype):
            for f in FORMATS.values():
                if f.torch_dtype == fmt:
                    return f
            raise ValueError(f"fmt: no format for torch dtype {fmt}")
        raise TypeError(f"fmt: expected a format name, Format or torch.dtype, got {fmt!r}")

    def overflow(self, rounding: str = "rne") -> float:
        """The least magnitude that rounds to inf: ``max + ulp(max) / 2`` for "rne" (the
        tie rounds to even, away from max); ``inf`` where the rounding saturates at
        ``max`` instead ("rtz", and e4m3, which has no infinity)."""
        if _check_rounding(rounding) == "rtz" or not self.has_inf:
            return math.inf
        return self.max + 2.0 ** (self.emax - self.precision)

    def holds(self, other: Format) -> bool:
        """Whether every value of ``other`` is a value of this format (taking one into it
        rounds nothing): at least its precision and its exponent range."""
        return (
            self.precision >= other.precision
            and self.emax >= other.emax
            and self.emin <= other.emin
        )

    def rounding_units(self, rounding: str = "rne") -> tuple[float, float]:
        """``(u_r, eta_r)`` of one rounding below the overflow threshold, ``|fl(x) - x| <=
        u_r |x| + eta_r``: ``(u, min_subnormal / 2)`` for "rne", ``(2u, min_subnormal)``
        for "rtz" (a truncation may lose up to a whole ulp)."""
        if _check_rounding(rounding) == "rne":
            return self.u, self.min_subnormal / 2
        return 2 * self.u, self.min_subnormal

    def rounding_error(self, abs_x: Any, rounding: str = "rne") -> Any:
        """Bound on ``|fl(x) - x|`` for one rounding of a value of magnitude at most
        ``abs_x``.

        Returns ``u_r * 2^floor(log2 abs_x) + eta_r`` with ``u_r = u, eta_r = min_subnormal /
        2`` for ``"rne"`` and ``u_r = 2u, eta_r = min_subnormal`` for ``"rtz"`` (a float, or
        a tensor when ``abs_x`` is one): half an ulp (a whole one for "rtz") of the binade
        of ``abs_x``, which holds every value of at most ``abs_x`` (the binade of ``x`` is at
        most that one), up to 2x below ``u_r * abs_x`` (a review: defects that moved
        outputs by less than the slack of ``u_r * abs_x`` passed every element). Where the
        rounding saturates (:meth:`overflow` is inf) a value beyond ``max`` is stored as
        ``max``, off by ``abs_x - max``, which is added; where it overflows to inf (from
        :meth:`overflow` on) the caller must detect it.
        """
        u_r, eta_r = self.rounding_units(rounding)
        err = u_r * _binade(abs_x) + eta_r
        if math.isinf(self.overflow(rounding)):
            if isinstance(abs_x, torch.Tensor):
                return torch.maximum(torch.as_tensor(err), abs_x - self.max)
            return max(err, abs_x - self.max)
        return err


def _binade(a: Any) -> Any:
    """``2^floor(log2 a)`` for ``a > 0`` (exact: a power of two), ``a`` itself for 0, inf
    and NaN; a float or a float64 tensor."""
    if isinstance(a, torch.Tensor):
        m, e = torch.frexp(a)
        fin = torch.isfinite(a) & (a > 0)
        return torch.where(fin, torch.ldexp(torch.full_like(a, 0.5), e), a)
    if not (math.isfinite(a) and a > 0):
        return a
    return math.ldexp(0.5, math.frexp(a)[1])


def _fmt(name: str) -> Format:
    p, emin, emax, mx, has_inf, dtype = FORMAT_SPECS[name]
    top = (2.0 - 2.0 ** (1 - p)) * 2.0**emax if mx is None else mx
    tdt = None if dtype is None else getattr(torch, dtype, None)
    return Format(name, p, emin, emax, top, has_inf=has_inf, torch_dtype=tdt)


#: The known formats by name.
FORMATS: dict[str, Format] = {name: _fmt(name) for name in FORMAT_SPECS}


@dataclass(frozen=True)
class Elementary:
    """Accuracy model of exp, log and division: part of a :class:`Precision`.

    Attributes
    ----------
    exp, log, div : float
        Worst error in ulps of the result (``|err| <= k ulp(f) <= 2 k u |f|`` for normal
        results, u the unit roundoff of the format the operation runs in). A correctly
        rounded operation is 0.5.
        These count in ulps of float32 when the compute format is float32 or narrower.
        ``exp(0) = 1`` exactly, as every implementation gives (its argument reduction
        leaves 0; ``ex2.approx`` is exact at integers): a shift by the row's computed
        maximum gives its term the weight 1, and a running maximum that does not move
        rescales by exactly 1, over the key blocks a causal row does not see too (an exp
        4 ulp off at 0 put such a row 3.1x outside, 63 blocks past it).
    narrow : float
        Ulps of a compute format narrower than float32 (fp16, bf16, tf32, fp8) that exp,
        log and division add on top: evaluated in float32 and rounded (0.5), or as
        approximate half-precision instructions (``ex2.approx.f16``: 2^-9.9 relative,
        1.1 ulp of fp16).
    exp_arg : float
        Roundings, in units of u relative to the argument, done inside exp before the
        exponential proper; it adds a relative error ``exp(exp_arg u |x|) - 1``. The
        default 1.5 covers ``exp(x) = exp2(x * c)`` with ``c = log2 e`` rounded to the
        format the product runs in (0.224 u in float32, 0.443 u in fp16, 0.464 u in bf16)
        and the product rounded (u): CUDA's ``__expf`` and Triton's ``tl.exp``. (It was 1,
        the product alone: 1.18x under a correctly rounded ``exp2`` of the float32 product,
        a review.)
    log_abs : float
        Absolute error floor of log, in units of u of float32 (of compute when wider; a
        narrower compute adds ``narrow`` of its ulps: :meth:`Precision.log_floor`):
        ``lg2.approx`` is accurate to an absolute 2^-22.6 near 1, where the ulp of the
        result vanishes.
    exp_flush : float
        An exp whose result is below the normal range may return 0, or any value between 0
        and its exact result, for results up to ``exp_flush`` times the compute format's
        smallest normal number: fast exps flush by their argument (PyTorch's CPU fast exp
        returns 0 below -87, where e^x is still 1.41 min_normal of float32). Below the
        normal range an exp is otherwise within one subnormal spacing of its result (not
        covered: an exp that returns more, e.g. one that clamps its argument to the normal
        range and returns min_normal for every result below it).
    tanh : float
        Worst error of tanh (logit soft-capping) in ulps of the result. The default covers
        ``tanh.approx.f32`` (relative 2^-10.987 on sm_75 and later, about 2064 ulp of
        float32), the fast tanh that soft-capping kernels use; libdevice's and glibc's
        tanh are within 2 ulp (``"libm"``). Not covered: a tanh composed as ``2 sigmoid(2x)
        - 1``, whose absolute error near 0 (about 2^-24) is thousands of ulps of a small
        result (a review: 7.9x outside the bound at a cap of 10,000).
    logsum : float
        A log-space sum (``logaddexp``, a signed log-sum-exp) whose result is its exact
        log rounded within ``logsum`` ulps (``attnprec.lognum``'s float64 sums rounded
        once to compute: 0.5, declare 1 for margin). 0 (default): not declared, each
        log-add is composed of a subtraction, exp, log and an addition in compute. Read
        by the log-space models (``Precision.sums``).
    expm1 : {"accurate", "exp_minus_one"}
        How zero-order hold's ``expm1(dt A)`` is formed: ``"accurate"`` (default), a library
        ``expm1`` or the kernels' split polynomial
        (:func:`~attnprec.analysis.bounds.ssm.expm1_error`); ``"exp_minus_one"``,
        ``exp(dt A) - 1`` by subtraction, as the S4D reference code writes ``(exp(dt A) -
        1) / A``, whose relative error grows as ``k_e / |dt A|`` for small ``|dt A|``.

    Results below the normal range are covered separately: every bound adds, per exp that
    may fall there, the least of its threshold ``max(exp_flush, 1) min_normal`` and what a
    flush loses (the term's own weight, where the bound has it per term) plus a subnormal
    spacing (:func:`attnprec.analysis.bounds.quotient.flushed`).
    """

    exp: float = 4.0
    log: float = 4.0
    div: float = 2.0
    exp_arg: float = 1.5
    log_abs: float = 4.0
    narrow: float = 1.1
    exp_flush: float = 2.0
    tanh: float = 2064.0
    logsum: float = 0.0
    expm1: str = "accurate"

    def __post_init__(self) -> None:
        names = ("exp", "log", "div", "exp_arg", "log_abs", "narrow", "exp_flush", "tanh")
        for name in (*names, "logsum"):
            x = getattr(self, name)
            if isinstance(x, bool) or not isinstance(x, int | float) or not (0 <= x < 2**20):
                raise ValueError(f"{name}: expected a number of ulps in [0, 2^20), got {x!r}")
            object.__setattr__(self, name, float(x))
        if self.expm1 not in ("accurate", "exp_minus_one"):
            raise ValueError(f"expm1: expected 'accurate' or 'exp_minus_one', got {self.expm1!r}")


#: Named accuracy models. ``"default"``: what a kernel may see on a GPU or under the Triton
#: interpreter (``ex2.approx`` / ``lg2.approx`` at 2 ulp after the argument product, NumPy's
#: SIMD float32 exp and log below 4 ulp, ``div.full.f32`` at 2 ulp); ``"libm"``: correctly
#: rounded division and exp/log within 1 ulp (glibc, SLEEF u10: torch's CPU kernels).
ELEMENTARY: dict[str, Elementary] = {
    "default": Elementary(),
    "libm": Elementary(exp=1.0, log=1.0, div=0.5, exp_arg=0.0, log_abs=0.0, narrow=0.5, tanh=2.0),
}

#: ``Precision(block=ONE_PASS)``: the whole row is one block, i.e. no online rescaling (the
#: maximum is known before any exponential) and sums in any order.
ONE_PASS = 2**62
_U32 = 2.0**-24


@dataclass(frozen=True)
class Precision:
    """Where a computation rounds, in what order it may sum, and how accurate its exp,
    log and division are: the declaration every bound holds for.

    Parameters
    ----------
    storage : format-like
        Format of the inputs as given and of the output store.
    compute : format-like, default "fp32"
        Format of elementwise work (exp, features, divisions: a division takes its
        numerator and normalizer into compute).
    accumulate : format-like, default "fp32"
        Format of sums, wherever a sum is held: a running state or sum kept in another
        format between steps or chunks (a chunk state stored as ``S.to(fp16)``) is a sum
        in that format, declared here (a review: an fp16-compute linear-attention kernel
        rounding its fp32 state to fp16 at each chunk boundary, declared with fp32 sums,
        1.15x outside; declared ``accumulate="fp16"``, 0.017), and so is a running sum
        rescaled in compute (``acc.to(bf16) * alpha``: the online rescaling is a product of
        the sums, in their format). A copy of a state taken into compute for one product
        with a term (``tl.dot(q, S.to(fp16))``) is that product's rounding, a conversion
        (``rounding``: :meth:`product_u`). Products of
        terms (weights and values, features and states) round in compute or in
        accumulate (a kernel may form them in either; the bounds cover both: the coarser
        rounding, the smaller range, :meth:`products_overflow`).
    rounding : {"rne", "rtz"}, default "rne"
        Rounding of every conversion to a narrower format: the inputs to ``storage``
        (:meth:`stored`), their loads into a narrower compute, the weights' cast
        (``weights``), a state's copy into compute for a product (:meth:`product_u`) and
        the output store. "rtz"
        models the Triton interpreter's float32->bfloat16 conversion, which truncates.
        Arithmetic in ``compute`` and ``accumulate`` rounds to nearest even in either
        case (a kernel that emulates bf16 arithmetic by converting each result under the
        interpreter is not covered), and so does a constant (the scale, a coefficient,
        log2(e)) taken from a Python float into compute, as PyTorch and Triton's
        compile-time constants are: a kernel that truncates a constant is not covered.
    block : int, optional
        Keys per block of the evaluation schedule, the blocks starting at key 0 (the key
        tiles of FlashAttention's and Triton's kernels; where a window or a key mask keeps
        a row's keys, at any alignment): each block is summed in any order, the
        block sums are combined with the running sum in any order (``block_sums``), and
        running maxima (online softmax, state rescaling) change at most once per block;
        exponentials are shifted by a maximum of the keys a row sees (of the terms the
        shifted sum holds: per channel in log attention, per split in split-KV). ``None`` (the
        default): any schedule, i.e. up to one rescaling per key, any summation order, FMA
        or not, or one shift by the maximum over every key of the sequence (future keys of
        a causal row included; not the keys a ``key_mask`` drops, which a kernel masks
        before its maxima: padding's logits are not data) in a kernel that divides once
        (split-KV's splits shift by their own keys' maxima: ``sums``). :data:`ONE_PASS`: no online
        rescaling at all (the maximum is found first). For the decayed recurrences (gated,
        the state-space methods) ``None`` covers the recurrence and any associative scan
        (one decay per step); a chunked kernel, whose decays are exps of span sums of the
        log-gates, declares its chunk as ``block`` (decays as differences of prefix sums,
        ``exp(G_t - G_s)``, over the sequence or inside a chunk, are not covered: their
        error grows with ``|G_t|``).

        A weight that is itself a sum (log attention's channels, the features of taylor,
        polynomial, linear and FAVOR+, the key channels of gated attention and of the
        state-space methods that reduce to it) is summed nested with the keys: over the
        features per key, or over the keys per feature, then the other, each in any order
        (a term passes at most ``n - 1`` key and ``F - 1`` feature additions, or log-adds).
        One flat sum over every (key, feature) pair is not covered: a plain fp32 loop
        adding each pair to one accumulator is 12-30x outside the bound of linear
        attention, where nested sums are at 0.02-0.06 of it, 1.6-18x outside gated's, and
        is flagged (docs/bounds/attention.md).
    elementary : Elementary or str, default "default"
        The exp/log/division accuracy model (an :class:`Elementary` or a name of
        :data:`ELEMENTARY`).
    scaling : {None, "tensor"} or int, default None
        Scale factors of the inputs (the FP8 recipe, docs/fp8.md): None, the inputs are
        rounded to ``storage`` as given; ``"tensor"``, one float32 scale ``s`` per tensor;
        an integer B, one scale per block of B rows (tokens) of each head. The kernel holds
        ``round(x / s)`` in ``storage`` and uses ``round(x / s) * s``
        (:func:`scale_factors`, :func:`quantize`, :meth:`stored`); the descales are
        applied to the logits and to the value sums, each a product in ``compute``.
    weights : format-like, optional
        The format the weights (probabilities) are cast to before the weights @ v product
        (FP8 attention casts P to e4m3), multiplied by ``weights_scale`` before the cast and
        divided by it after; the normalizer may sum them before or after the cast. None:
        no cast (the weights stay in ``compute``). This is the one way to declare a cast
        of the weights alone; ``compute=storage`` declares every elementwise operation in
        the narrow format.
    weights_scale : float, default 1
        The constant the weights (at most 1 after the shift) are multiplied by before the
        cast: ``weights_scale <= weights.max``, and at least the smallest normal number of
        ``weights`` and of ``compute`` (the FP8 recipe maps 1 to a power of two,
        :func:`fp8_weights_scale`).
    output : format-like, optional
        Format of the output store (FP8 kernels store bf16); None: ``storage``.
    sums : {None, "linear", "log"}, default None
        How the kernel holds its partial sums: ``"linear"``, as values (exp, then sums in
        ``accumulate``, one division; each term's exp and rescalings computed once, for
        both the numerator and the normalizer; a kernel that recomputes them in a second
        pass declares ``passes=2``); ``"log"``, as
        logs rounded to ``compute``, whose
        rounding scales a sum by up to ``e^{u |log|sum||}`` (log attention: Heinsen's
        signed log-space sums, a recurrent state of logs, ``logaddexp`` in compute;
        softmax and the exact semirings: split-KV, each split normalized on its own,
        shifted by the largest of its own terms' exponents over the keys the row sees
        (softmax: logits; a semiring: ``lam_r s + log c_r``; a split shifted by a maximum
        over other keys, the row's or the sequence's, is not covered: 3.7x outside,
        docs/bounds/attention.md, "Split-KV softmax"), its log-sum-exp rounded once, and
        the splits combined at once, ``sum_s exp(lse_s - lse) o_s``
        with one maximum, one sum and one log, the split outputs ``o_s`` kept in compute,
        as FlashAttention's combine; or merged two at a time as ``merges`` declares, which
        also charges each split output's rounding to the output format: a combine of
        outputs so rounded (one attention call per split, xformers' ``merge_attentions``)
        declares ``merges=1``, 2.45x outside the default bound, 0.50 of this one, a review);
        None, either form the method's model covers
        (the bound covers both; every other method: ``"linear"``, its only modelled form,
        so ``"log"`` is an error there).
    block_sums : {"any", "separate"}, default "any"
        With an integer ``block``: how a block's sum meets the running sum. ``"any"``: in
        any way, the running sum possibly one more term of the block's sum (a dot that
        accumulates into it, ``acc = tl.dot(p, v, acc)`` and Triton's rewrite of ``acc +
        tl.dot(p, v)`` into it, an FMA chain), so a term passes up to ``n - 1`` additions
        as with no blocks. ``"separate"``: each block is summed on its own (in any order)
        and then added, or summed with the running sum in one rounding (a float64 log-sum
        rounded once): depth ``(B - 1) + 2 ceil(n / B) + 2``. A running sum fused into the
        block sums of 64 keys at n = 1024 is 5.4x outside ``"separate"``'s bound
        (``test_fused_block_accumulation``). Gated attention and the state-space models:
        a chunk's sum formed on its own, then added to the carried state (their key sums'
        depth, the same or ``n``, the lesser).
    passes : {1, 2}, default 1
        Softmax and the exact semirings: 2, a two-pass kernel. A first pass over the keys
        forms the normalizer, an online sum ``l`` under its running maximum ``m`` (in
        ``accumulate``, its rescalings as ``block`` allows); a second recomputes each
        term's logit and exp against it and sums in any order: with the normalizer as a
        value (``sums="linear"``), ``sum_j exp(s_j - m) v_j / l`` or ``sum_j (exp(s_j - m)
        / l) v_j``; as its log (``sums="log"``), ``sum_j exp(s_j - lse) v_j`` with ``lse =
        m + log l`` rounded in compute, whose rounding ``u |lse|`` scales every weight (in
        16-bit compute 1.1-1.9x the value form's bound at the median of a sweep, 2.7x at
        most); ``sums=None``, either. With ``block=None`` the first pass may also shift by
        the sequence's maximum, future keys included, in either form. Each
        term's exp, its logit and the first pass's rescalings then reach one sum only, so
        their errors no longer cancel in the quotient: they scale ``|y|``, not ``|v_j -
        y|`` (docs/bounds/attention.md, "Two-pass softmax"; a stair of logits that moves
        the running maximum at every key, bf16 compute, values near 1000: 1.30x outside
        the one-pass bound). 1: the exps are computed once and feed both sums (online
        softmax, FlashAttention). Not with ``merges`` (split-KV's splits are one pass each).
    merges : int, optional
        Split-KV softmax and the exact semirings with partial sums as logs (``sums`` "log"
        or None): the most pairwise merges the state of a split passes, each merge of two
        states ``(o_a, lse_a)``, ``(o_b, lse_b)`` in compute rounding a new lse, in either
        form: FlashInfer's ``merge_state`` and vLLM's ``merge_attn_states`` (``m = max``,
        ``w = exp(lse - m)`` each, ``o = (w_a o_a + w_b o_b) / (w_a + w_b)``, ``lse = m +
        log(w_a + w_b)``), or the sigmoid form of PyTorch's context parallel and ring flash
        attention (``o = o_a - sigmoid(lse_b - lse_a) (o_a - o_b)``, ``lse = lse_a -
        logsigmoid(lse_a - lse_b)``). A chain of S splits (a running state merged with each
        next split, ring attention over S devices): S - 1; a balanced tree: ``ceil(log2
        S)``. Every merge adds ``u |lse|`` to the exponent error of each split merged before
        (``test_split_kv_merges``: a chain of 32 splits with logits near 1024 is 2.3x
        outside the one combine's bound). None (the default): the splits combined at once.
        With merges, each split's output is taken as an attention call returns it, rounded
        once to the output format, and each merged state's output is held in
        ``merge_format`` (its lse in the compute format, as both merges keep it in float32).
    merge_format : format-like, optional
        With ``merges``: the format each merged output is held in. None (the default): the
        output format, as FlashInfer's ``merge_state`` and vLLM's ``merge_attn_states`` hold
        their states in the model's dtype (two splits of two keys whose outputs round to
        bf16 before one merge are 160x outside a bound that keeps them in fp32); "fp32"
        for kernels that merge in float32 (ring flash attention, PyTorch's context
        parallel), a tighter bound.
    constants : {"any", "folded"}, default "any"
        Where a kernel multiplies by its constant factors, the scale and the coefficients
        of a feature map (taylor, polynomial). ``"any"``: on either operand, on their
        product, or split over both as roots, each rounded to compute: on each side, every
        entry times at most one constant (a root of the scale, or of the scale and the
        coefficient together) and the product of the entries times one (PyTorch's math
        SDPA multiplies q and k by ``sqrt(scale)`` each; Based splits ``sqrt(c_p)`` and
        ``sqrt(scale)`` over the query's and the key's features); two constants applied
        apart to each entry are outside the rounding count (the overflow checks take them).
        ``"folded"``: each constant applied once, on one side or on the product (the scale
        on q, on k or on the dot; the coefficients folded into the query's or the key's
        features, as this package's kernels do), a tighter bound: up to 2.2x for taylor's
        score form with fp16 compute at d = 64, 1.6x for its features, 1.3-1.4x for softmax
        with bf16 compute at d = 64 and 128, within 1% where compute is fp32.

    Format-like arguments (names, Formats, torch dtypes) are stored as :class:`Format`.
    Every bound holds for every evaluation order this declaration allows
    (:meth:`describe` says which).
    """

    storage: Format
    compute: Format = FORMATS["fp32"]
    accumulate: Format = FORMATS["fp32"]
    rounding: str = "rne"
    block: int | None = None
    elementary: Elementary = ELEMENTARY["default"]
    scaling: str | int | None = None
    weights: Format | None = None
    weights_scale: float = 1.0
    output: Format | None = None
    sums: str | None = None
    block_sums: str = "any"
    merges: int | None = None
    merge_format: Format | None = None
    constants: str = "any"
    passes: int = 1

    def __post_init__(self) -> None:
        names: tuple[str, ...] = ("storage", "compute", "accumulate")
        names += tuple(
            n for n in ("weights", "output", "merge_format") if getattr(self, n) is not None
        )
        for name in names:
            try:
                f = Format.of(getattr(self, name))
            except (TypeError, ValueError) as e:
                raise type(e)(str(e).replace("fmt:", f"{name}:", 1)) from None
            object.__setattr__(self, name, f)
            # tf32 rounds the operands of a product inside the tensor core (cvt.rna, ties
            # away): nothing holds it, and round_to's ties to even is not that conversion
            if name not in ("compute", "accumulate") and f.torch_dtype is None:
                raise ValueError(
                    f"{name}: {f.name} is a compute format (the operands of tensor-core "
                    f"products); no tensor is stored in it: declare {name} fp32 and "
                    f"compute={f.name!r}"
                )
        _check_rounding(self.rounding)
        b = self.block
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"block: expected a positive integer or None, got {b!r}")
        el = self.elementary
        if isinstance(el, str):
            if el not in ELEMENTARY:
                raise ValueError(f"elementary: expected one of {tuple(ELEMENTARY)}, got {el!r}")
            object.__setattr__(self, "elementary", ELEMENTARY[el])
        elif not isinstance(el, Elementary):
            raise TypeError(f"elementary: expected an Elementary or a name, got {el!r}")
        _check_scaling(self.scaling)
        if self.sums not in (None, "linear", "log"):
            raise ValueError(f"sums: expected None, 'linear' or 'log', got {self.sums!r}")
        if self.constants not in ("any", "folded"):
            raise ValueError(f"constants: expected 'any' or 'folded', got {self.constants!r}")
        if self.block_sums not in ("any", "separate"):
            raise ValueError(f"block_sums: expected 'any' or 'separate', got {self.block_sums!r}")
        if self.block_sums == "separate" and (b is None or b >= ONE_PASS):
            raise ValueError(
                "block_sums: 'separate' describes blocks of keys; it needs an integer block "
                f"(below ONE_PASS), got block={b!r}"
            )
        j = self.merges
        if j is not None and (
            isinstance(j, bool) or not isinstance(j, int) or not 1 <= j <= 2**53
        ):  # (a count past float64's integers is no kernel's, and no bound takes it)
            raise ValueError(f"merges: expected an integer in [1, 2**53] or None, got {j!r}")
        if self.merge_format is not None and j is None:
            raise ValueError("merge_format: the format of merged split states needs merges=")
        if j is not None and self.sums == "linear":
            raise ValueError(
                "merges: split states merge through their lse; needs sums='log' or None"
            )
        if self.passes not in (1, 2) or isinstance(self.passes, bool):
            raise ValueError(f"passes: expected 1 or 2, got {self.passes!r}")
        if self.passes == 2 and j is not None:
            raise ValueError(
                "passes: a two-pass kernel normalizes once by its first pass's sum; merges= "
                "describes split-KV, whose splits are one pass each"
            )
        c = self.weights_scale
        if isinstance(c, bool) or not isinstance(c, int | float) or not math.isfinite(c) or c <= 0:
            raise ValueError(f"weights_scale: expected a finite number > 0, got {c!r}")
        object.__setattr__(self, "weights_scale", float(c))
        if self.weights is None and c != 1:
            raise ValueError("weights_scale: needs weights= (the format the weights are cast to)")
        if self.weights is not None and c > self.weights.max:
            raise ValueError(
                f"weights_scale: expected at most {self.weights.name}'s max "
                f"{self.weights.max:g} (larger clips the weights), got {c!r}"
            )
        # the largest weight, 1 times c, must stay normal in compute and after the cast:
        # below, the cast's error is not relative and the normalizer, summed after the
        # cast, may vanish (a review: c = 2^-10 cast every e4m3 weight to 0, a NaN output)
        fw = self.weights
        c_lo = 0.0 if fw is None else max(fw.min_normal, self.compute.min_normal)
        if fw is not None and c < c_lo:
            raise ValueError(
                f"weights_scale: expected at least {c_lo:g} (the smallest normal number of "
                f"{fw.name} and of compute {self.compute.name}: the largest weight "
                f"times it must stay normal), got {c!r}"
            )

    def products_overflow(self) -> tuple[float, str]:
        """The smaller overflow threshold of compute and accumulate, and that format's
        name: a product may round in either (a kernel's choice), so it overflows where
        its magnitude reaches this (ties name compute)."""
        fc, fa = self.compute, self.accumulate
        return (
            (fc.overflow(), fc.name) if fc.overflow() <= fa.overflow() else (fa.overflow(), fa.name)
        )

    def product_u(self) -> float:
        """Unit roundoff of one product of terms (weights and values, features and states,
        a transform's): it rounds in compute or in accumulate (a kernel's choice), or is
        exact in accumulate after a copy of an operand held there into a narrower compute
        (``tl.dot(q, S.to(fp16))``), a conversion that rounds as :attr:`rounding` says: a
        whole ulp of compute under "rtz" (a review: a gated kernel truncating its fp32 state
        to fp16 for its output product was 1.06x outside the bound that charged half)."""
        fc, fa = self.compute, self.accumulate
        copy = fc.rounding_units(self.rounding)[0] if fc.u > fa.u else 0.0
        return max(fc.u, fa.u, copy)

    @property
    def output_format(self) -> Format:
        """The format of the output store: ``output``, or ``storage`` when None."""
        return self.storage if self.output is None else self.output

    def row_scales(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., n]``: the scale factor each row of ``x [..., n, d]`` is stored with
        (:func:`scale_factors` under ``scaling``, which must be set). Exact."""
        s = scale_factors(x, self.storage, self.scaling)
        return s.expand(*x.shape[:-1], 1)[..., 0]

    def stored(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        """The values a kernel under this declaration holds for the input ``x`` (called
        ``name`` in errors), float64: ``round_to(x, storage, rounding)``, or with ``scaling`` the
        dequantized ``round(x / s) * s`` of :func:`quantize` with :func:`scale_factors`
        (exact: the product of a value of ``storage`` and a float32 scale is exact in
        float64).

        Raises
        ------
        ValueError, TypeError
            A finite ``x`` that overflows ``storage`` to inf (naming it); as
            :func:`quantize` (non-finite ``x`` with scaling, naming ``x``). A rounding that
            saturates instead (e4m3, which has no inf, as torch's cast; any format under
            "rtz") holds ``+-max``, as a kernel would: the change is the quantization
            part's.
        """
        if self.scaling is None:
            held = round_to(x, self.storage, self.rounding)
            if not bool(torch.isfinite(held).all()) and bool(torch.isfinite(x).all()):
                raise ValueError(f"{name}: overflows the storage format {self.storage.name}")
            return held
        codes, s = quantize(x, self.storage, self.scaling, rounding=self.rounding)
        return codes * s

    @classmethod
    def of(cls, precision: Any, dtype: Any = None) -> Precision:
        """A Precision from a Precision, a format name / ``Format`` / torch dtype (storage,
        with fp32 compute and accumulate), or None (storage from ``dtype``).

        Raises
        ------
        ValueError, TypeError
            If ``precision`` names no format (the message names ``precision``).
        """
        if isinstance(precision, Precision):
            return precision
        if precision is None:
            if dtype is None:
                raise ValueError("precision: expected a Precision or a format, got None")
            precision = dtype
        try:
            return cls(Format.of(precision))
        except (TypeError, ValueError) as e:
            raise type(e)(f"precision: {str(e).replace('fmt: ', '', 1)}") from None

    def op_error(self, op: str) -> float:
        """Relative error bound of one exp, log, division or tanh (``op``) computed in
        ``compute``, for a normal result (the elementary model: its ulps of float32, or of
        compute when wider, plus ``narrow`` ulps of a narrower compute format)."""
        el = self.elementary
        k = {"exp": el.exp, "log": el.log, "div": el.div, "tanh": el.tanh}[op]
        uc = self.compute.u
        if uc <= _U32:
            return 2.0 * k * uc
        return 2.0 * k * _U32 + 2.0 * el.narrow * uc

    def log_floor(self) -> float:
        """Absolute error of one log computed in ``compute`` near 1, where the ulp of its
        result vanishes: ``elementary.log_abs`` units of float32 (of compute when wider),
        plus ``narrow`` ulps of a narrower compute format as an absolute error (an
        approximate half-precision log), counted as :meth:`op_error` counts."""
        el = self.elementary
        uc = self.compute.u
        if uc <= _U32:
            return el.log_abs * uc
        return el.log_abs * _U32 + 2.0 * el.narrow * uc

    def exp_underflow(self) -> float:
        """Absolute error of one exp in ``compute`` whose result is below the normal range:
        the format's own underflow, or what a fast exp flushes (``elementary.exp_flush``)."""
        fc = self.compute
        return max(fc.underflow, self.elementary.exp_flush * fc.min_normal)

    def exp_exact_log(self) -> float:
        """``log T_e``: an exp in ``compute`` whose result is at least ``T_e`` is neither
        flushed nor subnormal (only its relative error applies); below, it is off by up to
        :meth:`exp_underflow` absolute."""
        fc = self.compute
        return math.log(max(fc.min_normal, self.elementary.exp_flush * fc.min_normal))

    def exp_flush_matters(self) -> bool:
        """Whether an exp's underflow error (:meth:`exp_underflow`) can matter: above
        ``2^-100`` (fp16 compute: ``1.2e-4``; fp32 and bf16: ``2.4e-38``). Where it cannot,
        the bounds charge it to every exp rather than find the exps that may reach it."""
        return self.exp_underflow() >= 2.0**-100

    def loads_exactly(self) -> bool:
        """Whether ``compute`` holds every value of ``storage`` (loading rounds nothing)."""
        return self.compute.holds(self.storage)

    def describe(self) -> str:
        """The declaration in words, with the evaluation orders its bounds cover."""
        el = self.elementary
        if self.block is None:
            order = (
                "any summation order and blocking, FMA or not, up to one rescaling per key "
                "or one shift by the sequence's maximum"
            )
        elif self.block >= ONE_PASS:
            order = "one pass (no online rescaling), any summation order, FMA or not"
        elif self.block_sums == "separate":
            order = (
                f"blocks of {self.block} keys, each summed on its own (any order, FMA or not) "
                "and then added, one rescaling per block"
            )
        else:
            order = (
                f"blocks of {self.block} keys (any order inside and across blocks, the "
                "running sum possibly fused into a block's sum, FMA or not), one rescaling "
                "per block"
            )
        order += "; a weight's features summed nested with the keys"
        order += (
            "; constants (scale, coefficients) on either side or split over both as roots"
            if self.constants == "any"
            else "; constants (scale, coefficients) applied once, on one side or the product"
        )

        extra = ""
        if self.scaling is not None:
            per = "tensor" if self.scaling == "tensor" else f"block of {self.scaling} rows"
            extra += f"; inputs scaled per {per} (float32 descales)"
        if self.weights is not None:
            extra += f"; weights cast to {self.weights.name} (times {self.weights_scale:g})"
        if self.output is not None:
            extra += f"; output stored to {self.output.name}"
        if self.sums is not None:
            extra += "; partial sums as " + ("values" if self.sums == "linear" else "logs")
        if self.passes == 2:
            extra += "; two passes (the normalizer first, then the exps recomputed against it)"
        if el.expm1 != "accurate":
            extra += "; zoh's expm1 as exp - 1"
        if self.merges is not None:
            held = (self.merge_format or self.output_format).name
            extra += (
                f"; split states merged pairwise, at most {self.merges} merges each, held in {held}"
            )
        return (
            f"storage={self.storage.name}, compute={self.compute.name}, "
            f"accumulate={self.accumulate.name}, rounding={self.rounding}; {order}; exp "
            f"{el.exp:g} ulp, log {el.log:g} ulp, division {el.div:g} ulp{extra}"
        )


#: Entries :func:`round_to` rounds at once.
ROUND_CHUNK = 2**22


def round_to(x: torch.Tensor, fmt: Any, rounding: str = "rne") -> torch.Tensor:
    """Round a float64 tensor to ``fmt`` exactly, returned as float64.

    Parameters
    ----------
    x : torch.Tensor
        float64 tensor (other float dtypes are converted to float64 first, exactly).
    fmt : format-like
        Target format (name, :class:`Format` or torch dtype).
    rounding : {"rne", "rtz"}
        Round to nearest even, or toward zero.

    Returns
    -------
    torch.Tensor
        float64 tensor of values representable in ``fmt``.

    Notes
    -----
    Exact: every step (frexp, scaling by powers of two, integer rounding) is exact in float64,
    so the result is the correctly rounded value, with the overflow and special-value
    semantics in the module docstring. Bit-exact against ``x.float().to(fmt.torch_dtype)``
    for fp16/bf16/e4m3/e5m2 and against ``x.to(torch.float32)`` for fp32 (tested).
    """
    check_float("x", x)
    f = Format.of(fmt)
    r = _check_rounding(rounding)
    dtype, x = x.dtype, x.to(torch.float64)
    if f.name == "fp64":
        return x.clone()
    if dtype == f.torch_dtype:  # held in the format already: the identity
        return x
    if x.numel() <= ROUND_CHUNK:
        return _round(x, f, r)
    # elementwise: in chunks, so that its eight temporaries stay small (a Mamba input of
    # 65,536 tokens x 1536 channels is 805 MB in float64), in memory order, into x's
    # layout where it is dense (as the elementwise ops would give; else contiguous)
    out = torch.empty_like(x)
    perm = sorted(range(x.dim()), key=lambda i: -out.stride()[i])
    flat_out = out.permute(perm).view(-1)
    flat = x.permute(perm).reshape(-1)
    for a in range(0, flat.numel(), ROUND_CHUNK):
        flat_out[a : a + ROUND_CHUNK] = _round(flat[a : a + ROUND_CHUNK], f, r)
    return out


def _round(x: torch.Tensor, f: Format, r: str) -> torch.Tensor:
    """:func:`round_to`'s rounding of a float64 ``x`` to ``f`` (``r``: rne or rtz)."""
    finite = torch.isfinite(x)
    xf = torch.where(finite, x, torch.zeros_like(x))
    # frexp: |x| = m 2^E with m in [0.5, 1); the ulp at x is 2^(max(E-1, emin) - p + 1).
    _, e = torch.frexp(xf)
    shift = torch.clamp(e.to(torch.int64) - 1, min=f.emin) - (f.precision - 1)
    # |x| / ulp < 2^p <= 2^53: scaling by powers of two and rounding are exact.
    scaled = torch.ldexp(xf, -shift)
    q = torch.round(scaled) if r == "rne" else torch.trunc(scaled)
    y = torch.ldexp(q, shift)
    y = torch.copysign(y, x)  # keep the sign of zeros
    big = y.abs() > f.max
    if r == "rne" and f.has_inf:
        y = torch.where(big, torch.copysign(torch.full_like(y, math.inf), x), y)
    else:
        y = torch.where(big, torch.copysign(torch.full_like(y, f.max), x), y)
    if f.has_inf:
        return torch.where(finite, y, x)
    # e4m3 (float8_e4m3fn) has no inf: torch saturates +-inf to +-max.
    sat = torch.copysign(torch.full_like(x, f.max), x)
    return torch.where(finite, y, torch.where(torch.isnan(x), x, sat))


def _check_scaling(scaling: object) -> str | int | None:
    if scaling is None or scaling == "tensor":
        return scaling  # type: ignore[return-value]
    if isinstance(scaling, bool) or not isinstance(scaling, int) or scaling < 1:
        raise ValueError(
            f"scaling: expected None, 'tensor' or a positive number of rows, got {scaling!r}"
        )
    return scaling


def fp8_weights_scale(fmt: Any) -> float:
    """The FP8 recipe's weights scale: the largest power of two within ``fmt``'s max
    (256 for e4m3, 32768 for e5m2), so that scaling and descaling are exact."""
    return 2.0 ** Format.of(fmt).emax


def scale_factors(x: torch.Tensor, fmt: Any, scaling: Any = "tensor") -> torch.Tensor:
    """Scale factors of ``x [..., n, d]`` for storage in ``fmt``: ``s = amax / fmt.max``
    rounded up to float32 (so ``|x / s| <= max``: no value clips), 1 where ``amax`` is 0.

    Parameters
    ----------
    x : torch.Tensor
        Finite float tensor ``[..., n, d]``.
    fmt : format-like
        The storage format (e4m3, e5m2, or any other).
    scaling : "tensor" or int
        One scale over the whole tensor, or one per block of ``scaling`` rows of each
        leading index (head).

    Returns
    -------
    torch.Tensor
        float64 scales (float32 values), ``[1, ..., 1]`` for "tensor" and ``[..., n, 1]``
        (each row's block scale) for blocks: broadcastable to ``x``. Exact: float64
        division and one upward rounding to float32.

    Raises
    ------
    ValueError, TypeError
        Non-finite or non-float ``x``, a bad ``scaling`` (each naming the argument).
    """
    check_float("x", x)
    f = Format.of(fmt)
    sc = _check_scaling(scaling)
    if sc is None:
        raise ValueError("scaling: expected 'tensor' or a number of rows, got None")
    if x.dim() < 2:
        raise ValueError(f"x: expected [..., n, d], got shape {tuple(x.shape)}")
    x64 = x.detach().to(torch.float64)
    if not bool(torch.isfinite(x64).all()):
        raise ValueError("x: expected finite values (scale factors of non-finite inputs)")
    a = x64.abs()
    if sc == "tensor":
        amax = a.amax() if a.numel() else a.new_zeros(())
        amax = amax.reshape([1] * x.dim())
    else:
        assert isinstance(sc, int)
        n = x.shape[-2]
        nb = -(-n // sc)
        pad = a.new_zeros(*a.shape[:-2], nb * sc - n, a.shape[-1])
        blocks = torch.cat([a, pad], -2).reshape(*a.shape[:-2], nb, sc * a.shape[-1])
        amax = blocks.amax(-1) if blocks.shape[-1] else blocks.new_zeros(blocks.shape[:-1])
        amax = amax.to(torch.float64).repeat_interleave(sc, -1)[..., :n, None]
    t = amax / f.max
    if bool((t > torch.finfo(torch.float32).max).any()):  # a float32 scale of inf: NaN codes
        raise ValueError(
            f"x: a largest magnitude of {float(amax.max()):.3g} needs a scale factor past "
            f"float32's range ({fmt!s} max {f.max})"
        )
    s = t.to(torch.float32).to(torch.float64)
    up = torch.nextafter(s.float(), torch.full_like(s, math.inf, dtype=torch.float32)).double()
    s = torch.where(s < t, up, s)
    return torch.where(amax > 0, s, torch.ones_like(s))


def quantize(
    x: torch.Tensor, fmt: Any, scaling: Any = "tensor", scale: Any = None, rounding: str = "rne"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to ``fmt`` with scale factors: ``(codes, s)``, ``codes =
    round_to(x / s, fmt, rounding)`` (``x / s`` in float64, then one rounding), so the
    value held is ``codes * s``.

    Parameters
    ----------
    x : torch.Tensor
        Finite float tensor ``[..., n, d]``.
    fmt : format-like
        The storage format.
    scaling : "tensor" or int
        As :func:`scale_factors` (used when ``scale`` is None).
    scale : float or torch.Tensor, optional
        Given scale factors (broadcastable to ``x``), positive and finite; default
        :func:`scale_factors` ``(x, fmt, scaling)``. Scales smaller than ``amax / max``
        clip: e4m3 saturates to ``max``, e5m2 overflows to inf.
    rounding : {"rne", "rtz"}
        The conversion's rounding (:func:`round_to`).

    Returns
    -------
    codes, s : torch.Tensor
        float64: the stored values (in ``fmt``) and the scales. Error: ``|codes * s - x| <=
        s (u |x / s| + min_subnormal / 2)`` where ``|x / s| <= max`` (up to the float64
        rounding of ``x / s``, which can only move a tie); twice that for ``"rtz"``.

    Raises
    ------
    ValueError, TypeError
        Non-finite ``x``, a scale that is not positive and finite (naming ``scale``), an
        unknown ``fmt`` (naming ``fmt``).
    """
    f = Format.of(fmt)
    if scale is None:
        s = scale_factors(x, f, scaling)
    else:
        if isinstance(scale, bool) or not isinstance(scale, torch.Tensor | int | float):
            raise TypeError(f"scale: expected a number or a tensor, got {type(scale).__name__}")
        # (a Python number straight to float64: as_tensor alone would round it to float32)
        s = torch.as_tensor(scale, dtype=None if isinstance(scale, torch.Tensor) else torch.float64)
        check_float("x", x)
        s = s.detach().to(x.device, torch.float64)
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise ValueError("scale: expected positive finite scale factors (got <= 0, inf or NaN)")
    x64 = x.detach().to(torch.float64)
    if not bool(torch.isfinite(x64).all()):
        raise ValueError("x: expected finite values")
    try:
        scaled = x64 / s
    except RuntimeError:
        raise ValueError(
            f"scale: shape {tuple(s.shape)} does not broadcast to x {tuple(x.shape)}"
        ) from None
    return round_to(scaled, f, rounding), s
