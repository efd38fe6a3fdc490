"""A zoo of attention kernels that emulate a declared precision exactly, for measuring the
audit's power (benchmarks/audit_power.py, tests/testing/test_zoo.py).

Every kernel is a plain PyTorch function ``fn(q, k, v, **params)`` on the CPU. It works on
float64 tensors that always hold values of the format the declaration names for them, and
rounds after every operation (:func:`rnd`, exact: one rounding from float64):

- inputs are loaded from the storage dtype into the compute format;
- every elementwise operation (scaling, shifts, exp, the polynomial of taylor, the
  division) rounds to the compute format;
- every product that feeds a sum, and every addition of a sum, rounds to the accumulate
  format; sums are explicit loops over the summed dimension (vectorized over the others);
- the output is rounded once to the storage format and returned in the storage dtype.

Emulating fp32 (or a narrower format) by a float64 operation and one rounding is exact for
``+ - * /`` (53 >= 2 * 24 + 2); exp is correctly rounded up to float64's own error.

:class:`Arith` carries the rounding points, the summation schedule of a *variant*
(sequential, pairwise, blocked, FMA dot products) and the *defect* injected, so that one
kernel body serves the correct kernel, its variants and every defect. :func:`zoo` lists the
kernels of one method and declaration; :data:`DEFECTS` the defect classes with their
severity ladders (mild to severe).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from attnprec.analysis.precision import FORMATS, ONE_PASS, Format, Precision, round_to

__all__ = [
    "METHODS",
    "DECLARATIONS",
    "DEFECTS",
    "DefectClass",
    "KernelSpec",
    "Arith",
    "rnd",
    "narrow",
    "zoo",
    "correct_kernel",
    "variant_kernels",
    "defect_kernels",
    "allowed",
    "method_inputs",
]

METHODS = (
    "softmax", "semiring", "log", "taylor", "polynomial", "linear", "favor", "gated", "ssd",
    "selective_scan", "ssm", "h3",
)  # fmt: skip
#: The methods the gated recurrence computes (the state-space models through their
#: reduction, docs/bounds/ssm.md; H3 through its shifted keys): causal, recurrent or chunked.
GATED = ("gated", "ssd", "selective_scan", "ssm", "h3")

#: The declarations covered: name -> Precision (the block is set per kernel).
DECLARATIONS: dict[str, Precision] = {
    "fp32": Precision("fp32"),
    "fp16": Precision("fp16"),
    "bf16": Precision("bf16"),
    "fp16-c16-a16": Precision("fp16", compute="fp16", accumulate="fp16"),
    "bf16-c16-a16": Precision("bf16", compute="bf16", accumulate="bf16"),
    "fp16-c16-a32": Precision("fp16", compute="fp16", accumulate="fp32"),
    "bf16-c16-a32": Precision("bf16", compute="bf16", accumulate="fp32"),
}

_LOG2E = 1.0 / math.log(2.0)
_LOG2E32 = float(torch.tensor(_LOG2E, dtype=torch.float32))
_LN2 = math.log(2.0)


def narrow(fmt: Format, p: int) -> Format:
    """``fmt`` with its significand cut to ``p`` bits (same exponent range); ``fmt`` itself
    when it has no more than ``p`` bits."""
    if p >= fmt.precision:
        return fmt
    mx = (2.0 - 2.0 ** (1 - p)) * 2.0**fmt.emax
    return Format(f"{fmt.name}@p{p}", p, fmt.emin, fmt.emax, mx, fmt.has_inf)


def bits(p: int) -> Format:
    """A ``p``-bit significand with the exponent range of fp32 (tf32 is ``bits(11)``)."""
    return narrow(FORMATS["fp32"], p)


def rnd(x: torch.Tensor, fmt: Format, rounding: str = "rne") -> torch.Tensor:
    """``x`` (float64) rounded once to ``fmt``, as float64."""
    if fmt.name == "fp64":
        return x
    if fmt.name == "fp32" and rounding == "rne":
        return x.float().double()
    return round_to(x, fmt, rounding)


def _ulp32(y: torch.Tensor) -> torch.Tensor:
    """The spacing of fp32 numbers at ``y`` (normal range; 0 at 0, inf and NaN)."""
    _, e = torch.frexp(y)
    u = torch.ldexp(torch.ones_like(y), (e - 24).clamp_min(-149))
    return torch.where(torch.isfinite(y) & (y != 0), u, torch.zeros_like(y))


def _exp2_poly(x: torch.Tensor, degree: int) -> torch.Tensor:
    """``exp(x) = 2^n 2^f`` with ``2^f`` a Taylor polynomial of ``degree`` in ``f ln 2``
    (f in [0, 1)): the truncated polynomial of a software exp2."""
    t = x * _LOG2E
    fin = torch.isfinite(t)
    tt = torch.where(fin, t, torch.zeros_like(t))
    n = torch.floor(tt)
    z = (tt - n) * _LN2
    poly = torch.zeros_like(z)
    for i in range(degree, -1, -1):
        poly = poly * z + 1.0 / math.factorial(i)
    y = torch.ldexp(poly, n.to(torch.int64))
    return torch.where(fin, y, torch.exp(x))


class Arith:
    """The rounding points of one kernel run: formats, summation schedule and defect.

    Parameters
    ----------
    prec : Precision
        The declaration emulated (storage, compute, accumulate, store rounding).
    order : {"seq", "pairwise", "blocked", "sorted"}
        Summation order of every sum (``blocked``: sequential inside blocks of ``block``
        terms, then the block sums sequentially; ``sorted``: sequential, largest magnitude
        first, so that the small terms are added to the largest partial sums).
    block : int
        Block of the ``blocked`` order.
    fma : bool
        Dot products as ``acc = fl(a * b + acc)`` (one rounding per term).
    limit : bool
        exp and division at the edge of the default accuracy model instead of correctly
        rounded: ``exp(x) = 2^fl(x * fl(log2 e))`` in fp32 off by 3 ulp of fp32 (the sign of
        the error follows ``sin(1000 x)``), division off by 1 ulp of fp32, then rounded to
        compute.
    ftz : bool
        fp32 results below the normal range flushed to zero (GPUs' ``-ftz``).
    spans : {"c", "a"}
        Where the chunked gated kernels' sums of log-gates round: compute (the default) or
        accumulate (a ``cumsum`` in the format of sums).
    defect, level
        The defect injected (a key of :data:`DEFECTS`) and its severity.
    """

    def __init__(
        self,
        prec: Precision,
        *,
        order: str = "seq",
        block: int = 0,
        fma: bool = False,
        limit: bool = False,
        ftz: bool = False,
        spans: str = "c",
        defect: str | None = None,
        level: Any = None,
    ) -> None:
        self.prec = prec
        self.spans = spans
        self.limit, self.ftz = limit, ftz
        A = prec.accumulate
        self.fmt = {"c": prec.compute, "a": A, "den": A, "s": prec.storage}
        self.mode = {"c": "rne", "a": "rne", "den": "rne", "s": prec.rounding, "div": "rne"}
        self.mode["exp"] = "rne"
        self.order, self.block, self.fma = order, block, fma
        self.defect, self.level = defect, level
        if defect == "acc_narrow":
            self.fmt["a"] = self.fmt["den"] = narrow(A, int(level))
        elif defect == "den_narrow":
            self.fmt["den"] = narrow(A, int(level))
        elif defect == "trunc":
            lv = int(level)
            for role, at in (("s", 1), ("div", 2), ("exp", 3), ("c", 4), ("a", 5), ("den", 5)):
                if lv >= at:
                    self.mode[role] = "rtz"

    # -- rounding ------------------------------------------------------------------------
    def r(self, x: torch.Tensor, role: str = "c") -> torch.Tensor:
        fmt = self.fmt["c" if role in ("div", "exp") else role]
        y = rnd(x, fmt, self.mode[role])
        if self.ftz and fmt.name == "fp32":
            y = torch.where(y.abs() < fmt.min_normal, torch.zeros_like(y).copysign(y), y)
        return y

    def c(self, x: torch.Tensor) -> torch.Tensor:
        """An elementwise result, rounded to compute."""
        return self.r(x, "c")

    def load(self, x: torch.Tensor) -> torch.Tensor:
        """An input loaded from storage into compute."""
        return self.c(x.detach().to("cpu", torch.float64))

    def const(self, x: float) -> torch.Tensor:
        """A constant (the scale) in compute; ``wrong_scale`` perturbs it."""
        if self.defect == "wrong_scale":
            x = x * (1.0 + 2.0 ** -float(self.level))
        return self.c(torch.tensor(x, dtype=torch.float64))

    def mul(self, a: torch.Tensor, b: torch.Tensor, role: str = "a") -> torch.Tensor:
        """A product that feeds a sum (rounded to accumulate)."""
        return self.r(a * b, role)

    def add(self, a: torch.Tensor, b: torch.Tensor, role: str = "a") -> torch.Tensor:
        return self.r(a + b, role)

    def exp(self, x: torch.Tensor) -> torch.Tensor:
        """exp in compute (``exp_sin``/``exp2_poly`` make it approximate)."""
        if self.defect == "exp_sin":
            e = torch.exp(x)
            y = torch.where(e == 0, e, e * (1.0 + 2.0 ** -float(self.level) * torch.sin(1000 * x)))
        elif self.defect == "exp2_poly":
            y = _exp2_poly(x, int(self.level))
        elif self.limit:
            f32 = FORMATS["fp32"]
            t = rnd(x * _LOG2E32, f32)
            e = rnd(torch.exp2(t), f32)
            y = e + torch.where(torch.sin(1000 * x) >= 0, 3.0, -3.0) * _ulp32(e)
        else:
            y = torch.exp(x)
        return self.r(y, "exp")

    def div(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a / b`` in compute (``rcp_approx``: times an approximate reciprocal)."""
        if self.defect == "rcp_approx":
            rc = (1.0 / b) * (1.0 + 2.0 ** -float(self.level) * torch.sin(1000 * b))
            return self.r(a * self.c(rc), "div")
        if self.limit:
            y = rnd(a / b, FORMATS["fp32"])
            return self.r(y + torch.where(torch.sin(1000 * b) >= 0, 1.0, -1.0) * _ulp32(y), "div")
        return self.r(a / b, "div")

    def store(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The output, rounded once to storage."""
        return self.r(y, "s").to(dtype)

    # -- sums ----------------------------------------------------------------------------
    def _seq(self, x: torch.Tensor, role: str) -> torch.Tensor:
        acc = x[0]
        for i in range(1, x.shape[0]):
            acc = self.r(acc + x[i], role)
        return acc

    def sum(self, x: torch.Tensor, dim: int, name: str | None = None) -> torch.Tensor:
        """Sum over ``dim`` in the accumulate format (``name="den"``: the normalizer)."""
        role = "den" if name == "den" else "a"
        x = self.r(x, role).movedim(dim, 0)
        n = x.shape[0]
        if n == 0:
            return torch.zeros(x.shape[1:], dtype=x.dtype)
        if self.order == "pairwise":
            while x.shape[0] > 1:
                m = x.shape[0] // 2
                y = self.r(x[0 : 2 * m : 2] + x[1 : 2 * m : 2], role)
                x = torch.cat([y, x[2 * m :]]) if x.shape[0] % 2 else y
            return x[0]
        if self.order == "sorted":
            idx = torch.argsort(x.abs(), dim=0, descending=True)
            return self._seq(torch.gather(x, 0, idx), role)
        if self.order == "blocked" and n > self.block:
            b = self.block
            nb = -(-n // b)
            pad = torch.zeros((nb * b - n, *x.shape[1:]), dtype=x.dtype)
            blocks = torch.cat([x, pad]).reshape(nb, b, *x.shape[1:]).transpose(0, 1)
            return self._seq(self._seq(blocks, role), role)
        return self._seq(x, role)

    def dot(
        self, a: torch.Tensor, b: torch.Tensor, dim: int, name: str | None = None, mm: bool = False
    ) -> torch.Tensor:
        """``sum(a * b, dim)``: products and additions in accumulate (FMA: one rounding per
        term). ``mm``: a matrix product of a PyTorch implementation (``tf32`` rounds its
        operands)."""
        if mm and self.defect == "tf32":
            f = bits(int(self.level))
            a, b = rnd(a, f), rnd(b, f)
        role = "den" if name == "den" else "a"
        if self.fma and self.order == "seq":
            a, b = torch.broadcast_tensors(a, b)
            a, b = a.movedim(dim, 0), b.movedim(dim, 0)
            acc = self.r(a[0] * b[0], role)
            for i in range(1, a.shape[0]):
                acc = self.r(a[i] * b[i] + acc, role)
            return acc
        return self.sum(self.mul(a, b, role), dim, name)

    # -- defect hooks --------------------------------------------------------------------
    def hook(self, name: str, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Apply the defect aimed at the intermediate ``name`` (else return ``x``)."""
        d, lv = self.defect, self.level
        if d == "logits_narrow" and name == "logits":
            return rnd(x, bits(int(lv)))
        if d == "probs_narrow" and name == "probs":
            return rnd(x, bits(int(lv)))
        if d == "values_narrow" and name == "values":
            return rnd(x, bits(int(lv)))
        if d == "flush_small" and name == "weights":
            top = x.abs().amax(dim, keepdim=True)
            return torch.where(x.abs() < float(lv) * top, torch.zeros_like(x), x)
        if d == "den_eps" and name == "den":
            return self.r(x + float(lv), "den")
        return x


# -- kernels -------------------------------------------------------------------------------


def _loads(ar: Arith, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
    return ar.load(q), ar.load(k), ar.hook("values", ar.load(v))


def _default_scale(method: str, d: int, scale: float | None) -> float:
    if scale is not None:
        return float(scale)
    return 1.0 if method in ("log", "linear") else 1.0 / math.sqrt(d)


def _weights(method: str, ar: Arith, s: torch.Tensor, coeffs: Any = None) -> torch.Tensor:
    """Unnormalized weights from the scores: softmax shifted by the row maximum, taylor's
    ``1 + s + s^2/2``, the polynomial's ``sum_p c_p s^p`` by Horner (its coefficients
    rounded to compute), a one-term semiring's ``c exp(lam (s - m))`` (``coeffs``: the
    semiring; ``m`` the row maximum, each constant rounded to compute), linear's scores
    themselves."""
    if method == "softmax":
        return ar.exp(ar.c(s - s.amax(-1, keepdim=True)))
    if method == "semiring":
        if len(coeffs.terms) != 1:  # (lam_r (s - m) shifts each term by its own lam_r m)
            raise ValueError("semiring: the zoo's kernel takes one term, c exp(lam s)")
        ((c, lam),) = coeffs.terms
        dist = ar.c(s - s.amax(-1, keepdim=True))
        w = ar.exp(ar.c(dist * ar.c(torch.tensor(lam, dtype=torch.float64))))
        return w if c == 1 else ar.c(w * ar.c(torch.tensor(c, dtype=torch.float64)))
    if method == "taylor":
        sc = ar.c(s)
        return ar.c(ar.c(1.0 + sc) + ar.c(ar.c(sc * sc) * 0.5))
    if method == "polynomial":
        sc = ar.c(s)
        c = [ar.c(torch.tensor(float(x), dtype=torch.float64)) for x in coeffs]
        w = c[-1].expand_as(sc)
        for cp in reversed(c[:-1]):
            w = ar.c(ar.c(w * sc) + cp)
        return w
    return s


def _scores(
    method: str, ar: Arith, q: torch.Tensor, k: torch.Tensor, scale: float, W: Any = None
) -> torch.Tensor:
    if method == "favor":  # the weights phi(q) . psi(k) (its exponents take the hook)
        phi, psi = _favor_features(ar, q, k, W, scale)
        return ar.dot(phi.unsqueeze(-2), psi.unsqueeze(-3), -1, mm=True)
    qs = q if method == "linear" else ar.c(q * ar.const(scale))
    s = ar.dot(qs.unsqueeze(-2), k.unsqueeze(-3), -1, mm=True)
    return ar.hook("logits", s)


def _quadratic(method: str, ar: Arith, q, k, v, scale: float, W: Any = None) -> torch.Tensor:
    """softmax / taylor / linear / FAVOR+: the ``[n_q, n_k]`` weights, then ``w V / sum w``."""
    s = _scores(method, ar, q, k, scale, W)
    w = ar.hook("weights", _weights(method, ar, s, W))
    wn = ar.hook("probs", w)
    num = ar.dot(wn.unsqueeze(-1), v.unsqueeze(-3), -2, mm=True)
    den = ar.hook("den", ar.sum(w, -1, name="den"))
    return ar.div(num, den.unsqueeze(-1))


def _online_softmax(ar: Arith, q, k, v, scale: float, blk: int) -> torch.Tensor:
    """FlashAttention's schedule: key blocks of ``blk``, running maximum, the numerator and
    normalizer rescaled by ``exp(m_old - m_new)`` (defects: ``online_den_lazy``,
    ``online_rescale_narrow``)."""
    qs = ar.c(q * ar.const(scale))
    n_k = k.shape[-2]
    m = torch.full((*qs.shape[:-1], 1), -math.inf, dtype=torch.float64)
    l_run = torch.zeros(qs.shape[:-1], dtype=torch.float64)
    acc = torch.zeros((*qs.shape[:-1], v.shape[-1]), dtype=torch.float64)
    for j0 in range(0, n_k, blk):
        kb, vb = k[..., j0 : j0 + blk, :], v[..., j0 : j0 + blk, :]
        s = ar.hook("logits", ar.dot(qs.unsqueeze(-2), kb.unsqueeze(-3), -1, mm=True))
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        alpha, alpha_l = _rescale(ar, m, m_new)
        p = ar.hook("weights", ar.exp(ar.c(s - m_new)))
        pn = ar.hook("probs", p)
        l_run = ar.add(ar.mul(alpha_l.squeeze(-1), l_run, "den"), ar.sum(p, -1, "den"), "den")
        pv = ar.dot(pn.unsqueeze(-1), vb.unsqueeze(-3), -2, mm=True)
        acc = ar.add(ar.mul(alpha, acc), pv)
        m = m_new
    return ar.div(acc, ar.hook("den", l_run).unsqueeze(-1))


def _two_pass_softmax(ar: Arith, q, k, v, scale: float, blk: int) -> torch.Tensor:
    """Two passes: the normalizer online over key blocks of ``blk`` (running maximum, its
    rescalings), then every logit and exp recomputed against the last maximum, ``sum_j
    exp(s_j - m) v_j / l`` (declared ``passes=2``)."""
    qs = ar.c(q * ar.const(scale))
    m = torch.full((*qs.shape[:-1], 1), -math.inf, dtype=torch.float64)
    l_run = torch.zeros(qs.shape[:-1], dtype=torch.float64)
    for j0 in range(0, k.shape[-2], blk):
        s = ar.dot(qs.unsqueeze(-2), k[..., j0 : j0 + blk, :].unsqueeze(-3), -1, mm=True)
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        alpha_l = _rescale(ar, m, m_new)[1]
        p = ar.exp(ar.c(s - m_new))
        l_run = ar.add(ar.mul(alpha_l.squeeze(-1), l_run, "den"), ar.sum(p, -1, "den"), "den")
        m = m_new
    s = ar.hook("logits", ar.dot(qs.unsqueeze(-2), k.unsqueeze(-3), -1, mm=True))
    pn = ar.hook("probs", ar.hook("weights", ar.exp(ar.c(s - m))))
    num = ar.dot(pn.unsqueeze(-1), v.unsqueeze(-3), -2, mm=True)
    return ar.div(num, ar.hook("den", l_run).unsqueeze(-1))


def _rescale(ar: Arith, m: torch.Tensor, m_new: torch.Tensor) -> tuple:
    """The rescale factors of the accumulators and of the normalizer."""
    if ar.defect == "online_rescale_narrow":
        f = bits(int(ar.level))
        alpha = ar.exp(ar.c(rnd(m, f) - rnd(m_new, f)))
    else:
        alpha = ar.exp(ar.c(m - m_new))
    alpha_l = alpha
    if ar.defect == "online_den_lazy":
        alpha_l = torch.where(m_new - m < float(ar.level), torch.ones_like(alpha), alpha)
    return alpha, alpha_l


def _log_keys(ar: Arith, Yb: torch.Tensor, mk: torch.Tensor, vb: torch.Tensor) -> tuple:
    """Key-side factors ``A = exp(Y - m)`` of a block and their sums ``A^T V``, ``sum A``."""
    A = ar.hook("weights", ar.exp(ar.hook("logits", ar.c(Yb - mk))), dim=-2)
    An = ar.hook("probs", A)
    N = ar.dot(An.unsqueeze(-1), vb.unsqueeze(-2), -3, mm=True)  # [d, d_v]
    Z = ar.sum(A, -2, name="den")  # [d]
    return N, Z


def _log_queries(ar: Arith, X: torch.Tensor, mk: torch.Tensor, N, Z) -> torch.Tensor:
    XM = ar.hook("logits", ar.c(X + mk))
    B = ar.exp(ar.c(XM - XM.amax(-1, keepdim=True)))  # [n_q, d]
    num = ar.dot(B.unsqueeze(-1), N.unsqueeze(-3), -2, mm=True)
    den = ar.hook("den", ar.dot(B, Z.unsqueeze(-2), -1, name="den", mm=True))
    return ar.div(num, den.unsqueeze(-1))


def _log(ar: Arith, q, k, v, scale: float, blk: int | None) -> torch.Tensor:
    """Heinsen log attention, factorized: per channel key maxima ``m_c`` (found first, or
    running over key blocks of ``blk`` with the state rescaled), ``N = sum_j e^{Y_j - m} v_j``,
    ``Z = sum_j e^{Y_j - m}``, then ``B = e^{X + m - M}``, ``y = B N / B Z``."""
    sc = ar.const(scale)
    X, Y = ar.c(q * sc), ar.c(k * sc)
    if blk is None:
        mk = Y.amax(-2, keepdim=True)
        N, Z = _log_keys(ar, Y, mk, v)
        return _log_queries(ar, X, mk, N, Z)
    mk = torch.full((*Y.shape[:-2], 1, Y.shape[-1]), -math.inf, dtype=torch.float64)
    N = torch.zeros((*Y.shape[:-2], Y.shape[-1], v.shape[-1]), dtype=torch.float64)
    Z = torch.zeros((*Y.shape[:-2], Y.shape[-1]), dtype=torch.float64)
    for j0 in range(0, Y.shape[-2], blk):
        Yb, vb = Y[..., j0 : j0 + blk, :], v[..., j0 : j0 + blk, :]
        m_new = torch.maximum(mk, Yb.amax(-2, keepdim=True))
        alpha, alpha_z = _rescale(ar, mk, m_new)  # [1, d]
        Nb, Zb = _log_keys(ar, Yb, m_new, vb)
        N = ar.add(ar.mul(alpha.transpose(-1, -2), N), Nb)
        Z = ar.add(ar.mul(alpha_z.squeeze(-2), Z, "den"), Zb, "den")
        mk = m_new
    return _log_queries(ar, X, mk, N, Z)


def _features(
    method: str, ar: Arith, q, k, scale: float, split: bool = False, coeffs: Any = None
) -> tuple:
    """phi(q), psi(k) with ``phi . psi`` the weight: linear's given features, or taylor's
    (the polynomial's, degree 2) packed monomials of powers 0, 1, 2, the coefficient on the
    query side, or with ``split`` Based's form: ``sqrt(scale)`` on every entry and the root
    of each monomial's coefficient on both sides (each constant rounded to compute)."""
    if method == "linear":
        return q, k
    c0, c1, c2 = (1.0, 1.0, 0.5) if coeffs is None else (*map(float, coeffs), 0.0, 0.0)[:3]
    if coeffs is not None and len(coeffs) > 3:
        raise ValueError("coeffs: the zoo's feature form is of degree 2 at most")
    d = q.shape[-1]
    pairs = list(itertools.combinations_with_replacement(range(d), 2))
    ia = torch.tensor([a for a, _ in pairs])
    ib = torch.tensor([b for _, b in pairs])
    coef = torch.tensor([c2 if a == b else 2 * c2 for a, b in pairs], dtype=torch.float64)
    if split:
        X, Y = (ar.c(x * ar.const(math.sqrt(scale))) for x in (q, k))
        root = ar.c(coef.sqrt())
        phi2, psi2 = (ar.c(ar.c(Z[..., ia] * Z[..., ib]) * root) for Z in (X, Y))
    else:
        X, Y = ar.c(q * ar.const(scale)), k
        phi2 = ar.c(ar.c(X[..., ia] * X[..., ib]) * ar.c(coef))
        psi2 = ar.c(k[..., ia] * k[..., ib])
    if coeffs is not None:  # (taylor's are 1 on the powers 0 and 1)
        X = ar.c(X * ar.c(torch.tensor(c1, dtype=torch.float64)))
    one = ar.c(torch.tensor(c0 if coeffs is not None else 1.0, dtype=torch.float64))
    phi = torch.cat([one.expand_as(X[..., :1]), X, phi2], -1)
    psi = torch.cat([torch.ones_like(Y[..., :1]), Y, psi2], -1)
    return phi, psi


def _favor_logs(ar: Arith, x: torch.Tensor, W: Any, scale: float) -> torch.Tensor:
    """FAVOR+ feature exponents as a kernel forms them: ``x' = fl(sqrt(scale) x)``, the
    projection rounded to compute, ``fl(fl(W x') - fl(|x'|^2 / 2)) - log(m) / 2`` (the dot
    and the squared norm are sums in accumulate, the rest rounds in compute)."""
    xs = ar.c(x * ar.const(math.sqrt(scale)))
    Wc = ar.c(torch.as_tensor(W, dtype=torch.float64))
    lin = ar.dot(xs.unsqueeze(-2), Wc, -1, mm=True)  # [n, m]
    half = ar.c(ar.sum(ar.mul(xs, xs), -1) * 0.5).unsqueeze(-1)
    log_m = ar.c(torch.tensor(0.5 * math.log(Wc.shape[0]), dtype=torch.float64))
    return ar.hook("logits", ar.c(ar.c(lin - half) - log_m))


def _favor_features(ar: Arith, q, k, W: Any, scale: float) -> tuple:
    """``phi(q)``, ``psi(k)``: each query's features shifted by its largest exponent; each
    key's by its own largest ``a_j``, then scaled by ``exp(a_j - m)``, ``m`` the largest
    over the keys (found first: one pass)."""
    tq, tk = _favor_logs(ar, q, W, scale), _favor_logs(ar, k, W, scale)
    phi = ar.exp(ar.c(tq - tq.amax(-1, keepdim=True)))
    a = tk.amax(-1, keepdim=True)
    lift = ar.exp(ar.c(a - a.amax(-2, keepdim=True)))
    return phi, ar.c(ar.exp(ar.c(tk - a)) * lift)


def _favor_chunked(ar: Arith, q, k, v, W: Any, scale: float, chunk: int) -> torch.Tensor:
    """FAVOR+'s linear-time form: the state ``S = sum_j psi(k_j) v_j^T`` and ``z = sum_j
    psi(k_j)`` summed chunk by chunk in units of ``exp(m)``, ``m`` the running largest key
    exponent, rescaled by ``exp(m_old - m_new)`` when a chunk raises it; then ``phi(q) S /
    phi(q) z``."""
    tq, tk = _favor_logs(ar, q, W, scale), _favor_logs(ar, k, W, scale)
    phi = ar.exp(ar.c(tq - tq.amax(-1, keepdim=True)))
    a = tk.amax(-1, keepdim=True)
    base = ar.exp(ar.c(tk - a))
    S = z = m = None
    for j0 in range(0, k.shape[-2], chunk):
        ac, vc = a[..., j0 : j0 + chunk, :], v[..., j0 : j0 + chunk, :]
        m_new = ac.amax(-2, keepdim=True) if m is None else torch.maximum(m, ac.amax(-2, True))
        psi = ar.c(base[..., j0 : j0 + chunk, :] * ar.exp(ar.c(ac - m_new)))
        Sc = ar.dot(psi.unsqueeze(-1), vc.unsqueeze(-2), -3, mm=True)  # [F, d_v]
        zc = ar.sum(psi, -2, name="den")  # [F]
        if S is None or z is None or m is None:
            S, z = Sc, zc
        else:
            alpha = ar.exp(ar.c(m - m_new))  # [1, 1]
            S = ar.add(ar.mul(alpha, S), Sc)
            z = ar.add(ar.mul(alpha.squeeze(-1), z, "den"), zc, "den")
        m = m_new
    assert S is not None and z is not None
    num = ar.dot(phi.unsqueeze(-1), S.unsqueeze(-3), -2, mm=True)
    den = ar.hook("den", ar.dot(phi, z.unsqueeze(-2), -1, name="den", mm=True))
    return ar.div(num, den.unsqueeze(-1))


def _chunked_features(
    method: str,
    ar: Arith,
    q,
    k,
    v,
    scale: float,
    chunk: int,
    split: bool = False,
    coeffs: Any = None,
) -> torch.Tensor:
    """The linear-time form: the state ``S = sum_j psi(k_j) v_j^T``, ``z = sum_j psi(k_j)``
    accumulated chunk by chunk, then ``phi(q) S / phi(q) z`` (``split``, ``coeffs``:
    :func:`_features`)."""
    phi, psi = _features(method, ar, q, k, scale, split, coeffs)
    S = z = None
    for j0 in range(0, k.shape[-2], chunk):
        pc, vc = psi[..., j0 : j0 + chunk, :], v[..., j0 : j0 + chunk, :]
        Sc = ar.dot(pc.unsqueeze(-1), vc.unsqueeze(-2), -3, mm=True)  # [F, d_v]
        zc = ar.sum(pc, -2, name="den")  # [F]
        S = Sc if S is None else ar.add(S, Sc)
        z = zc if z is None else ar.add(z, zc, "den")
    assert S is not None and z is not None
    num = ar.dot(phi.unsqueeze(-1), S.unsqueeze(-3), -2, mm=True)
    den = ar.hook("den", ar.dot(phi, z.unsqueeze(-2), -1, name="den", mm=True))
    return ar.div(num, den.unsqueeze(-1))


def _gates(log_g: torch.Tensor, n: int, d: int) -> torch.Tensor:
    lg = log_g.detach().to("cpu", torch.float64)
    if lg.dim() >= 2 and tuple(lg.shape[-2:]) == (n, d):
        return lg
    return lg.unsqueeze(-1).expand(*lg.shape, d)


def _gated_recurrent(ar: Arith, q, k, v, lg) -> torch.Tensor:
    """``S_t = diag(g_t) S_{t-1} + k_t v_t^T``, ``o_t = q_t S_t`` (in accumulate),
    ``g = exp(log g)``."""
    g = ar.hook("logits", ar.exp(lg))
    S = None
    outs = []
    for t in range(q.shape[-2]):
        kv = ar.mul(k[..., t, :, None], v[..., t, None, :])
        S = kv if S is None else ar.add(ar.mul(g[..., t, :, None], S), kv)
        outs.append(ar.dot(q[..., t, :, None], S, -2, mm=True))
    return torch.stack(outs, -2)


def _cumsum(ar: Arith, x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sequential prefix sums of log-gates (rounded where ``ar.spans`` says)."""
    x = x.movedim(dim, 0)
    out = [x[0]]
    for i in range(1, x.shape[0]):
        out.append(ar.r(out[-1] + x[i], ar.spans))
    return torch.stack(out).movedim(0, dim)


def _gated_chunked(ar: Arith, q, k, v, lg, chunk: int) -> torch.Tensor:
    """Chunks of ``chunk`` steps: inside a chunk the decays ``exp(sum of the log-gates of
    the span)``, the state carried across chunks (outputs in accumulate). ``gate_prefix``:
    every decay as ``exp(G_t - G_j)`` with ``G`` the fp32 prefix sums over the whole
    sequence, started at ``-level`` (the log-gates of a preceding context);
    ``carry_short``: the carried state decayed by the chunk's total less its last ``level``
    log-gates (an off-by-one at level 1)."""
    n, d = q.shape[-2:]
    prefix = None
    if ar.defect == "gate_prefix":
        f32 = FORMATS["fp32"]
        G = [torch.full(lg.shape[:-2] + (d,), -float(ar.level), dtype=torch.float64)]
        for t in range(n):
            G.append(rnd(G[-1] + lg[..., t, :], f32))
        prefix = torch.stack(G, -2)  # [n + 1, d]: prefix[t + 1] = G_t, prefix[0] = start
    S = None
    outs = []
    for t0 in range(0, n, chunk):
        qc, kc, vc = (x[..., t0 : t0 + chunk, :] for x in (q, k, v))
        lc = lg[..., t0 : t0 + chunk, :]
        c = lc.shape[-2]
        ii = torch.arange(c)
        lower = (ii[:, None] >= ii[None, :])[..., None]  # [t, j, 1]
        if prefix is None:
            rows = [torch.zeros_like(lc)]  # span[t, j] = sum_{l=j+1..t} lg_l
            for t in range(1, c):
                nxt = ar.r(rows[-1] + lc[..., t : t + 1, :], ar.spans)
                rows.append(torch.where(ii[:, None] < t, nxt, torch.zeros_like(nxt)))
            span = torch.stack(rows, -3)
            head = _cumsum(ar, lc, -2)  # sum_{l = t0..t}
            tail = torch.flip(_cumsum(ar, torch.flip(lc, [-2]), -2), [-2])  # sum_{l >= j}
            tail = torch.cat([tail[..., 1:, :], torch.zeros_like(tail[..., :1, :])], -2)
            total = head[..., -1, :]
        else:
            Gc = prefix[..., t0 + 1 : t0 + c + 1, :]  # G_t for t in the chunk
            G0 = prefix[..., t0, :]  # G before the chunk
            span = ar.c(Gc.unsqueeze(-2) - Gc.unsqueeze(-3))
            head = ar.c(Gc - G0.unsqueeze(-2))
            tail = ar.c(Gc[..., -1:, :] - Gc)
            total = ar.c(Gc[..., -1, :] - G0)
        D = torch.where(lower, ar.exp(torch.where(lower, span, 0.0)), 0.0)  # [t, j, d]
        qk = ar.mul(qc.unsqueeze(-2), kc.unsqueeze(-3))
        w = ar.sum(ar.mul(qk, D), -1)  # [t, j]
        o = ar.dot(w.unsqueeze(-1), vc.unsqueeze(-3), -2)
        if S is not None:
            qh = ar.mul(qc, ar.exp(head))
            o = ar.add(o, ar.dot(qh.unsqueeze(-1), S.unsqueeze(-3), -2, mm=True))
        kt = ar.mul(kc, ar.exp(tail))
        S_new = ar.dot(kt.unsqueeze(-1), vc.unsqueeze(-2), -3, mm=True)
        if S is not None:
            if ar.defect == "carry_short":  # the chunk's last log-gates left out
                total = _cumsum(ar, lc[..., : max(c - int(ar.level), 1), :], -2)[..., -1, :]
            S_new = ar.add(S_new, ar.mul(ar.exp(total).unsqueeze(-1), S))
        S = S_new
        outs.append(o)
    return torch.cat(outs, -2)


def _reduced(method: str, ar: Arith, q, k, v, params: dict[str, Any]) -> tuple:
    """The gated problem ``(q, k, v, log g, skip)`` a call reduces to, formed as a kernel
    forms it from its loads (docs/bounds/ssm.md, "The reduction"): gated's loaded log-gates;
    SSD's ``fl(A dt)``, keys ``fl(dt B)`` and skip ``fl(D x)``; the selective scan's (and
    the LTI SSM's, its step ``dt`` for every token) ``fl(delta A)``, keys ``fl(delta B)``
    (Euler) or ``fl(fl(expm1(fl(delta A))) / A) B`` (zoh) and skip ``fl(D u)``, one channel
    per batch item with one value column; H3's loaded log-decays and shifted keys (each
    tap's product in compute, their sum in accumulate). Every computed operand rounds in
    compute (``keys_narrow``, ``skip_narrow``: the keys, the skip, with ``level`` bits)."""
    n, d = q.shape[-2:]
    skip = None
    if method == "gated":
        return q, k, v, ar.load(_gates(params["log_g"], n, d)), None
    if method == "h3":
        sh = ar.load(torch.as_tensor(params["shift"], dtype=torch.float64))  # [d_k or 1, m]
        m = sh.shape[-1]
        kk = torch.cat([k.new_zeros(m - 1, d), k], -2)  # the keys before the first: 0
        taps = torch.stack([ar.c(sh[:, i] * kk[m - 1 - i : m - 1 - i + n]) for i in range(m)])
        k = ar.c(ar.sum(taps, 0))  # (held in compute, as the bound's kernel keeps them)
        ld = torch.as_tensor(params["log_decay"], dtype=torch.float64)
        if ld.numel() not in (1, d):
            raise ValueError("log_decay: the zoo's H3 takes one decay per key channel")
        lg = ar.load(ld.reshape(-1).expand(n, d))
    else:
        A = ar.load(torch.as_tensor(params["A"], dtype=torch.float64))
        D = params.get("D")
        if method == "ssd":
            dt = ar.load(torch.as_tensor(params["dt"]))[..., None]  # [T, 1]
            lg = ar.c(A * dt).expand(n, d)
            skip = None if D is None else ar.c(ar.load(torch.as_tensor(D)) * v)
            k = ar.c(dt * k)
        else:  # selective scan and LTI SSM, channels as the batch: [D, T, N] and [D, T, 1]
            if method == "ssm":  # one step per channel for every token
                step = torch.as_tensor(params["dt"], dtype=torch.float64).reshape(-1)
                delta = step.expand(v.shape[-1]).expand(n, v.shape[-1])
            else:
                delta = torch.as_tensor(params["delta"])
            dt = ar.load(delta).T[..., None]  # [D, T, 1]
            A = A.expand(v.shape[-1], d) if A.dim() == 1 else A
            lg = ar.c(dt * A[:, None, :])
            q, k, v = q.expand(v.shape[-1], n, d), k.expand(v.shape[-1], n, d), v.T[..., None]
            if D is not None:
                skip = ar.c(ar.load(torch.as_tensor(D))[:, None, None] * v)
            if params.get("discretization", "zoh" if method == "ssm" else "euler") == "zoh":
                k = ar.c(ar.div(ar.r(torch.expm1(lg), "exp"), A[:, None, :]) * k)
            else:
                k = ar.c(dt * k)
    if ar.defect == "keys_narrow":
        k = rnd(k, bits(int(ar.level)))
    if skip is not None and ar.defect == "skip_narrow":
        skip = rnd(skip, bits(int(ar.level)))
    return q, k, v, lg, skip


def _convolution(ar: Arith, q, k, v, lg) -> torch.Tensor:
    """The LTI SSM's direct convolution with per-token ``C, B`` (``attention.ssm``'s
    ``form="convolution"``): one decay ``exp(fl(l fl(dt A)))`` per lag ``l``, ``z_t =
    sum_{l <= t} decay_l fl(B_bar_{t-l} u_{t-l})`` per state, ``y_t = C_t . z_t`` (sums in
    accumulate, in the variant's order)."""
    n = q.shape[-2]
    lags = torch.arange(n, dtype=torch.float64)[:, None, None, None]  # [l, 1, 1, 1]
    decay = ar.exp(ar.c(lags * lg[..., :1, :]))  # [l, D, 1, N]
    w = ar.mul(k, v)  # [D, T, N]
    outs = []
    for t in range(n):
        terms = ar.mul(decay[: t + 1].flip(0)[:, :, 0], w[..., : t + 1, :].movedim(-2, 0))
        z = ar.sum(terms, 0)  # [D, N]
        outs.append(ar.dot(q[..., t, :], z, -1, mm=True))
    return torch.stack(outs, -1)[..., None]


# -- specs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelSpec:
    """One kernel of the zoo.

    Attributes
    ----------
    name : str
        Label (``correct``, ``pairwise``, ``online16``, ``acc_narrow@p=16``, ...).
    method : str
        The attention method it computes.
    fn : callable
        ``fn(q, k, v, **params)``.
    precision : Precision
        The declaration its author would write (block included).
    valid : tuple of Precision
        Every declaration the kernel is correct under (``precision`` first; then
        ``block=None``, any schedule, where that is also valid).
    base : str
        For a defect: the kernel it is applied to (``correct``, ``online16``, ...).
    defect, level
        The defect class and its severity (None for correct kernels and variants).
    how : dict
        The how-keywords its author declares with it (taylor's quadratic kernels compute
        the weights from the scores: ``{"form": "scores"}``), for the audit and the bound.
    """

    name: str
    method: str
    fn: Callable[..., torch.Tensor]
    precision: Precision
    valid: tuple[Precision, ...]
    base: str = "correct"
    defect: str | None = None
    level: Any = None
    how: dict[str, Any] = field(default_factory=dict)


def _make(
    method: str,
    prec: Precision,
    form: str,
    *,
    order: str = "seq",
    block: int = 0,
    fma: bool = False,
    limit: bool = False,
    ftz: bool = False,
    defect: str | None = None,
    level: Any = None,
    name: str = "",
) -> Callable[..., torch.Tensor]:
    """The kernel function of ``method`` in ``form`` (``quadratic``, ``online<B>``,
    ``chunked<C>``, ``recurrent``)."""

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **params: Any) -> torch.Tensor:
        if params.get("causal", method in GATED) != (method in GATED):
            raise ValueError("causal: the zoo's kernels are non-causal (gated, SSMs: causal)")
        ar = Arith(
            prec,
            order=order,
            block=block,
            fma=fma,
            limit=limit,
            ftz=ftz,
            defect=defect,
            level=level,
        )
        q64, k64, v64 = _loads(ar, q, k, v)
        sc = _default_scale(method, q.shape[-1], params.get("scale"))
        if method in GATED:
            qg, kg, vg, lg, skip = _reduced(method, ar, q64, k64, v64, params)
            if form == "recurrent":
                y = _gated_recurrent(ar, qg, kg, vg, lg)
            elif form == "convolution":
                y = _convolution(ar, qg, kg, vg, lg)
            else:
                y = _gated_chunked(ar, qg, kg, vg, lg, int(form.removeprefix("chunked")))
            if method == "gated":
                y = ar.c(y * ar.const(sc))
            elif skip is not None:  # the skip added to the output's sum
                y = ar.add(y, skip)
            if method in ("selective_scan", "ssm"):
                y = y[..., 0].T
        elif form == "quadratic":
            if method == "log":
                y = _log(ar, q64, k64, v64, sc, None)
            else:
                key = {"polynomial": "coeffs", "semiring": "semiring"}.get(method, "projection")
                extra = params.get(key)
                y = _quadratic(method, ar, q64, k64, v64, sc, extra)
        elif form.startswith("twopass"):
            y = _two_pass_softmax(ar, q64, k64, v64, sc, int(form.removeprefix("twopass")))
        elif form.startswith("online"):
            b = int(form.removeprefix("online"))
            if method == "log":
                y = _log(ar, q64, k64, v64, sc, b)
            else:
                y = _online_softmax(ar, q64, k64, v64, sc, b)
        elif form.startswith("based"):  # taylor's features in Based's form
            y = _chunked_features(method, ar, q64, k64, v64, sc, int(form[5:]), split=True)
        elif method == "favor":
            W = params["projection"]
            y = _favor_chunked(ar, q64, k64, v64, W, sc, int(form.removeprefix("chunked")))
        else:
            y = _chunked_features(
                method, ar, q64, k64, v64, sc, int(form.removeprefix("chunked")),
                coeffs=params.get("coeffs"),
            )  # fmt: skip
        return ar.store(y, q.dtype)

    fn.__name__ = f"{method}_{name or form}"
    return fn


#: The base form of each method's correct kernel and the block its author declares.
_CORRECT = {
    "softmax": ("quadratic", ONE_PASS),  # the row maximum is found before any exp
    "semiring": ("quadratic", ONE_PASS),
    "log": ("quadratic", ONE_PASS),  # the per-channel key maxima are found first
    "taylor": ("quadratic", ONE_PASS),  # no maximum, no rescaling: sums in any order
    "polynomial": ("quadratic", ONE_PASS),
    "linear": ("quadratic", ONE_PASS),
    "favor": ("quadratic", ONE_PASS),  # the keys' largest exponent is found first
    "gated": ("recurrent", None),  # one exp and one product per step
    "ssd": ("recurrent", None),
    "selective_scan": ("recurrent", None),
    "ssm": ("recurrent", None),
    "h3": ("recurrent", None),
}


def _how(method: str, form: str) -> dict[str, Any]:
    """The how-keywords of a kernel of ``method`` in ``form``: taylor's (the polynomial's)
    quadratic form computes ``T_2(s)`` (Horner) from the scores (the score form's bound);
    its chunked form uses features (the default); the LTI SSM's direct convolution."""
    if method in ("taylor", "polynomial") and form == "quadratic":
        return {"form": "scores"}
    return {"form": form} if method == "ssm" and form == "convolution" else {}


def _declared(method: str, prec: Precision, blk: Any, split: bool = False) -> Precision:
    """The declaration of a zoo kernel: ``prec`` with its block and ``sums="linear"``: the
    zoo's kernels keep their sums as values and divide once, sum each block of keys on its
    own before adding it to the running sums (``block_sums="separate"``), and apply each
    constant once (``constants="folded"``; ``split``: Based's roots on both sides,
    ``"any"``)."""
    apart = blk is not None and blk < ONE_PASS
    return replace(
        prec,
        block=blk,
        sums="linear",
        block_sums="separate" if apart else "any",
        constants="any" if split else "folded",
    )


def _any_schedule(p: Precision) -> Precision:
    """``p`` under ``block=None``: any schedule."""
    return replace(p, block=None, block_sums="any")


def correct_kernel(method: str, prec: Precision) -> KernelSpec:
    """The correct kernel of ``method`` under the formats of ``prec``."""
    form, blk = _CORRECT[method]
    p = _declared(method, prec, blk)
    valid = (p,) if blk is None else (p, _any_schedule(p))
    fn = _make(method, prec, form, name="correct")
    return KernelSpec("correct", method, fn, p, valid, how=_how(method, form))


def _variant_plan(method: str) -> list[tuple[str, str, dict[str, Any], Any]]:
    """(name, form, schedule keywords, declared block) of the correct variants."""
    base_form, base_blk = _CORRECT[method]
    plan: list[tuple[str, str, dict[str, Any], Any]] = [
        ("pairwise", base_form, {"order": "pairwise"}, base_blk),
        ("blocked16", base_form, {"order": "blocked", "block": 16}, base_blk),
        ("blocked64", base_form, {"order": "blocked", "block": 64}, base_blk),
        ("blocked256", base_form, {"order": "blocked", "block": 256}, base_blk),
        ("fma", base_form, {"fma": True}, base_blk),
        ("sorted", base_form, {"order": "sorted"}, base_blk),
        ("elementary_limit", base_form, {"limit": True}, base_blk),
        ("ftz", base_form, {"ftz": True}, base_blk),
        ("stress", base_form, {"order": "sorted", "limit": True, "ftz": True}, base_blk),
    ]
    if method in ("softmax", "log"):
        plan += [("online16", "online16", {}, 16), ("online64", "online64", {}, 64)]
    elif method != "semiring":  # (a semiring: the quadratic form only; gated: a chunk's
        # decays; FAVOR+: a chunk may rescale the state)
        rescaled = method in GATED or method == "favor"
        plan += [("chunked16", "chunked16", {}, 16 if rescaled else ONE_PASS)]
        plan += [("chunked64", "chunked64", {}, 64 if rescaled else ONE_PASS)]
    if method == "softmax":  # the exps recomputed against a first pass's sum (passes=2)
        plan += [("twopass16", "twopass16", {}, 16)]
    if method == "taylor":  # constants split over both sides (Based)
        plan += [("based64", "based64", {}, ONE_PASS)]
    if method == "ssm":  # one exp per lag, sums over lags (its direct convolution)
        plan += [("convolution", "convolution", {}, None)]
    return plan


def _valid(method: str, name: str, p: Precision) -> tuple[Precision, ...]:
    """The declarations a variant is correct under: its own, and ``block=None`` (any
    schedule) except for gated chunks, whose decays exp a sum of up to ``block``
    log-gates (only a declared block covers that)."""
    if p.block is None or (method in GATED and name.startswith("chunked")):
        return (p,)
    return (p, _any_schedule(p))


def variant_kernels(method: str, prec: Precision) -> list[KernelSpec]:
    """The correct variants: other summation orders, blocking, FMA dot products, online
    softmax (softmax, log) and chunked linear-time forms (taylor, linear, gated)."""
    out = []
    for name, form, kw, blk in _variant_plan(method):
        p = _declared(method, prec, blk, split=form.startswith("based"))
        if form.startswith("twopass"):
            p = replace(p, passes=2)
        fn = _make(method, prec, form, name=name, **kw)
        out.append(KernelSpec(name, method, fn, p, _valid(method, name, p), how=_how(method, form)))
    return out


@dataclass(frozen=True)
class DefectClass:
    """A defect class: what it does, its severity ladder and where it applies.

    ``levels`` go from mild to severe; ``base`` is the form it is applied to per method
    (``None``: the correct kernel) and ``methods`` the methods it applies to."""

    name: str
    what: str
    levels: tuple[Any, ...]
    level_name: str
    methods: tuple[str, ...]
    base: dict[str, str] | None = None


_NORMALIZED = ("softmax", "semiring", "log", "taylor", "polynomial", "linear", "favor")
_EXP = ("softmax", "semiring", "log", "favor", *GATED)
_SSM = ("ssd", "selective_scan", "ssm")

#: The defect classes (keys are the ``defect`` names of :class:`Arith`).
DEFECTS: dict[str, DefectClass] = {
    d.name: d
    for d in (
        DefectClass(
            "den_narrow",
            "the normalizer sum rounded to a p-bit significand (fp16: 11, bf16: 8)",
            (20, 16, 13, 11, 8),
            "p",
            _NORMALIZED,
        ),
        DefectClass(
            "acc_narrow",
            "every accumulation (products and sums, the state) rounded to p bits",
            (20, 16, 13, 11, 8),
            "p",
            METHODS,
        ),
        DefectClass(
            "logits_narrow",
            "scores stored with p bits (softmax/taylor/linear: q.k; log and FAVOR+: the "
            "exponents; gated and SSMs: the decays g)",
            (20, 16, 13, 11, 8),
            "p",
            METHODS,
        ),
        DefectClass(
            "probs_narrow",
            "weights cast to p bits before the value product only (the normalizer sums the "
            "unrounded weights)",
            (20, 16, 13, 11, 8),
            "p",
            _NORMALIZED,
        ),
        DefectClass(
            "values_narrow", "v rounded to p bits after loading", (16, 13, 11, 8, 5), "p", METHODS
        ),
        DefectClass(
            "exp_sin",
            "approximate exp: exp(x) (1 + 2^-k sin(1000 x))",
            (22, 19, 16, 13, 10),
            "k",
            _EXP,
        ),
        DefectClass(
            "exp2_poly",
            "software exp2 with a truncated Taylor polynomial of degree P for 2^f",
            (7, 6, 5, 4, 3),
            "P",
            _EXP,
        ),
        DefectClass(
            "rcp_approx",
            "division as a times an approximate reciprocal (1/b)(1 + 2^-k sin(1000 b))",
            (22, 19, 16, 13, 10),
            "k",
            _NORMALIZED,
        ),
        DefectClass(
            "flush_small",
            "weights below t times the row's largest set to 0 (log: the key factors)",
            (2.0**-32, 2.0**-24, 2.0**-18, 2.0**-14, 2.0**-10),
            "t",
            _NORMALIZED,
        ),
        DefectClass(
            "online_den_lazy",
            "online schedule: the normalizer not rescaled when the running maximum grows "
            "by less than delta (the numerator is)",
            (2.0**-16, 2.0**-12, 2.0**-8, 2.0**-4, 1.0),
            "delta",
            ("softmax", "log"),
            {"softmax": "online16", "log": "online16"},
        ),
        DefectClass(
            "online_rescale_narrow",
            "online schedule: the rescale factor exp(m_old - m_new) from maxima kept with p "
            "bits (the weights use the exact maximum)",
            (20, 16, 13, 11, 8),
            "p",
            ("softmax", "log"),
            {"softmax": "online16", "log": "online16"},
        ),
        DefectClass(
            "trunc",
            "round toward zero instead of to nearest: 1 the store, 2 + the division, 3 + exp, "
            "4 + all elementwise work, 5 + the accumulations",
            (1, 2, 3, 4, 5),
            "level",
            METHODS,
        ),
        DefectClass(
            "den_eps",
            "eps added to the normalizer",
            (2.0**-30, 2.0**-26, 2.0**-22, 2.0**-18, 2.0**-14),
            "eps",
            _NORMALIZED,
        ),
        DefectClass(
            "tf32",
            "operands of the matrix products rounded to p bits (TF32: p = 11)",
            (19, 16, 13, 11, 9),
            "p",
            METHODS,
        ),
        DefectClass(
            "wrong_scale",
            "the scale multiplied by 1 + 2^-k (FAVOR+: its root)",
            (22, 19, 16, 13, 10),
            "k",
            ("softmax", "semiring", "log", "taylor", "polynomial", "favor", "gated"),
        ),
        DefectClass(
            "gate_prefix",
            "decays exp(G_t - G_j) from fp32 prefix sums over the whole sequence, after a "
            "preceding context of log-gates summing to -G0",
            (0.0, 16.0, 256.0, 4096.0, 65536.0),
            "G0",
            GATED,
            dict.fromkeys(GATED, "chunked16"),
        ),
        DefectClass(
            "carry_short",
            "the state carried between chunks decayed by the chunk's total less its last L "
            "log-gates (L = 1: an off-by-one)",
            (1, 2, 4, 8, 15),
            "L",
            GATED,
            dict.fromkeys(GATED, "chunked16"),
        ),
        DefectClass(
            "keys_narrow",
            "the computed keys (SSD: dt B, selective scan and SSM: delta B, or zoh's; H3: the "
            "shifted keys) held with p bits",
            (20, 16, 13, 11, 8),
            "p",
            (*_SSM, "h3"),
        ),
        DefectClass(
            "skip_narrow",
            "the skip D u rounded to p bits",
            (20, 16, 13, 11, 8),
            "p",
            _SSM,
        ),
    )
}


def allowed(defect: str, prec: Precision, level: Any) -> bool:
    """Whether a level of ``defect`` stays within what ``prec`` declares, so that a kernel
    with it is correct and flagging it would be a false positive: an approximate exp or
    reciprocal whose relative error, with the zoo's rounding to compute, is within the
    elementary model's allowance (``Elementary``: ``k`` ulps of float32, or of compute when
    wider, ``|err| <= 2 k u``, plus ``narrow`` ulps of a compute format narrower than
    float32). The truncated polynomial's error is bounded by its Taylor remainder,
    ``2 (ln 2)^(P+1) / (P+1)!`` relative (``2^f <= 2``)."""
    el, fc = prec.elementary, prec.compute
    f32 = FORMATS["fp32"]
    narrow = fc.precision < f32.precision

    def allowance(ulps: float) -> float:
        return 2 * ulps * (f32.u if narrow else fc.u) + (2 * el.narrow * fc.u if narrow else 0.0)

    if defect == "exp_sin":
        return (1 + 2.0 ** -float(level)) * (1 + fc.u) - 1 <= allowance(el.exp)
    if defect == "exp2_poly":
        rem = 2 * math.log(2) ** (int(level) + 1) / math.factorial(int(level) + 1)
        return (1 + rem) * (1 + fc.u) - 1 <= allowance(el.exp)
    if defect == "rcp_approx":  # the reciprocal and the product, each rounded to compute
        return (1 + 2.0 ** -float(level)) * (1 + fc.u) ** 2 - 1 <= allowance(el.div)
    return False


def _base_form(method: str, base: str) -> tuple[str, Any]:
    if base == "correct":
        return _CORRECT[method]
    for name, form, _, blk in _variant_plan(method):
        if name == base:
            return form, blk
    raise ValueError(f"base: no variant {base!r} of {method!r}")


def defect_kernels(method: str, prec: Precision, defect: str) -> list[KernelSpec]:
    """The severity ladder of ``defect`` applied to ``method`` (mild to severe), each with
    the declaration of the kernel it is applied to."""
    dc = DEFECTS[defect]
    if method not in dc.methods:
        return []
    base = (dc.base or {}).get(method, "correct")
    form, blk = _base_form(method, base)
    p = _declared(method, prec, blk)
    out = []
    for lv in dc.levels:
        label = f"{defect}@{dc.level_name}={_fmt_level(lv)}"
        fn = _make(method, prec, form, defect=defect, level=lv, name=label)
        out.append(KernelSpec(label, method, fn, p, (p,), base, defect, lv, _how(method, form)))
    return out


def _fmt_level(lv: Any) -> str:
    if isinstance(lv, float) and lv > 0 and math.log2(lv).is_integer() and abs(lv) < 2**-2:
        return f"2^{int(math.log2(lv))}"
    return f"{lv:g}" if isinstance(lv, float) else str(lv)


def zoo(method: str, prec: Precision) -> dict[str, Any]:
    """Every kernel of ``method`` under the formats of ``prec``: ``correct`` (a spec),
    ``variants`` (a list) and ``defects`` (defect class -> its ladder)."""
    return {
        "correct": correct_kernel(method, prec),
        "variants": variant_kernels(method, prec),
        "defects": {name: ks for name in DEFECTS if (ks := defect_kernels(method, prec, name))},
    }


def base_kernel(method: str, prec: Precision, base: str) -> KernelSpec:
    """The correct kernel or variant named ``base``."""
    if base == "correct":
        return correct_kernel(method, prec)
    for ks in variant_kernels(method, prec):
        if ks.name == base:
            return ks
    raise ValueError(f"base: no variant {base!r} of {method!r}")


def method_inputs(
    method: str, family: str, *, n: int, d: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Inputs of one family in the storage ``dtype`` and the method's keywords: linear gets
    the features ``elu(x) + 1`` of q and k (rounded to ``dtype``), taylor ``degree=2``,
    FAVOR+ an orthogonal projection of ``2 d`` features (float64, the kernel rounds it),
    gated per-channel log-gates ``-U(0, 1/2)`` (rounded to ``dtype``) and ``causal=True``,
    the state-space models the audit's own parameters (:func:`.default_params`: steps
    through every regime of the decay, a skip; exact in every storage format)."""
    from attnprec.attention.linear import elu1
    from attnprec.testing.inputs import make_inputs
    from attnprec.testing.params import default_params

    g = torch.Generator().manual_seed(seed)
    q, k, v = make_inputs(family, n_q=n, d_k=d, dtype=dtype, generator=g)
    params: dict[str, Any] = {}
    if method == "favor":  # 2 d features, drawn once per family
        from attnprec.attention.favor import favor_projection

        params["projection"] = favor_projection(2 * d, d, generator=g)
    elif method == "linear":
        q, k = (elu1(x.double()).float().to(dtype) for x in (q, k))
        params["feature_map"] = None
    elif method == "taylor":
        params["degree"] = 2
    elif method in ("polynomial", "semiring"):
        params = default_params(method, d, n, seed)
    elif method == "gated":
        lg = -0.5 * torch.rand(n, d, generator=g, dtype=torch.float64)
        params["log_g"] = lg.float().to(dtype)
        params["causal"] = True
    elif method in (*_SSM, "h3"):
        params = default_params(method, d, n, seed)
    return q, k, v, params
