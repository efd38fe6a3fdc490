"""The probabilistic level's worst-case part (``Terms.coh``), on a row built by hand."""

from __future__ import annotations

import math

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
