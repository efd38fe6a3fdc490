"""Every bool parameter of the public API refuses a non-bool, naming it.

A string such as ``"False"`` is truthy: taken as a flag it silently does the opposite of
what was meant (``allow_nonpositive="False"`` skipped the normalizer guard,
``exact_products="False"`` gave the smaller bound). The table below must cover every
parameter with a bool default of every public callable (``test_table_is_complete``).
"""

from __future__ import annotations

import importlib
import inspect

import numpy as np
import pytest
import torch

import attnprec.analysis as AN
import attnprec.attention as A
import attnprec.fp8 as F8
import attnprec.lognum as L
from attnprec.analysis import bounds as B
from attnprec.analysis.precision import Format
from attnprec.testing import assertions

MODULES = (
    "attnprec",
    "attnprec.analysis",
    "attnprec.analysis.bounds",
    "attnprec.analysis.audit",
    "attnprec.attention",
    "attnprec.lognum",
    "attnprec.testing",
    "attnprec.fp8",
    "attnprec.kernels",
)

#: Dataclasses the library builds itself (a report's ``partial``): not user input.
BUILT_BY_THE_LIBRARY = {"AuditCase", "AuditReport"}


def _qkv(n: int = 4, d: int = 3, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, n, d, generator=g, dtype=dtype) for _ in range(3))


def _calls():
    """``(callable to call, args, kwargs)`` with valid arguments, keyed by the public
    function (for a method, the class's function)."""
    import attnprec.kernels as K
    from attnprec.analysis import audit as AU
    from attnprec.testing import strategies

    q, k, v = _qkv()
    q32, k32, v32 = _qkv(dtype=torch.float32)
    q4, k4, v4 = (x.unsqueeze(0) for x in (q32, k32, v32))
    gen = torch.Generator().manual_seed(0)
    rate = torch.rand(2, 4, dtype=torch.float64)
    delta = torch.rand(2, 4, 3, dtype=torch.float64)
    a_diag = -torch.rand(3, 3, dtype=torch.float64)
    causal = {"causal": True}
    sl, cl = L.SignedLog.from_float(q), L.ComplexLog(q.to(torch.complex128))
    attention = [
        (A.softmax_attention, (q, k, v), {}),
        (A.log_attention, (q, k, v), causal),
        (A.taylor_attention, (q, k, v), {"degree": 2, **causal}),
        (A.polynomial_attention, (q, k, v, [1.0, 1.0, 0.5]), causal),
        (A.linear_attention, (q, k, v), causal),
        (A.favor_attention, (q, k, v), {"num_features": 4, "generator": gen, **causal}),
        (A.favor_projection, (4, 3), {"generator": gen}),
        (A.semiring_attention, (q, k, v), {"semiring": A.SoftMaxPlus(1.0), **causal}),
        (A.gated_linear_attention, (q, k, v, -delta), causal),
        (A.ssd_attention, (q, k, v), {"dt": rate, "A": -1.0, **causal}),
        (A.selective_scan_attention, (q, k, v), {"delta": delta, "A": a_diag, **causal}),
        (A.selective_scan_log, (q, k, v), {"delta": delta, "A": a_diag}),
        (A.ssm_attention, (q, k, v), {"A": a_diag, "dt": delta[0, 0], **causal}),
        (
            A.h3_attention,
            (q, k, v),
            {"shift": torch.rand(2, dtype=torch.float64), "log_decay": -delta[0, 0], **causal},
        ),
    ]
    bounds = [
        (AN.reference, ("softmax", q, k, v), {}),
        (B.attention_error_bound, ("softmax", q, k, v, "bf16"), {}),
        (B.taylor_error_bound, (q, k, v, 2), {}),
        (B.polynomial_error_bound, (q, k, v, torch.tensor([1.0, 1.0, 0.5])), {}),
        (B.favor_error_bound, (q, k, v, 16, 0.1), {}),
        (B.favor_projection_error_bound, (q, k, v, torch.randn(4, 3, dtype=torch.float64)), {}),
        (B.mixture_error_bound, (q, k, v, ((0.5, 1.0), (0.5, 0.5)), 16, 0.1), {}),
        (B.semiring_taylor_error_bound, (q, k, v, A.SoftMaxPlus(1.0), 2), {}),
        (B.block_fma_gamma, (64, 2.0**-24, 16), {}),
    ]
    checks = [
        (AU.audit, (A.softmax_attention, "softmax", q32, k32, v32), {"precision": "fp32"}),
        (
            AU.audit_output,
            (A.softmax_attention(q32, k32, v32), "softmax", q32, k32, v32),
            {"precision": "fp32"},
        ),
        (
            assertions.assert_attention_close,
            (A.softmax_attention(q4, k4, v4), q4, k4, v4),
            {"method": "softmax"},
        ),
        (
            assertions.assert_within_bound,
            (A.softmax_attention, "softmax", q32, k32, v32),
            {"precision": "fp32"},
        ),
        (strategies.attention_inputs, (), {}),
        (F8.fp8_softmax_attention, (q32, k32, v32), {}),
        (Format, ("x", 11, -14, 15, 65504.0), {}),
    ]
    lognum = [
        (L.logsumexp, (q,), {"dim": -1}),
        (L.logcumsumexp, (q, -1), {}),
        (L.log_matmul_exp, (q, k.transpose(-1, -2)), {}),
        ((L.SignedLog.sum, sl.sum), (), {"dim": -1}),
        ((L.SignedLog.prod, sl.prod), (), {"dim": -1}),
        ((L.ComplexLog.sum, cl.sum), (), {"dim": -1}),
        ((L.ComplexLog.prod, cl.prod), (), {"dim": -1}),
    ]
    kernels = [
        (K.log_attention, (q32, k32, v32), causal),
        (K.taylor_attention, (q32, k32, v32), causal),
        (K.polynomial_attention, (q32, k32, v32, [1.0, 1.0, 0.5]), causal),
        (K.linear_attention, (q32.exp(), k32.exp(), v32), causal),
        (K.linear_recurrence, (rate.float(), rate.float()), {}),
        (K.selective_scan, (q32, k32, v32), {"delta": delta.float(), "A": a_diag.float()}),
        (K.ssd, (q32, k32, v32), {"dt": rate.float(), "A": -1.0}),
        (K.decode_step, ("log", q32[:, :1], k32[:, :1], v32[:, :1]), {}),
        (K.precision_for, (torch.float32,), {"interpreted": True}),
    ]
    calls = {}
    for entry, args, kwargs in attention + bounds + checks + lognum + kernels:
        key, fn = entry if isinstance(entry, tuple) else (entry, entry)
        calls[_key(key)] = (fn, args, kwargs)
    return calls


