"""Witnesses of soundness terms added since 2026-12-05 that no test exercised (a mutation
review, 2026-12-07). Each emulates a kernel that rounds every step as its declaration
allows, takes the adversarial legal choice, and asserts that its error is within the
bound (or the probabilistic level): each passes on the code as it is and fails where its
term is removed or halved (the mutant named in its docstring).

docs/audit_power.md, "The test suite's power over the bound code", lists the mutants.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from attnprec.analysis.bounds import attention_error_bound
from attnprec.analysis.precision import ONE_PASS, Elementary, Precision, round_to
from attnprec.analysis.reference import reference

F64 = torch.float64


def _r(x: float, fmt: str, rounding: str = "rne") -> float:
    return float(round_to(torch.tensor(float(x), dtype=F64), fmt, rounding))


def _err(y: torch.Tensor, ref) -> torch.Tensor:  # noqa: ANN001
    return (y - ref.value).abs() + ref.radius


def test_witness_split_kv_lse_rounds_a_tie_below_the_log_floor():
    """Split-KV's cap lift is ``2 f_l``, not ``f_l``: the combine's ``lse = fl(M + log S)``
    with ``log S = log 1`` returning ``-f_l = -4u`` (the declared floor) lands on a tie
    where ``M`` (the one split's lse, in ``[4, 8)``, ulp ``2^-21 = 2 f_l``) has an odd last
    bit, and rounds to even: ``M - 2 f_l``. The split's weight ``exp(2^-21)`` then comes
    out 4 ulps high and ``o_s = v / 1`` 2 ulps high: y is 20 u off, the bound 22 u (18 u
    with the lift halved: 1.11x outside). One key, one split, fp32, default Elementary.
    Mutant: ``lift = 2 * fl * ...`` -> ``lift = fl * ...`` (softmax.py, _LseForm.factors)."""
    u = 2.0**-24
    M = 5.0 + 2.0**-21  # the one logit q k, odd in its last bit; m = M, l_s = exp(0) = 1
    q, k = torch.tensor([[M]], dtype=F64), torch.tensor([[1.0]], dtype=F64)
    v = torch.tensor([[1.0 + 3 * 2.0**-23]], dtype=F64)
    lse_s = M  # m + log(l_s) = M + log(1), the log exact here
    lse = _r(lse_s - 4 * u, "fp32")  # M + log S, log S = log(1) = -4u (log_abs = 4)
    assert lse_s - lse == 8 * u  # the tie went to even, below M by 2 f_l
    w = _r(math.exp(lse_s - lse), "fp32") + 4 * 2.0**-23  # exp within 4 ulps (exp = 4)
    assert abs(w - math.exp(lse_s - lse)) <= 4 * 2.0**-23
    o_s = float(v) + 2 * 2.0**-23  # acc / l = v / 1 within 2 ulps (div = 2)
    y = torch.tensor([[_r(w * o_s, "fp32")]], dtype=F64)
    err = _err(y, reference("softmax", q, k, v, scale=1.0))
    assert 20 * u <= float(err) <= 20 * u * (1 + 1e-9)  # (the reference's radius)
    for block in (None, 1):
        b = attention_error_bound("softmax", q, k, v, Precision("fp32", block=block), scale=1.0)
        assert bool((err <= b.total).all()), (float(err) / u, float(b.total) / u)


def test_witness_weights_just_above_an_ulp_after_a_sink_are_absorbed_one_signed():
    """The absorbed-terms band is ``2 u`` of the normalizer, not ``u``: after a sink
    (weight 1) a weight ``w`` in ``(u, 2u)`` of the running fp32 normalizer rounds up to its
    ulp ``2u``, an error ``2u - w`` of one sign for every such key. 4096 keys of distinct
    weights in ``(1.05u, 1.95u)``, values 1 (the sink's 0): a correct sequential fp32
    kernel sits at 0.12 of the level, 8.4x outside it with the band halved (2.9x under
    ``sums=None``). Mutant: ``small = p <= 2 * u`` -> ``p <= u`` (quotient.absorbable)."""
    u, K = 2.0**-24, 4096
    ws = 1.05 * u + 0.9 * u * torch.arange(K, dtype=F64) / K
    k = torch.cat([torch.zeros(1, 1, dtype=F64), torch.log(ws).float().double()[:, None]])
    q = torch.ones(1, 1, dtype=F64)
    v = torch.cat([torch.zeros(1, 1, dtype=F64), torch.ones(K, 1, dtype=F64)])
    s = q.float() @ k.float().T
    p = torch.exp((s - s.amax(-1, keepdim=True)).double()).float()  # correctly rounded
    num, den = torch.zeros(1, 1), torch.zeros(1, 1)
    for j in range(K + 1):  # one key at a time, fp32
        num += p[:, j : j + 1] * v[j].float()
        den += p[:, j : j + 1]
    y = (num / den).double()
    err = _err(y, reference("softmax", q, k, v, scale=1.0))
    for sums in ("linear", None):
        prec = Precision("fp32", block=ONE_PASS, sums=sums)
        b = attention_error_bound("softmax", q, k, v, prec, scale=1.0)
        assert bool((err <= b.typical.total).all()), (sums, float(err / b.typical.total))


def test_witness_an_output_store_that_truncates_loses_a_whole_ulp():
    """The output store under ``rounding="rtz"`` is charged a whole ulp of its binade, not
    half: eight keys of equal logit, one value 1 and seven ``1 + 2^-7`` (bf16), so ``y = 1
    + 7/8 2^-7`` exactly in fp32, truncated to bf16's 1: 7/8 of an ulp, 0.87 of the bound,
    1.75x outside the half ulp. Mutant: ``store_error(y_abs + e2, fs, precision.rounding)``
    -> ``store_error(y_abs + e2, fs)`` (quotient.finish)."""
    n = 8
    q, k = torch.zeros(1, 1, dtype=F64), torch.zeros(n, 1, dtype=F64)
    v = torch.full((n, 1), 1.0 + 2.0**-7, dtype=F64)
    v[0] = 1.0
    acc = 0.0
    for j in range(n):  # exp(0) = 1 each, the sums exact in fp32
        acc = _r(acc + float(v[j]), "fp32")
    y32 = _r(acc / n, "fp32")
    y = torch.tensor([[_r(y32, "bf16", "rtz")]], dtype=F64)
    err = _err(y, reference("softmax", q, k, v, scale=1.0))
    assert 7 / 8 * 2.0**-7 <= float(err) <= 7 / 8 * 2.0**-7 * (1 + 1e-9)
    prec = Precision("bf16", compute="fp32", rounding="rtz")
    b = attention_error_bound("softmax", q, k, v, prec, scale=1.0)
    assert bool((err <= b.total).all()), float(err / b.total)


def test_witness_the_argmax_term_formed_in_one_fma_is_below_one():
    """The normalizer's lower bound under a running maximum is the argmax key's term as an
    FMA forms it, ``exp2(fma(s, C, -fl(s C)))``, not 1: with fp16 compute, ``s C`` in
    ``[16384, 32768)`` rounds to a multiple of 16, so the argmax term can be ``2^-7.98``.
    One key, ``v = 2^-17``: ``N = p v`` (fp32), just above half of fp16's least subnormal
    spacing, is taken into fp16 for the division as 2^-24 and ``y = 2^-24 / p`` is about
    twice v: 6e-4 of the bound, 21x outside with the term taken as 1. Mutant: ``top1
    = ...`` -> ``torch.ones_like(w_lo)`` (softmax._block)."""
    C = _r(1 / math.log(2), "fp16")  # log2(e) held in compute
    s = max((8.0 * i for i in range(1420, 2838)), key=lambda x: _r(x * C, "fp16") - x * C)
    m = _r(s * C, "fp16")  # the row maximum of fl(s C)
    t = _r(s * C - m, "fp16")  # fma(s, C, -m), exact here
    assert t < -7.9
    v0 = 2.0**-17
    p = _r(2.0**t, "fp16")  # exp2 in compute, correctly rounded
    N, D = _r(p * v0, "fp32"), p  # the product in accumulate, the sums in fp32
    y = torch.tensor([[_r(_r(N, "fp16") / _r(D, "fp16"), "fp16")]], dtype=F64)
    q, k, v = (torch.tensor([[x]], dtype=F64) for x in (s, 1.0, v0))
    err = _err(y, reference("softmax", q, k, v, scale=1.0))
    assert float(err) > 0.9 * v0
    for block in (None, ONE_PASS):
        prec = Precision("fp16", compute="fp16", accumulate="fp32", block=block)
        b = attention_error_bound("softmax", q, k, v, prec, scale=1.0)
        assert bool((err <= b.total).all()), float(err / b.total)


def test_witness_a_decay_just_above_the_threshold_that_its_exp_puts_below():
    """Which decays may fall below ``T_e`` takes the exp's relative error ``k_e`` as well as
    its argument's: the gate's exact decay ``e^-8.9922 = 1.019 T_e`` (fp16 compute, ``T_e =
    2^-13``), an exp declared within 64 fp16 ulps returns ``0.955 T_e``, flushed, and the
    decayed term (k = v = 100) is lost: 0.94 of the bound, 11.9x outside without ``k_e``
    in the test. Recurrent, one exp per step. Mutant: ``low_arg = logD - Lam + log1p(-k_e)``
    -> ``logD - Lam`` (gated._block)."""
    el = Elementary(narrow=64.0)
    prec = Precision("fp16", compute="fp16", accumulate="fp32", sums="linear", elementary=el)
    k_e, T_e = prec.op_error("exp"), math.exp(prec.exp_exact_log())
    lg1 = -8.9921875  # fp16
    q = torch.ones(2, 1, dtype=F64)
    k = torch.tensor([[100.0], [0.0]], dtype=F64)
    v = torch.tensor([[100.0], [0.0]], dtype=F64)
    lg = torch.tensor([[0.0], [lg1]], dtype=F64)
    g1 = math.exp(lg1) * (1 - 0.999 * k_e)  # the exp within its declared error, down
    assert math.exp(lg1) > T_e > g1  # exact above T_e, computed below: flushed
    out = torch.tensor([[1e4], [0.0]], dtype=F64)  # o_0 = q k v (exact in fp16); o_1 = 0 g1 ...
    err = _err(out, reference("gated", q, k, v, log_g=lg, scale=1.0))
    assert float(err[1, 0]) > 1.2
    eb = attention_error_bound("gated", q, k, v, prec, log_g=lg, scale=1.0)
    assert bool((err <= eb.total).all()), float((err / eb.total).max())


def test_witness_subnormal_weights_cast_lose_half_a_spacing_each():
    """The weights' cast is charged ``eta_w`` absolute per key (half of the cast format's
    least subnormal spacing, over ``weights_scale``), not only ``u_w`` relative: weights
    ``1.49 2^-24`` of fp32 cast to fp16 (``p.to(fp16)`` before the product with ``v``, the
    normalizer summed before the cast) round to the subnormal ``2^-24``, each losing 0.98
    ``eta_w`` of its value 1000; a sink of weight 1 and value 0 keeps the normalizer near 1.
    0.97 of the bound, 164x outside without ``eta_w``. Mutant: ``eta_w /= weights_scale``
    -> ``eta_w = 0.0`` (softmax._block)."""
    K = 16
    x = float(torch.tensor(math.log(1.49 * 2.0**-24)).float())
    q = torch.ones(1, 1, dtype=F64)
    k = torch.tensor([[0.0]] + [[x]] * K, dtype=F64)
    v = torch.tensor([[0.0]] + [[1000.0]] * K, dtype=F64)
    p = torch.exp((q.float() @ k.float().T).double()).float()  # fp32, correctly rounded
    pw = round_to(p.double(), "fp16")  # the cast (numerator path)
    assert float(pw[0, 1]) == 2.0**-24
    N = (pw.float() @ v.float()).double()  # fp32 (exact here)
    D = p.sum(-1, keepdim=True).double()  # fp32, summed before the cast
    y = round_to(N / D, "fp32")
    err = _err(y, reference("softmax", q, k, v, scale=1.0))
    for block in (None, ONE_PASS):
        prec = Precision("fp32", weights="fp16", block=block)
        b = attention_error_bound("softmax", q, k, v, prec, scale=1.0)
        assert bool((err <= b.total).all()), float(err / b.total)


def test_witness_exps_below_the_normal_range_within_one_subnormal_spacing():
    """A key whose exps may fall below the normal range is charged the lesser of ``U_e``
    per exp and what its terms weigh *plus a subnormal spacing per exp* (quotient.flushed):
    below the normal range an exp is within one subnormal spacing of its result
    (``Elementary.exp_flush``), so ``exp(-30) = 9e-14`` may return fp16's least subnormal
    ``2^-24``. Sixteen such keys of value 100 beside a sink of weight 1 and value 0, fp16
    compute over fp32 sums: 0.04 (one shift: 0.29) of the bound, 11x (17x) outside with
    the spacing dropped. Mutant: ``lost = torch.addcmul(value, n_ex, unit(u_sub, 4))`` ->
    ``value.clone()`` (quotient.flushed)."""
    K = 16
    q = torch.ones(1, 1, dtype=F64)
    k = torch.tensor([[0.0]] + [[-30.0]] * K, dtype=F64)
    v = torch.tensor([[0.0]] + [[100.0]] * K, dtype=F64)
    w = torch.tensor([[1.0] + [2.0**-24] * K], dtype=F64)  # exp(0) = 1; exp(-30) as 2^-24
    N, D = w @ v, w.sum(-1, keepdim=True)  # exact in fp32
    y = round_to(round_to(N, "fp16") / round_to(D, "fp16"), "fp16")  # the division in fp16
    err = _err(y, reference("softmax", q, k, v, scale=1.0))
    assert float(err) > 9e-5
    for block in (None, ONE_PASS):
        prec = Precision("fp16", compute="fp16", accumulate="fp32", block=block)
        b = attention_error_bound("softmax", q, k, v, prec, scale=1.0)
        assert bool((err <= b.total).all()), float(err / b.total)


def test_witness_the_log_floor_of_a_half_precision_compute():
    """At fp16 compute a log near 1 errs by ``Precision.log_floor()``, ``log_abs`` units of
    float32 *plus* ``2 narrow u_c`` (an approximate half-precision log): split-KV's cap
    lifts by it. One key, one split, fp16 compute, default Elementary: ``l = exp(0)``
    returned 2^-10 high, its log 2^-10 + f_l high, so ``lse_s = fl(4 + 0.00205)`` rounds
    up to ``4 + 2^-8``; the combine's ``exp(0)`` returned 2^-10 low, its log ``-2^-10 -
    f_l``, and ``fl(lse_s - 0.00205)`` rounds down to 4: the split's weight is ``exp(2^-8)``
    (5 ulps high). y is 13.3 u_c (relative) off: 0.90 of the bound, 1.28x outside with the
    floor's fp16 part dropped (the log's error taken as 4 u32 only). Mutant:
    ``log_abs * _U32 + 2.0 * narrow * uc`` -> ``log_abs * _U32`` (Precision.log_floor)."""
    prec = Precision("fp16", compute="fp16")
    k_e, k_d, k_l = (prec.op_error(op) for op in ("exp", "div", "log"))
    # the log's absolute floor as Precision documents it (not log_floor(), the code tested)
    el = prec.elementary
    f_l = el.log_abs * 2.0**-24 + 2 * el.narrow * 2.0**-11

    def far(x: float, tol: float, side: int) -> float:  # the fp16 farthest within tol
        y = np.float16(x + side * tol)
        while side * (float(y) - x) > tol:
            y = np.nextafter(y, np.float16(-side * np.inf))
        return float(y)

    v = 1.5
    q, k, vv = (torch.tensor([[x]], dtype=F64) for x in (4.0, 1.0, v))
    p = far(1.0, k_e, 1)  # exp(s - m) = exp(0) within k_e: l = p
    acc = _r(p * v, "fp16")
    o_s = far(acc / p, k_d * acc / p, 1)  # acc / l within k_d
    lse_s = _r(4.0 + far(math.log(p), k_l * math.log(p) + f_l, 1), "fp16")  # m + log(l)
    S = far(1.0, k_e, -1)  # the combine's exp(lse_s - max) = exp(0), within k_e
    assert (p, S) == (1.0 + 2.0**-10, 1.0 - 2.0**-10)
    lse = _r(lse_s + far(math.log(S), -k_l * math.log(S) + f_l, -1), "fp16")  # max + log S
    assert (lse_s, lse) == (4.0 + 2.0**-8, 4.0)
    w = far(math.exp(lse_s - lse), k_e * math.exp(lse_s - lse), 1)  # exp(lse_s - lse)
    y = torch.tensor([[_r(w * o_s, "fp16")]], dtype=F64)
    err = _err(y, reference("softmax", q, k, vv, scale=1.0))
    assert float(err) >= 13 * 2.0**-11 * v
    for block in (None, 1):
        decl = Precision("fp16", compute="fp16", block=block)
        b = attention_error_bound("softmax", q, k, vv, decl, scale=1.0)
        assert bool((err <= b.total).all()), float(err / b.total)


def test_witness_zoh_key_underflow_carried_by_the_division_by_a():
    """A zoh key formed as ``expm1(dt A) B`` first and divided by ``A`` last: the product
    underflows to fp16's subnormal grid, and ``1 / |A| = 1024`` carries its error into the
    key (2^-14 for an exact 2^-15). The underflow allowance counts ``max(1, 1 / |A~|)``:
    0.097 of the bound; without that factor the bound is 24.8x below the error.
    Mutant: ``und *= 1 / |A~|`` left out (ssm.py, the zoh key model; a mutation review,
    2026-12-07)."""
    prec = Precision("fp16", compute="fp16", accumulate="fp16")
    A = torch.tensor([[-(2.0**-10)]], dtype=F64)
    C = torch.tensor([[1.0]], dtype=F64)
    B = torch.tensor([[2.0**-15 + 2.0**-22]], dtype=F64)  # an fp16 subnormal
    u = torch.tensor([[1000.0]], dtype=F64)
    a, b = float(A), float(B)
    e = _r(math.expm1(_r(1.0 * a, "fp16")), "fp16")
    bbar = _r(_r(e * b, "fp16") / a, "fp16")  # the product underflows, then / A
    y = torch.tensor([[_r(_r(bbar * float(u), "fp16") * 1.0, "fp16")]], dtype=F64)
    ref = reference("ssm", C, B, u, A=A, dt=1.0)
    eb = attention_error_bound("ssm", C, B, u, prec, A=A, dt=1.0)
    ratio = float(_err(y, ref) / eb.rounding)
    assert 0.05 < ratio <= 1.0, ratio


def test_witness_score_error_larger_than_the_score_itself():
    """The score form's polynomial error takes ``(S + sigma)^p``, not only first-order
    terms in ``sigma``: a dot that cancels exactly (``q.k = 0``) summed in order in bf16
    comes out 15 (4096 + 17 -> 4128), so ``1 + s^2`` is 57.25 for an exact 1 and the output
    0.965 for an exact 0. The bound names the row ("normalizer may vanish"); with ``T = S``
    it was finite, 0.0286, 33.8x below the error.
    Mutant: ``T = upper(S + sigma, 1)`` -> ``T = S`` (_scores.py, _block)."""
    prec = Precision("bf16", compute="bf16", accumulate="bf16")
    q = torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=F64)
    k = torch.tensor([[4096.0, 17.0, -4096.0, -17.0], [0.0, 0.0, 0.0, 0.0]], dtype=F64)
    v = torch.tensor([[1.0], [-1.0]], dtype=F64)
    w = []
    for j in range(2):
        acc = _r(float(q[0, 0] * k[j, 0]), "bf16")
        for c in range(1, 4):
            acc = _r(acc + _r(float(q[0, c] * k[j, c]), "bf16"), "bf16")
        s = _r(0.5 * acc, "bf16")
        w.append(_r(_r(s * s, "bf16") + 1.0, "bf16"))
    num = _r(_r(w[0] * 1.0, "bf16") + _r(w[1] * -1.0, "bf16"), "bf16")
    y = torch.tensor([[_r(num / _r(w[0] + w[1], "bf16"), "bf16")]], dtype=F64)
    ref = reference("polynomial", q, k, v, coeffs=[1.0, 0.0, 1.0])
    eb = attention_error_bound("polynomial", q, k, v, prec, coeffs=[1.0, 0.0, 1.0], form="scores")
    assert float(_err(y, ref)) > 0.9
    assert bool((_err(y, ref) <= eb.total).all()), (eb.total, eb.unbounded)
