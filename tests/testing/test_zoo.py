"""The kernel zoo of benchmarks/audit_power.py: correct kernels pass their own audit, and
the most severe level of a defect is flagged (tiny sizes: n = 8, d = 4, one family)."""

import pytest
import torch
from _ssm_emulate import Z  # the zoo, loaded once by the helper beside the emulations

from attnprec.analysis.audit import audit

N, D, FAMILY, SEED = 8, 4, "typical", 0


def _inputs(method, prec):
    return Z.method_inputs(method, FAMILY, n=N, d=D, dtype=prec.storage.torch_dtype, seed=SEED)


@pytest.mark.parametrize("decl", list(Z.DECLARATIONS))
@pytest.mark.parametrize("method", Z.METHODS)
def test_correct_kernels_pass_their_audit(method, decl):
    prec = Z.DECLARATIONS[decl]
    q, k, v, params = _inputs(method, prec)
    specs = [Z.correct_kernel(method, prec), *Z.variant_kernels(method, prec)]
    for spec in specs:
        for p in spec.valid:
            kw = {**params, **spec.how}
            case = audit(spec.fn, method, q, k, v, precision=p, kernel=spec.name, **kw)
            c = case.cases[0]
            assert c.counts["violated"] == 0 and not c.mutated, c.describe()
            out = spec.fn(q, k, v, **params)
            assert out.dtype == q.dtype and out.shape == v.shape[:-2] + (N, v.shape[-1])


@pytest.mark.parametrize(
    "method, defect",
    [
        ("softmax", "den_narrow"),
        ("log", "exp2_poly"),
        ("favor", "exp2_poly"),
        ("favor", "acc_narrow"),
        ("gated", "acc_narrow"),
        ("ssd", "skip_narrow"),
        ("selective_scan", "keys_narrow"),
        ("selective_scan", "gate_prefix"),
        ("ssm", "keys_narrow"),
        ("ssm", "skip_narrow"),
        ("h3", "keys_narrow"),
        ("h3", "acc_narrow"),
        ("polynomial", "den_narrow"),
        ("semiring", "exp2_poly"),
    ],
)
def test_severe_defects_are_flagged(method, defect):
    prec = Z.DECLARATIONS["fp16"]
    q, k, v, params = _inputs(method, prec)
    severe = Z.defect_kernels(method, prec, defect)[-1]
    base = Z.base_kernel(method, prec, severe.base)
    assert not torch.equal(severe.fn(q, k, v, **params), base.fn(q, k, v, **params))
    rep = audit(severe.fn, method, q, k, v, precision=severe.precision, **params)
    assert rep.cases[0].counts["violated"] > 0, rep.cases[0].describe()


def test_emulation_rounds_like_torch():
    """A sum in fp16 accumulate rounds after every addition, as torch's fp16 adds do."""
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(1)).half()
    ar = Z.Arith(Z.DECLARATIONS["fp16-c16-a16"])
    acc = x[0]
    for i in range(1, x.shape[0]):
        acc = acc + x[i]
    assert torch.equal(ar.sum(x.double(), 0), acc.double())


def test_a_gated_state_carried_two_log_gates_short_is_flagged_in_16_bit_compute():
    """fp16 compute, fp32 accumulate, chunks of 16: a carried state decayed short of its
    chunk's last two log-gates (48x the correct kernel's error) passed at 0.895 of the sound
    bound while every span took the block's count of log-gate sums; a span shorter than
    the block now takes its own (a review), and the audit proves the defect."""
    from attnprec.testing.inputs import FAMILIES

    prec = Z.DECLARATIONS["fp16-c16-a32"]
    seed = 1000 + FAMILIES.index("cancel")
    q, k, v, params = Z.method_inputs("gated", "cancel", n=64, d=16, dtype=torch.float16, seed=seed)
    short = next(s for s in Z.defect_kernels("gated", prec, "carry_short") if s.level == 2)
    rep = audit(short.fn, "gated", q, k, v, precision=short.precision, **params)
    assert rep.cases[0].counts["violated"] > 0, rep.cases[0].describe()


def test_an_ssd_state_carried_one_log_gate_short_is_flagged():
    """The audit's SSD steps ended each chunk of 16 on long-memory or tiny steps (log-gates
    of at most 6e-4), so a chunked kernel whose carried state missed its chunk's last
    log-gate passed as ok at n = 64 (a review); every 16 tokens now end on moderate steps."""
    prec = Z.DECLARATIONS["fp32"]
    q, k, v, params = Z.method_inputs("ssd", FAMILY, n=64, d=16, dtype=torch.float32, seed=1000)
    off_by_one = Z.defect_kernels("ssd", prec, "carry_short")[0]
    assert off_by_one.level == 1
    rep = audit(off_by_one.fn, "ssd", q, k, v, precision=off_by_one.precision, **params)
    assert rep.cases[0].counts["violated"] > 0, rep.cases[0].describe()
