"""Sliding windows and key padding masks (``window=``, ``key_mask=``) in the references, the
bounds and the audit: each row sees only the keys it attends."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnprec.analysis.audit import audit
from attnprec.analysis.bounds import attention_error_bound
from attnprec.analysis.precision import Precision
from attnprec.analysis.reference import reference

F64 = torch.float64


def _qkv(b: int, n: int, d: int, seed: int, positive: bool = False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, d, generator=g, dtype=F64) for _ in range(3))
    if positive:
        q, k = q.abs() + 0.1, k.abs() + 0.1
    return q, k, v, g


def _meet(a, b) -> bool:
    """The certified balls of two references intersect everywhere."""
    return bool(((a.value - b.value).abs() <= a.radius + b.radius).all())


def test_key_mask_reference_is_the_reference_of_the_kept_keys():
    q, k, v, g = _qkv(3, 6, 4, 0)
    km = torch.rand(3, 6, generator=g) > 0.4
    km[:, 0] = True
    r = reference("softmax", q, k, v, key_mask=km)
    for b in range(3):
        keep = km[b]
        rb = reference("softmax", q[b], k[b][keep], v[b][keep])
        assert bool(((r.value[b] - rb.value).abs() <= r.radius[b] + rb.radius).all())


def test_window_reference_row_by_row():
    q, k, v, _ = _qkv(1, 9, 3, 1)
    w = 3
    r = reference("log", q, k, v, causal=True, window=w)
    for i in range(9):
        lo = max(0, i - w + 1)
        ri = reference("log", q[:, i : i + 1], k[:, lo : i + 1], v[:, lo : i + 1])
        assert bool(
            ((r.value[:, i] - ri.value[:, 0]).abs() <= r.radius[:, i] + ri.radius[:, 0]).all()
        )


def test_trivial_masks_change_nothing():
    q, k, v, _ = _qkv(2, 8, 3, 2)
    ones = torch.ones(2, 8, dtype=torch.bool)
    for method, kw in (("softmax", {}), ("taylor", {"degree": 2})):
        a = attention_error_bound(method, q, k, v, "bf16", causal=True, **kw)
        b = attention_error_bound(
            method, q, k, v, "bf16", causal=True, window=8, key_mask=ones, **kw
        )
        for part in ("total", "quantization", "approximation", "rounding"):
            assert torch.allclose(getattr(a, part), getattr(b, part), rtol=1e-12, atol=0), part
        ra = reference(method, q, k, v, causal=True, **kw)
        rb = reference(method, q, k, v, causal=True, window=8, key_mask=ones, **kw)
        assert _meet(ra, rb)


def _direct(method: str, **kw):
    """A kernel in the direct form: fp32 weights from the formula, masked, normalized; one
    rounding at the store (declared ``Precision(storage)``: fp32 work, any order)."""

    def fn(q, k, v, *, causal=False, window=None, key_mask=None, scale=None, degree=2):
        qf, kf, vf = q.float(), k.float(), v.float()
        n_q, n_k, d = q.shape[-2], k.shape[-2], q.shape[-1]
        if method == "log":
            s = 1.0 if scale is None else scale
            x = s * (qf.unsqueeze(-2) + kf.unsqueeze(-3))  # [.., n_q, n_k, d]
            m = x.amax(-1).amax(-1, keepdim=True)
            w = torch.exp(x - m.unsqueeze(-1)).sum(-1)
        else:
            s = 1 / math.sqrt(d) if scale is None else scale
            x = (qf * s) @ kf.transpose(-1, -2)
            if method == "softmax":
                w = torch.exp(x - x.amax(-1, keepdim=True))
            else:
                w = sum(x**p / math.factorial(p) for p in range(degree + 1))
        i = torch.arange(n_q).unsqueeze(-1)
        j = torch.arange(n_k)
        hide = torch.zeros(n_q, n_k, dtype=torch.bool)
        if causal:
            hide |= j > i
        if window is not None:
            hide |= i - j >= window
        if key_mask is not None:
            hide = hide | ~key_mask.unsqueeze(-2)
        w = w.masked_fill(hide, 0.0)
        return ((w @ vf) / w.sum(-1, keepdim=True)).to(q.dtype)

    return fn


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from(["softmax", "log", "taylor"]),
    st.sampled_from(["fp16", "bf16"]),
    st.integers(2, 24),
    st.integers(1, 8),
    st.booleans(),
    st.integers(0, 2**31),
)
def test_masked_audit_is_sound(method, storage, n, window, padded, seed):
    q, k, v, g = _qkv(2, n, 4, seed)
    prec = Precision(storage)
    dt = prec.storage.torch_dtype
    q, k, v = (x.to(dt) for x in (q, k, v))
    km = None
    if padded:
        # every window holds a multiple of its length: each row sees a key
        km = (torch.rand(2, n, generator=g) > 0.3) | (torch.arange(n) % window == 0)
    kw = {"causal": True, "window": window, "key_mask": km}
    if method == "taylor":
        kw["degree"] = 2
    rep = audit(_direct(method), method, q, k, v, precision=prec, **kw)
    case = rep.cases[0]
    assert case.counts["violated"] == 0, case.describe()
    assert case.counts["unbounded"] == 0, case.describe()


@pytest.mark.parametrize(
    ("kw", "error", "name"),
    [
        ({"window": 2}, ValueError, "window"),  # not causal
        ({"causal": True, "window": 0}, ValueError, "window"),
        ({"key_mask": torch.ones(4)}, TypeError, "key_mask"),  # not bool
        ({"key_mask": torch.ones(3, dtype=torch.bool)}, ValueError, "key_mask"),  # n_k = 4
        ({"key_mask": torch.zeros(4, dtype=torch.bool)}, ValueError, "key_mask"),  # no key
        (
            {"causal": True, "key_mask": torch.tensor([False, True, True, True])},
            ValueError,
            "key_mask",
        ),
    ],
)
def test_bad_masks_are_named(kw, error, name):
    x = torch.rand(4, 3, dtype=F64)
    for call in (
        lambda: attention_error_bound("softmax", x, x, x, "fp32", **kw),
        lambda: reference("softmax", x, x, x, **kw),
    ):
        with pytest.raises(error, match=f"^{name}: "):
            call()


def test_methods_without_masks_name_the_keyword():
    x = torch.rand(4, 3, dtype=F64)
    with pytest.raises(TypeError, match="^window: not a keyword of method 'gated'"):
        attention_error_bound("gated", x, x, x, "fp32", log_g=torch.zeros(4), window=2)
