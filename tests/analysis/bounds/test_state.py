"""The state evaluation of the log bound (``evaluation="state"``, :mod:`._state`): the same
model with separable per-term factors, never below the pair evaluation, linear in the keys.

Tolerance rule of the comparisons: the two evaluations certify the exact output ``y``
separately (float64, radii below ``2^-40`` of the values at these sizes), and where the
values' hull decides a bound (``max(hi - y, y - lo) + radius``) the two may differ by
those radii; so ``state >= pairs - 2^-40 max|v|``.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

import attnprec.analysis.bounds.log as log_bounds
from attnprec.analysis.bounds import attention_error_bound
from attnprec.analysis.bounds._state import GAP
from attnprec.analysis.bounds.quantization import log_quantization_state, quantization
from attnprec.analysis.precision import Precision

PRECISIONS = [
    "fp16",
    "bf16",
    "fp32",
    Precision("bf16", compute="bf16"),
    Precision("fp16", compute="fp16"),
]


def _inputs(seed: int, n: int, spread: float, offset: float, B: int = 2, d: int = 6, dv: int = 3):
    g = torch.Generator().manual_seed(seed)
    q, k = (spread * torch.randn(B, n, d, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, n, dv, generator=g, dtype=torch.float64) + offset
    return q, k, v


def _no_chords(monkeypatch):
    # the pair evaluation's chords are another relaxation of the same expm1 factors (a
    # chord over the row's span, not the factor itself): the comparison is with the
    # factors evaluated exactly
    monkeypatch.setattr(log_bounds, "chord_reach", lambda *a, **k: False)


@pytest.mark.parametrize("prec", PRECISIONS, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block", [None, 8])
def test_rounding_never_below_pairs(monkeypatch, prec, causal, block):
    _no_chords(monkeypatch)
    P = replace(Precision.of(prec), sums="linear", block=block)
    for seed, n, spread, offset, sc in itertools.product(
        range(2), (1, 5, 70), (0.3, 4.0), (0.0, 5.0), (1.0, -0.7)
    ):
        q, k, v = (P.stored(x) for x in _inputs(seed, n, spread, offset))
        pairs = log_bounds.log_rounding(q, k, v, P, sc, causal, 3.0)
        state = log_bounds.log_rounding_state(q, k, v, P, sc, causal)
        a, b = pairs["sound"], state["sound"]
        assert torch.equal(state["typical"], b)
        # infinite where the pair evaluation is (the same reasons), perhaps more
        assert bool((torch.isinf(b) >= torch.isinf(a)).all())
        fin = torch.isfinite(a)
        slack = 2.0**-40 * v.abs().amax()
        assert bool((b[fin] >= a[fin] - slack).all()), (seed, n, spread, offset, sc)


@pytest.mark.parametrize("storage", ["fp16", "bf16", "e4m3"])
@pytest.mark.parametrize("causal", [False, True])
def test_quantization_never_below_pairs(storage, causal):
    P = Precision.of(storage)
    for seed, n, spread, offset in itertools.product(range(2), (1, 5, 70), (0.3, 4.0), (0, 5)):
        given = _inputs(seed, n, spread, offset)
        stored = tuple(P.stored(x) for x in given)
        a = quantization("log", given, stored, 1.0, causal, None, {})
        b = log_quantization_state(given, stored, 1.0, causal, None)
        assert bool((torch.isinf(b) >= torch.isinf(a)).all())
        fin = torch.isfinite(a)
        slack = 2.0**-40 * given[2].abs().amax()
        assert bool((b[fin] >= a[fin] - slack).all()), (seed, n, spread, offset)


@pytest.mark.parametrize("causal", [False, True])
def test_sampled_rows_are_the_full_rows(causal):
    q, k, v = (x.to(torch.float16) for x in _inputs(3, 300, 1.0, 0.5))
    P = Precision("fp16", sums="linear")
    full = attention_error_bound("log", q, k, v, P, causal=causal, evaluation="state")
    part = attention_error_bound(
        "log", q, k, v, P, causal=causal, evaluation="state", rows=17, seed=4
    )
    assert part.rows is not None and part.rows.numel() == 17
    assert torch.equal(part.total, full.total[..., part.rows, :])
    assert "evaluated from key states" in part.covers


def test_rows_far_below_their_chunk_take_the_pair_evaluation():
    """A key far above the ones before it in its chunk: the rows before it hold their terms
    below exp(-GAP) in the chunk's unit, so they take the pair evaluation."""
    q, k, v = _inputs(5, 40, 1.0, 0.0, B=1)
    k[0, 20] = GAP + 100.0  # every channel; scale 1
    # a declared block: no shift by the sequence's maximum (which would flush these rows)
    P = Precision("fp32", sums="linear", block=8)
    state = log_bounds.log_rounding_state(q, k, v, P, 1.0, True)
    pairs = log_bounds.log_rounding(q, k, v, P, 1.0, True, 3.0, torch.arange(20))
    assert bool(torch.isfinite(state["sound"][:, :20]).all())
    # rows 0..19 are the pair evaluation's own numbers
    assert torch.equal(state["sound"][:, :20], pairs["sound"])


def test_state_arguments_are_checked():
    q, k, v = (x.to(torch.float16)[0] for x in _inputs(0, 8, 1.0, 0.0))
    P = Precision("fp16", sums="linear")
    with pytest.raises(ValueError, match="evaluation"):
        attention_error_bound("softmax", q, k, v, P, evaluation="state")
    with pytest.raises(ValueError, match="evaluation"):
        attention_error_bound("log", q, k, v, P, evaluation="dense")
    with pytest.raises(ValueError, match="evaluation"):
        attention_error_bound("log", q, k, v, P, causal=True, window=3, evaluation="state")
    with pytest.raises(ValueError, match="precision"):
        attention_error_bound("log", q, k, v, Precision("fp16"), evaluation="state")
