"""The two evaluations of the per-key exps of the softmax bound (``softmax._chord``) and of
the log and FAVOR+ bounds (``_expprod._chords``).

Where a block's exponent errors vary by at most ``CHORD_SPAN`` within each row, the exps
are replaced by their chords and every per-key sum comes from the block's shared weights
(softmax) or from the terms' sums weighted by their exponent errors (log, FAVOR+);
elsewhere (and for semirings) each exp is formed per key (per term). The chords lie above
the exps (convexity), so the shared evaluation may only be looser, by at most about 1% (the
span), never tighter.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnprec.analysis.bounds._expprod as expprod_bound
import attnprec.analysis.bounds.softmax as softmax_bound
from attnprec.analysis.bounds import attention_error_bound
from attnprec.analysis.precision import Elementary, Precision
from attnprec.attention.favor import favor_projection
from attnprec.attention.semiring import MixtureLSE

PRECISIONS = {
    "bf16": Precision("bf16"),
    "fp16": Precision("fp16"),
    "fp32": Precision("fp32"),
    "linear_sums": Precision("bf16", sums="linear"),
    "blocks_of_64": Precision("bf16", block=64),
    "fp16_compute": Precision("fp16", compute="fp16"),
}


def _never_tighter_within_a_percent(shared, per_key) -> None:
    """The sound level never below the per-key one and at most 1% above; the probabilistic
    level never below, and above by at most the sound level's increase (its second-order
    remainder is the sound bound less the first-order terms) plus the first-order terms'
    own change: they take the row's bound of the exponent error, within the span of the
    largest per-key one (a factor within ``e^span``; measured: 3.5e-7 relative)."""
    a, b = shared.rounding, per_key.rounding
    assert torch.equal(torch.isfinite(a), torch.isfinite(b))
    fin = torch.isfinite(b)
    a, b = a[fin], b[fin]
    assert (a >= b * (1 - 1e-12)).all()
    assert (a <= b * 1.01).all()
    ta, tb = shared.typical.rounding[fin], per_key.typical.rounding[fin]
    assert (ta >= tb * (1 - 1e-12)).all()
    span = math.expm1(softmax_bound.CHORD_SPAN)
    assert (ta - tb <= (a - b) + span * tb + 1e-12 * a).all()


def _both(monkeypatch: pytest.MonkeyPatch, method: str, prec: Precision, causal: bool, **kw):
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(150, 16, generator=g) * s for s in (1.0, 2.0, 1.0))
    shared = attention_error_bound(method, q, k, v, prec, causal=causal, **kw)
    with monkeypatch.context() as m:
        m.setattr(softmax_bound, "CHORD_SPAN", -1.0)  # every block per key
        m.setattr(expprod_bound, "CHORD_SPAN", -1.0)
        per_key = attention_error_bound(method, q, k, v, prec, causal=causal, **kw)
    return shared, per_key


@pytest.mark.parametrize("name", sorted(PRECISIONS))
@pytest.mark.parametrize("causal", [False, True])
def test_shared_sums_are_never_tighter_and_within_a_percent(
    monkeypatch: pytest.MonkeyPatch, name: str, causal: bool
) -> None:
    shared, per_key = _both(monkeypatch, "softmax", PRECISIONS[name], causal)
    assert torch.isfinite(shared.typical.rounding).all()
    _never_tighter_within_a_percent(shared, per_key)


@pytest.mark.parametrize("causal", [False, True])
def test_softcap_takes_the_same_two_paths(monkeypatch: pytest.MonkeyPatch, causal: bool) -> None:
    shared, per_key = _both(monkeypatch, "softmax", Precision("bf16"), causal, softcap=5.0)
    a, b = shared.rounding, per_key.rounding
    assert (a >= b * (1 - 1e-12)).all() and (a <= b * 1.01).all()


def test_the_path_follows_the_span(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 compute: exponent errors of ~1e-6, the chords; bf16 compute (``u_c = 2^-8``
    times distances of several units) and semirings (each term's own error), per key."""
    calls = []
    real = softmax_bound._chord
    monkeypatch.setattr(softmax_bound, "_chord", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(64, 16, generator=g) for _ in range(3))
    attention_error_bound("softmax", q, k, v, Precision("bf16"), causal=True)
    assert calls
    calls.clear()
    attention_error_bound("softmax", q, k, v, Precision("bf16", compute="bf16"), causal=True)
    assert not calls
    mix = MixtureLSE((0.5, 0.5), (1.0, 2.0))
    attention_error_bound("semiring", q, k, v, Precision("bf16"), causal=True, semiring=mix)
    assert not calls


EXPPROD_PRECISIONS = {
    **PRECISIONS,
    "log_sums": Precision("bf16", block=64, elementary=Elementary(logsum=1)),
}


@pytest.mark.parametrize("name", sorted(EXPPROD_PRECISIONS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("method", ["log", "favor"])
def test_log_and_favor_chords_are_never_tighter_and_within_a_percent(
    monkeypatch: pytest.MonkeyPatch, method: str, name: str, causal: bool
) -> None:
    kw = {"projection": favor_projection(32, 16, generator=torch.Generator().manual_seed(1))}
    shared, per_term = _both(
        monkeypatch, method, EXPPROD_PRECISIONS[name], causal, **(kw if method == "favor" else {})
    )
    _never_tighter_within_a_percent(shared, per_term)


def test_log_and_favor_take_the_chords_at_fp32_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 compute (exponent errors of ~1e-6): the chords; bf16 compute: per term."""
    calls = []
    real = expprod_bound._chords
    monkeypatch.setattr(expprod_bound, "_chords", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(64, 16, generator=g) for _ in range(3))
    proj = favor_projection(32, 16, generator=g)
    for method, kw in (("log", {}), ("favor", {"projection": proj})):
        calls.clear()
        attention_error_bound(method, q, k, v, Precision("bf16"), causal=True, **kw)
        assert calls, method
        calls.clear()
        attention_error_bound(method, q, k, v, Precision("bf16", compute="bf16"), causal=True, **kw)
        assert not calls, method
