"""The probabilistic level's worst-case part (``Terms.coh``), on a row built by hand."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch

from attnprec.analysis.bounds._rows import Normalized
from attnprec.analysis.bounds.quotient import Terms, quotient

F64 = torch.float64


@pytest.mark.parametrize(
    ("coh", "var", "tail"),
    [
        (0.01, 0.0, 0.01),  # alone: its worst case, not lam times it
        (0.01, 3e-4, 7 * 0.01 + 0.01),  # beside the tail, less than in the variance
        (0.001, 3e-4, 7 * math.sqrt(1e-4 + 1e-6)),  # in the variance, less than beside
        (0.0, 3e-4, 7 * 0.01),
    ],
)
def test_worst_case_terms_take_the_lesser_of_beside_and_inside_the_tail(coh, var, tail):
    """``min(lam sqrt(var / 3 + coh^2), lam sqrt(var / 3) + coh)``: a term bounded by
    ``coh`` in the variance is ``lam coh`` at the tail, more than its worst case; beside
    the tail it is ``coh``; both bound the inputs alone, so the lesser holds. A row whose
    sound bound is all first order (``c = lin_c``), so the level is its tail."""
    p = torch.tensor([[[0.5, 0.5]]], dtype=F64)
    v = torch.tensor([[[1.0], [3.0]]], dtype=F64)
    y = p @ v
    nz = Normalized(p=p, pi=torch.zeros_like(p), y=y, eps_y=torch.zeros_like(y), v=v, signed=False)
    z, one = torch.zeros_like(p), torch.ones(1, 1, 1, dtype=F64)
    t = Terms(
        a=z, lin_a=z, c=one, lin_c=one, mag=z, den_lo=torch.ones(1, 1, dtype=F64),
        b_num=torch.zeros_like(y), b_den=torch.zeros(1, 1, dtype=F64), var_key=z,
        var_row=torch.full_like(y, var), coh=coh,
    )  # fmt: skip
    sound, typical = quotient(nz, t, torch.zeros_like(v), lam=7.0)
    assert float(sound) == pytest.approx(2.0)  # |y| c / den_lo
    assert float(typical) == pytest.approx(tail, rel=1e-12)


@pytest.mark.parametrize("rounding", ["rne", "rtz"])
@pytest.mark.parametrize("y", [0.0, 0.75])
def test_the_division_takes_its_sums_into_compute(rounding, y):
    """Sums held in fp32 and divided in bf16 compute: N and D are each converted, which
    moves the quotient by up to (1 + u_r) / (1 - u_r) even where y = 0 (a review's
    adversarial linear-attention kernel, 1.0012x outside the sound bound on outputs that
    cancel, where only the probabilistic level charged the conversions). Every corner of
    the conversions and of the division must be inside, at both levels."""
    from attnprec.analysis.bounds.quotient import finish
    from attnprec.analysis.precision import Precision

    prec = Precision("fp32", compute="bf16", accumulate="fp32", rounding=rounding)
    fc = prec.compute
    u_r, eta_r = fc.rounding_units(rounding)
    r = prec.op_error("div")
    e1, d_lo = 1e-3, 0.5
    full = torch.full((1, 1, 1), 1.0, dtype=torch.float64)
    ops = (full * 4.0, full * 2.0, full * d_lo)
    sound, typical, _ = finish(full * e1, full * e1, full * y, prec, operands=ops)
    # exactly, in rationals: D^ = d_lo at its least, each conversion and the division at
    # their worst
    u, eta, Y, D = Fraction(u_r), Fraction(eta_r), Fraction(y), Fraction(d_lo)
    worst = Fraction(0)
    for q in (Y - Fraction(e1), Y + Fraction(e1)):
        for s1, s2, s3, s4, s5 in itertools.product((-1, 1), repeat=5):
            n_c = q * D * (1 + s1 * u) + s2 * eta
            d_c = D * (1 + s3 * u) + s4 * eta
            worst = max(worst, abs(n_c / d_c * (1 + s5 * Fraction(r)) - Y))
    assert Fraction(float(sound)) >= worst and Fraction(float(typical)) >= worst


@pytest.mark.parametrize("rounding", ["rne", "rtz"])
def test_a_products_operand_taken_into_compute_is_charged(rounding: str) -> None:
    """``finish`` of a product (``ulps``): its operand, a sum held in fp32 accumulate, is
    taken into fp16 compute (``o.to(fp16) * scale``), a conversion as declared, before the
    product rounds in compute (a hunt's gated kernel reached 0.88 of the bound that charged
    the product alone; the conversion alone is a whole ulp under "rtz")."""
    from attnprec.analysis.bounds.quotient import finish
    from attnprec.analysis.precision import Precision, round_to

    prec = Precision("fp32", compute="fp16", accumulate="fp32", rounding=rounding)
    g = torch.Generator().manual_seed(5)
    # fp32 sums with tails below fp16's precision, just above powers of two (a whole ulp)
    y = (1 + torch.randint(0, 8, (4096,), generator=g) * 2.0**-10) * 2.0 ** torch.randint(
        -8, 8, (4096,), generator=g
    )
    y = round_to((y * (1 + 2.0**-10 - 2.0**-23)).double(), "fp32")
    for sc in (1.0, 1 + 2.0**-10, 0.75):
        got = round_to(round_to(round_to(y, "fp16", rounding) * sc, "fp16"), "fp32")
        err = (got - y * sc).abs()
        zero = torch.zeros_like(y)
        sound, typical, _ = finish(zero, zero, y.abs() * sc, prec, ulps=0.5)
        assert torch.all(err <= sound) and torch.all(err <= typical)