def _key(fn) -> str:
    """A public function's name (another test may reload its module: a new object)."""
    return f"{fn.__module__}.{fn.__qualname__}"


def _public_bool_params():
    """``(qualified name, parameter)`` for every public parameter with a bool default."""
    found = {}
    for mod in MODULES:
        m = importlib.import_module(mod)
        for name in getattr(m, "__all__", ()):
            obj = getattr(m, name)
            if name in BUILT_BY_THE_LIBRARY:
                continue
            cands = [obj]
            if inspect.isclass(obj):
                cands += [getattr(obj, a) for a in vars(obj) if not a.startswith("_")]
            for fn in cands:
                if not callable(fn):
                    continue
                try:
                    params = inspect.signature(fn).parameters.values()
                except (TypeError, ValueError):
                    continue
                for p in params:
                    if isinstance(p.default, bool) or p.annotation == "bool":
                        found[(_key(fn), p.name)] = fn.__qualname__
    return [pytest.param(k, p, id=f"{name}-{p}") for (k, p), name in sorted(found.items())]


def test_table_is_complete():
    calls = _calls()
    missing = sorted({p.values[0] for p in _public_bool_params()} - set(calls))
    assert not missing, f"add these to _calls(): {missing}"


@pytest.mark.parametrize(("public", "param"), _public_bool_params())
@pytest.mark.parametrize("bad", ["False", 0])
def test_non_bool_flag_is_refused(public, param, bad):
    fn, args, kwargs = _calls()[public]
    fn(*args, **kwargs)  # the valid call runs
    with pytest.raises(TypeError, match=rf"^{param}: expected a bool"):
        fn(*args, **{**kwargs, param: bad})


def test_bools_of_numpy_and_torch_are_taken():
    """``np.bool_`` and a one-element ``torch.bool`` tensor are bools; ``1`` is not."""
    from attnprec.lognum import logsumexp

    x = torch.zeros(2, 3, dtype=torch.float64)
    for flag in (np.bool_(True), torch.tensor(True)):
        assert logsumexp(x, dim=-1, keepdim=flag).shape == (2, 1)


@pytest.mark.parametrize("method", ["softmax", "gated"])
def test_causal_of_numpy_and_torch_reaches_the_analysis_as_a_bool(method):
    """``causal=np.bool_(True)`` or ``torch.tensor(True)``: the reference, the bound and
    the audit give what ``causal=True`` gives (a review: the raw value reached the masks,
    an ``AttributeError`` naming no argument)."""
    from attnprec.analysis.audit import audit
    from attnprec.analysis.reference import reference
    from attnprec.methods import method as record
    from attnprec.testing.params import default_params

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, 4, generator=g) for _ in range(3))
    params = {key: val for key, val in default_params(method, 4, 8).items() if key != "causal"}
    fn = record(method).resolve("function")
    want_r = reference(method, q.double(), k.double(), v.double(), causal=True, **params)
    want_b = B.attention_error_bound(method, q, k, v, "fp32", causal=True, **params)
    for flag in (np.bool_(True), torch.tensor(True)):
        r = reference(method, q.double(), k.double(), v.double(), causal=flag, **params)
        assert torch.equal(r.value, want_r.value)
        b = B.attention_error_bound(method, q, k, v, "fp32", causal=flag, **params)
        assert torch.equal(b.total, want_b.total)
        rep = audit(fn, method, q, k, v, precision="fp32", causal=flag, **params)
        assert rep.ok, rep.cases[0].describe()
