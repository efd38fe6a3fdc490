"""assert_attention_close: the certified check where kernel projects call assert_close.

Outputs of PyTorch's SDPA (fp16, on the CPU) in both layouts, with grouped-query and
multi-query heads, packed variable-length sequences, a sliding window and key padding pass
under SDPA's declaration; a wrong element or a dropped key is named in the caller's layout;
bad shapes name the argument; a saved failure replays. Sizes are tiny (T <= 16, D = 16).
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnprec.analysis.bounds import attention_error_bound
from attnprec.analysis.precision import Precision
from attnprec.attention import softmax_attention
from attnprec.cli import main as cli_main
from attnprec.testing import (
    BoundViolation,
    assert_attention_close,
    assert_within_bound,
    replay,
)

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "testing_guide.md"

# PyTorch's CPU SDPA on fp16: fp32 scores and sums, the weights rounded to fp16 before
# weights @ v by its flash kernel (docs/pytorch_kernels.md); the math backend (taken with
# masks or grouped heads) computes in fp32, which this declaration also covers.
SDPA_FP16 = Precision("fp16", compute="fp16", accumulate="fp32")
B, HQ, T, D = 2, 8, 16, 16


def _qkv(h_kv, seed=0, t=T, b=B):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, HQ, t, D, generator=g).half()
    k = torch.randn(b, h_kv, t, D, generator=g).half()
    v = torch.randn(b, h_kv, t, D, generator=g).half()
    return q, k, v


def sdpa(q, k, v, **kw):
    """SDPA on [B, H, T, D] (K/V heads repeated for grouped queries, as enable_gqa)."""
    gqa = q.shape[-3] != k.shape[-3]
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, **kw)


def _bthd(*xs):
    return tuple(x.transpose(1, 2) for x in xs)


def _window_mask(t, w):
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    return (j <= i) & (j > i - w)


@pytest.fixture(autouse=True)
def _failures_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNPREC_FAILURES", str(tmp_path / "failures"))


# --------------------------------------------------------------------------------------------
# Correct outputs pass


@pytest.mark.parametrize("h_kv", [8, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_sdpa_passes_in_both_layouts(layout, h_kv):
    q, k, v = _qkv(h_kv, seed=h_kv)
    causal = h_kv != 8
    out = sdpa(q, k, v, is_causal=causal)
    args = (out, q, k, v) if layout == "bhtd" else _bthd(out, q, k, v)
    report = assert_attention_close(*args, layout=layout, causal=causal, precision=SDPA_FP16)
    assert report.ok and len(report.cases) == 1
    case = report.cases[0]
    assert case.elements == B * HQ * T * D and case.total.tightness >= 1


def test_the_default_declaration_is_fp32_work_and_one_rounding():
    q, k, v = _qkv(2)
    # Computed in float64 and rounded once: what the default declaration says.
    exact = sdpa(q.double(), k.double(), v.double(), is_causal=True)
    report = assert_attention_close(exact.half(), q, k, v, causal=True)
    assert report.cases[0].precision == Precision("fp16").describe()
    # SDPA rounds its weights to fp16 (its CPU flash kernel): the default does not fit it,
    # and the message says what to declare.
    with pytest.raises(BoundViolation, match=r"compute='fp16', accumulate='fp32'") as e:
        assert_attention_close(sdpa(q, k, v), q, k, v)
    assert "(the default for these inputs: fp32 work, one rounding at the store)" in str(e.value)
    # the hints are the audit's (its report, the command line's and the fixture's too)
    (case,) = [c for c in e.value.report.cases if c.verdict != "ok"]
    assert any("weights='fp16'" in h for h in case.hints)
    assert any("compute='fp16'" in h for h in case.hints)
    assert "hint: a kernel that casts the weights to fp16" in case.describe()


def test_varlen_causal_each_sequence_on_its_own():
    lens = [5, 11, 7]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    g = torch.Generator().manual_seed(3)
    total, h_kv = int(cu[-1]), 2
    q = torch.randn(total, HQ, D, generator=g).half()  # [total_T, H, D], flash-attention's varlen
    k = torch.randn(total, h_kv, D, generator=g).half()
    v = torch.randn(total, h_kv, D, generator=g).half()
    parts = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks, vs = (x[a:b].transpose(0, 1)[None] for x in (q, k, v))
        parts.append(sdpa(qs, ks, vs, is_causal=True)[0].transpose(0, 1))
    out = torch.cat(parts)
    report = assert_attention_close(
        out, q, k, v, layout="bthd", cu_seqlens=cu, causal=True, precision=SDPA_FP16
    )
    assert [c.shape[0] for c in report.cases] == lens
    assert [c.kernel for c in report.cases] == [f"out, sequence {s}" for s in range(3)]
    # The whole packed batch as one causal sequence is not what the kernel computed.
    with pytest.raises(BoundViolation):
        assert_attention_close(
            out[None], q[None], k[None], v[None], layout="bthd", causal=True, precision=SDPA_FP16
        )


def test_sliding_window():
    q, k, v = _qkv(2, seed=4)
    w = 4
    out = sdpa(q, k, v, attn_mask=_window_mask(T, w))
    report = assert_attention_close(
        *_bthd(out, q, k, v), layout="bthd", causal=True, window=w, precision=SDPA_FP16
    )
    assert report.ok
    # Without the window, the same output is far from full causal attention.
    with pytest.raises(BoundViolation, match="elements violated"):
        assert_attention_close(out, q, k, v, causal=True, precision=SDPA_FP16)


def test_key_padding():
    q, k, v = _qkv(8, seed=5)
    key_mask = torch.ones(B, T, dtype=torch.bool)
    key_mask[1, 11:] = False  # batch item 1 has 11 keys, 5 of padding
    out = sdpa(q, k, v, attn_mask=key_mask[:, None, None, :])
    report = assert_attention_close(out, q, k, v, key_mask=key_mask, precision=SDPA_FP16)
    assert report.ok
    per_head = key_mask[:, None, :].expand(B, HQ, T)  # the [B, H, T_k] form
    assert assert_attention_close(out, q, k, v, key_mask=per_head, precision=SDPA_FP16).ok


# --------------------------------------------------------------------------------------------
# Wrong outputs are named in the caller's layout


def test_a_perturbed_element_is_named_in_the_callers_layout():
    q, k, v = _qkv(2, seed=6)
    out = sdpa(q, k, v, is_causal=True)
    ob, qb, kb, vb = _bthd(out, q, k, v)
    report = assert_attention_close(ob, qb, kb, vb, layout="bthd", causal=True, precision=SDPA_FP16)
    # The bound of element (batch 1, head 3, position 5, channel 2), from the audit's
    # elementwise bounds (attnprec's [B, H, T, D] order).
    bound = report.cases[0].arrays["total"][1].reshape(B, HQ, T, D)[1, 3, 5, 2]
    wrong = ob.clone()
    wrong[1, 5, 3, 2] += 4 * float(bound)  # [B, T, H, D]: batch 1, position 5, head 3
    assert abs(float(wrong[1, 5, 3, 2]) - float(ob[1, 5, 3, 2])) > 3 * bound
    with pytest.raises(BoundViolation) as e:
        assert_attention_close(wrong, qb, kb, vb, layout="bthd", causal=True, precision=SDPA_FP16)
    msg = str(e.value)
    assert "1 of 4096 elements violated" in msg
    assert "out[1, 5, 3, 2] (batch 1, position 5, head 3 (K/V head 0), channel 2" in msg
    assert re.search(r"> bound [0-9.e-]+: [34](\.\d+)? times the bound", msg)
    assert "the bound there: rounding" in msg and "declared precision: storage=fp16" in msg
    assert e.value.report.violations == 1


def test_the_failing_element_shown_is_never_of_an_accepted_class():
    """``allow_unbounded=True`` with 64 unbounded elements (head 1's row 0 overflows fp16
    logits) and one atypical element: the message names the atypical one, not an accepted
    unbounded one, and does not suggest the flag already given (a review)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 64, generator=g).half() for _ in range(3))
    q[0, 1, 0] = (3000 * torch.sign(q[0, 1, 0].float())).half()
    report = assert_attention_close(
        sdpa(q.double(), k.double(), v.double()), q, k, v, precision=SDPA_FP16,
        allow_unbounded=True,
    )  # fmt: skip
    (case,) = report.cases
    assert case.unbounded == 64 and case.verdict == "ok"
    eb = attention_error_bound("softmax", q, k, v, SDPA_FP16)
    sound, typical = eb.total[0, 0], eb.typical.total[0, 0]
    at = divmod(int(torch.argmin(typical / sound)), 64)  # in head 0, the widest gap
    assert float(typical[at]) < 0.95 * float(sound[at])
    out = sdpa(q.double(), k.double(), v.double())
    out[(0, 0, *at)] += float(sound[at] + typical[at]) / 2
    with pytest.raises(BoundViolation) as e:
        assert_attention_close(out, q, k, v, precision=SDPA_FP16, allow_unbounded=True)
    msg = str(e.value)
    assert "(ATYPICAL)" in msg and f"first failing element: out[0, 0, {at[0]}, {at[1]}]" in msg
    assert "allow_unbounded=True accepts them" not in msg
    assert "total vs exact softmax on the inputs as given: ATYPICAL" in msg


def test_a_dropped_key_names_the_sequence_and_position():
    h = 2  # sequences of 6, 9 and 5 positions
    cu = torch.tensor([0, 6, 15, 20])
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(h, 20, D, generator=g).half() for _ in range(3))  # [H, total_T, D]
    parts = []
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        mask = _window_mask(b - a, b - a)  # causal
        if s == 1:
            mask[3:, 0] = False  # the bug: rows 3.. of sequence 1 lose their first key
        parts.append(sdpa(q[None, :, a:b], k[None, :, a:b], v[None, :, a:b], attn_mask=mask)[0])
    out = torch.cat(parts, dim=-2)
    with pytest.raises(BoundViolation) as e:
        assert_attention_close(
            out, q, k, v, cu_seqlens=cu, causal=True, precision=SDPA_FP16
        )  # layout "bhtd" packed: [H, total_T, D]
    msg = str(e.value)
    assert "over 3 sequences" in msg
    assert re.search(r"out\[0, 9, \d+\] \(head 0, sequence 1, position 3 \(packed row 9\)", msg)
    cases = e.value.report.cases
    assert [c.verdict for c in cases] == ["ok", "VIOLATED", "ok"]
    assert "failing: sequence 1: VIOLATED" not in msg  # one failing sequence: no list


# --------------------------------------------------------------------------------------------
# Bad shapes name the argument


def _bad(**change):
    q, k, v = _qkv(2)
    args = {"out": sdpa(q, k, v), "q": q, "k": k, "v": v}
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, kwargs, error, match",
    [
        ({"k": torch.zeros(B, 3, T, D).half()}, {}, ValueError,
         r"k: expected 8 heads or a divisor of 8 \(grouped-query attention\) in dim 1"),
        ({"v": torch.zeros(B, 4, T, D).half()}, {}, ValueError, r"v: expected 2 heads \(as k\)"),
        ({"k": torch.zeros(B, 2, T, 8).half()}, {}, ValueError, r"k: expected D=16 \(as q\)"),
        ({"v": torch.zeros(B, 2, 9, D).half()}, {}, ValueError, r"v: expected T=16 keys \(as k\)"),
        ({"k": torch.zeros(3, 2, T, D).half()}, {}, ValueError, r"k: expected batch size B=2"),
        ({"q": torch.zeros(HQ, T, D).half()}, {}, ValueError, r"q: expected 4 dims \[B, H, T, D\]"),
        ({"out": torch.zeros(B, T, HQ, D).half()}, {}, ValueError,
         r"out: got shape \(2, 16, 8, 16\), expected \(2, 8, 16, 16\)"),
        ({}, {"layout": "bshd"}, ValueError, r"layout: expected one of .*'bthd'"),
        ({}, {"cu_seqlens": torch.tensor([0.0, 16.0])}, TypeError, r"cu_seqlens: expected an int"),
        ({}, {"cu_seqlens": torch.tensor([1, 16])}, ValueError, r"cu_seqlens: expected \[0, "),
        ({}, {"key_mask": torch.ones(B, 3, T, dtype=torch.bool)}, ValueError,
         r"key_mask: expected \[T_k\], \[B, T_k\] or \[B, H, T_k\]"),
        ({}, {"window": 4}, ValueError, r"window: a sliding window is causal"),
        ({"out": [1.0]}, {}, TypeError, r"out: expected a torch.Tensor, got list"),
    ],
)  # fmt: skip
def test_bad_arguments_are_named(change, kwargs, error, match):
    with pytest.raises(error, match=match):
        assert_attention_close(**_bad(**change), **kwargs)


def test_packed_shapes_are_named():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(20, 2, D, generator=g).half() for _ in range(3))
    with pytest.raises(ValueError, match=r"q: expected total_T=21 \(cu_seqlens\[-1\]\) positions"):
        assert_attention_close(q, q, k, v, layout="bthd", cu_seqlens=torch.tensor([0, 9, 21]))
    with pytest.raises(ValueError, match=r"q: expected 3 dims \[total_T, H, D\]"):
        assert_attention_close(q[None], q[None], k, v, layout="bthd", cu_seqlens=[0, 20])
    with pytest.raises(ValueError, match=r"layout: method 'gated' takes per-position keywords"):
        assert_attention_close(
            q[None], q[None], k[None], v[None], method="gated", layout="bthd", causal=True,
            log_g=torch.zeros(1, 20, 2),
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Replay, and assert_within_bound in the caller's layout


def test_replay_of_a_saved_failure(capsys):
    q, k, v = _qkv(1, seed=8)
    out = sdpa(q, k, v, is_causal=True)
    out[0, 2, 7, 1] += 0.25
    with pytest.raises(BoundViolation) as e:
        assert_attention_close(
            *_bthd(out, q, k, v), layout="bthd", causal=True, precision=SDPA_FP16
        )
    path = e.value.path
    assert path is not None and path.exists() and f"replay: attnprec replay {path}" in str(e.value)
    again = replay(path)
    assert again.verdict == "VIOLATED" and again.violations == e.value.report.violations
    assert cli_main(["replay", str(path)]) == 1
    assert "VIOLATED" in capsys.readouterr().out

    def fixed(q, k, v, causal):  # the caller's layout, [B, T, H, D]
        (o,) = _bthd(sdpa(*_bthd(q, k, v), is_causal=causal))
        return o

    assert replay(path, kernel=fixed).ok


def test_replay_judges_the_rows_the_assertion_judged():
    """The saved case keeps ``rows`` and ``seed``: the replay judged every row (here one
    more violation, on a row the assertion never judged, and a NaN)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(16, 4, generator=g).half() for _ in range(3))

    def bad_rows(q, k, v, **kw):
        out = softmax_attention(q, k, v, **kw).clone()
        out[5], out[3, 0] = math.nan, out[3, 0] + 1
        return out

    with pytest.raises(BoundViolation) as e:
        assert_within_bound(bad_rows, "softmax", q, k, v, rows=[0, 3, 15])
    head = str(e.value).splitlines()[0]
    # (the headline says the counts are of a sample, and where the unjudged NaN sits: a
    # review found both only further down, or not at all)
    assert "atypical, inf or NaN on 1 row(s) not judged (rows 5)" in head
    assert "elements (3 of 16 rows judged) violated" in head
    again = replay(e.value.path, kernel=bad_rows)
    (case,) = again.cases
    assert case.sampled == "3 of 16" and case.counts == e.value.report.cases[0].counts


def test_assert_within_bound_takes_the_callers_layout():
    lens = [4, 9]
    cu = torch.tensor([0, 4, 13])
    g = torch.Generator().manual_seed(9)
    q = torch.randn(13, HQ, D, generator=g).half()
    k, v = (torch.randn(13, 2, D, generator=g).half() for _ in range(2))
    seen = {}

    def varlen_attention(q, k, v, *, cu_seqlens, causal):
        seen["cu_seqlens"] = cu_seqlens
        parts = []
        for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
            qs, ks, vs = (x[a:b].transpose(0, 1)[None] for x in (q, k, v))
            parts.append(sdpa(qs, ks, vs, is_causal=causal)[0].transpose(0, 1))
        return torch.cat(parts)

    report = assert_within_bound(
        varlen_attention, "softmax", q, k, v, layout="bthd", cu_seqlens=cu, causal=True,
        precision=SDPA_FP16,
    )  # fmt: skip
    assert [c.shape[0] for c in report.cases] == lens and torch.equal(seen["cu_seqlens"], cu)

    def writes_into_k(q, k, v, *, cu_seqlens, causal):
        out = varlen_attention(q, k, v, cu_seqlens=cu_seqlens, causal=causal)
        k.zero_()
        return out

    with pytest.raises(BoundViolation, match="the function wrote into its inputs: k"):
        assert_within_bound(
            writes_into_k, "softmax", q, k, v, layout="bthd", cu_seqlens=cu, causal=True,
            precision=SDPA_FP16,
        )  # fmt: skip

    def heads_first(q, k, v, *, cu_seqlens, causal):
        return varlen_attention(q, k, v, cu_seqlens=cu_seqlens, causal=causal).transpose(0, 1)

    with pytest.raises(ValueError, match=r"fn: heads_first returned shape \(8, 13, 16\), expec"):
        assert_within_bound(
            heads_first, "softmax", q, k, v, layout="bthd", cu_seqlens=cu, causal=True
        )
    with pytest.raises(ValueError, match=r"q: expected total_T=13 .* is layout='bthd'"):
        assert_within_bound(
            varlen_attention, "softmax", q, k, v, layout="bhtd", cu_seqlens=cu, causal=True
        )


# --------------------------------------------------------------------------------------------
# The guide's example runs


def _guide_block(name):
    text = GUIDE.read_text(encoding="utf-8")
    m = re.search(rf"```\{{code-block\}} python\n:name: {re.escape(name)}\n\n(.*?)```", text, re.S)
    assert m, f"docs/testing_guide.md: the {name} block is missing"
    return m.group(1)


def test_guide_close_example_passes(tmp_path):
    path = tmp_path / "test_user_close.py"
    path.write_text(_guide_block("guide-close-example"), encoding="utf-8")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) >= 3 and "failed" not in r.stdout


def test_assert_within_bound_on_sampled_rows():
    """``rows=`` judges those query rows (issue 14), in the caller's layout: a kernel wrong
    at position 11 passes on rows that skip it and fails, located there, on rows that hold
    it (the failing element named at its sequence position, not its index in the sample)."""
    q, k, v = _qkv(2, t=32)

    def wrong_at_11(q, k, v, **kw):
        out = sdpa(q, k, v, **kw).clone()
        out[..., 11, :] += 0.25
        return out

    report = assert_within_bound(wrong_at_11, "softmax", q, k, v, layout="bhtd",
                                 precision=SDPA_FP16, rows=[0, 5, 31])  # fmt: skip
    assert [c.rows for c in report.cases] == [[0, 5, 31]]
    with pytest.raises(BoundViolation, match=r"first failing element: out\[0, 0, 11, 0\]"):
        assert_within_bound(wrong_at_11, "softmax", q, k, v, layout="bhtd",
                            precision=SDPA_FP16, rows=[3, 11, 20])  # fmt: skip
    with pytest.raises(ValueError, match="^rows: not with cu_seqlens"):
        assert_within_bound(wrong_at_11, "softmax", q, k, v, rows=4, cu_seqlens=[0, 32])


def test_failures_on_the_same_inputs_are_saved_apart():
    """The saved file's name covers the whole case and the kernel: two failures on the
    same inputs (another kernel, another ``causal``) overwrote one file, and the first
    one's replay judged the second case (its fixed kernel then passed as causal)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(8, 4, generator=g).half() for _ in range(3))

    def drops_key(q, k, v, **kw):
        return softmax_attention(q, k[:-1], v[:-1], **kw)

    def nan_row(q, k, v, **kw):
        out = softmax_attention(q, k, v, **kw).clone()
        out[2] = math.nan
        return out

    paths = []
    for fn, causal in ((drops_key, False), (nan_row, True), (nan_row, False)):
        with pytest.raises(BoundViolation) as e:
            assert_within_bound(fn, "softmax", q, k, v, causal=causal)
        paths.append(e.value.path)
    assert len(set(paths)) == 3 and all(p.exists() for p in paths)
    assert torch.load(paths[0], weights_only=False)["params"] == {"causal": False}
    assert replay(paths[0], kernel=drops_key).verdict == "VIOLATED"
    assert replay(paths[0], kernel=softmax_attention).ok


def test_keyword_types_checked_before_the_kernel_runs():
    """``causal="False"`` is truthy: it was judged as causal by assert_attention_close and
    reached the user's kernel first in assert_within_bound."""
    q, k, v = _qkv(2)
    calls = []

    def kernel(q, k, v, **kw):
        calls.append(kw)
        return sdpa(q, k, v)

    with pytest.raises(TypeError, match="causal: expected a bool, got str"):
        assert_within_bound(kernel, "softmax", q, k, v, layout="bhtd", causal="False")
    assert calls == []
    with pytest.raises(TypeError, match="causal: expected a bool, got str"):
        assert_attention_close(sdpa(q, k, v), q, k, v, causal="False")


@pytest.mark.parametrize(
    "method, params, match",
    [
        ("gated", {"log_g": -torch.rand(2, 7)}, r"log_g: expected shape \[\.\.\., n=8"),
        ("favor", {"projection": torch.randn(5, 3)}, r"projection: expected shape \[m, 4\]"),
        ("softmax", {"key_mask": torch.ones(2, 7, dtype=torch.bool)}, "key_mask: expected"),
        ("softmax", {"scale": math.nan}, "scale: expected a finite number"),
        ("taylor", {"degree": -1}, "degree: expected an integer >= 0"),
    ],
)
@pytest.mark.parametrize("packed", [False, True])
def test_keyword_values_checked_before_the_kernel_runs(method, params, match, packed):
    """A keyword's value (a shape against the inputs, a range) was checked by the references,
    which assert_within_bound computed after running the kernel (audit computes them
    first): a user's kernel met a wrong log_g shape before attnprec named it."""
    q, k, v = (torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    calls = []

    def kernel(q, k, v, **kw):
        calls.append(kw)
        return torch.zeros(*q.shape[:-1], v.shape[-1])

    extra = {"cu_seqlens": torch.tensor([0, 3, 8])} if packed and method == "softmax" else {}
    with pytest.raises(ValueError, match=match):
        assert_within_bound(kernel, method, q, k, v, causal=True, **extra, **params)
    assert calls == []


def test_meta_tensors_refused_naming_the_argument():
    q, k, v = _qkv(2)
    with pytest.raises(ValueError, match="q: a tensor on device meta holds no values"):
        assert_attention_close(sdpa(q, k, v), q.to("meta"), k, v)
    with pytest.raises(ValueError, match="out: expected a tensor with values"):
        assert_attention_close(sdpa(q, k, v).to("meta"), q, k, v)


def test_a_callable_object_is_saved_as_not_importable():
    """An ``nn.Module`` instance has no name to import it by: it was saved as
    ``"module:"``, no ``--kernel`` hint printed, and replay refused it."""
    from attnprec.testing.assertions import _path_of

    class Drops(torch.nn.Module):
        def forward(self, q, k, v, **kw):
            return softmax_attention(q, k[:-1], v[:-1], **kw)

    q, k, v = (torch.randn(8, 4).half() for _ in range(3))
    with pytest.raises(BoundViolation) as e:
        assert_within_bound(Drops(), "softmax", q, k, v)
    assert torch.load(e.value.path, weights_only=False)["kernel"] is None
    assert "--kernel MODULE:FUNCTION" in str(e.value)
    assert _path_of(softmax_attention) == f"{softmax_attention.__module__}:softmax_attention"


def _flash2(q, k, v, causal=False, blk=16):
    """A FlashAttention-2-style kernel: fp32 scores and online softmax in blocks of keys,
    the weights cast to the inputs' dtype for weights @ v, the row sum of the fp32 ones."""
    qf, n = q.float() * q.shape[-1] ** -0.5, q.shape[-2]
    m = torch.full(q.shape[:-1] + (1,), -math.inf)
    row, acc = torch.zeros_like(m), torch.zeros(q.shape[:-1] + (v.shape[-1],))
    for j0 in range(0, k.shape[-2], blk):
        s = qf @ k[..., j0 : j0 + blk, :].float().transpose(-1, -2)
        if causal:
            j = torch.arange(j0, j0 + s.shape[-1])
            s = s.masked_fill(j[None, :] > torch.arange(n)[:, None], -math.inf)
        new = torch.maximum(m, s.amax(-1, keepdim=True))
        a, p = torch.exp(m - new).nan_to_num(0.0), torch.exp(s - new)
        row = row * a + p.sum(-1, keepdim=True)
        acc = acc * a + p.to(q.dtype).float() @ v[..., j0 : j0 + blk, :].float()
        m = new
    return (acc / row).to(q.dtype)


def test_a_flash_attention_kernel_is_told_its_declaration():
    """FlashAttention 2 casts the weights to bf16 for weights @ v: its correct outputs
    fail the default declaration (fp32 weights), and the message suggested compute='bf16'
    first, a bound ~2,000x its error that passes a scale 30% off (a review). It now names
    the weights' cast first, which the kernel meets."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 64, 32, generator=g).to(torch.bfloat16) for _ in range(3))
    out = _flash2(q, k, v, causal=True)
    with pytest.raises(BoundViolation) as info:
        assert_attention_close(out, q, k, v, causal=True)
    text = str(info.value)
    assert "weights='bf16'" in text and "FlashAttention" in text
    assert text.index("weights='bf16'") < text.index("compute='bf16'")
    decl = Precision("bf16", weights="bf16")
    assert_attention_close(out, q, k, v, causal=True, precision=decl)
    wrong = _flash2(q * 1.1, k, v, causal=True)  # a scale 10% off
    with pytest.raises(BoundViolation):
        assert_attention_close(wrong, q, k, v, causal=True, precision=decl)


def _masked(q, k, v, offset):
    """Exact softmax attention with query i seeing the keys j <= i + offset (float64)."""
    i, j = torch.arange(q.shape[-2])[:, None], torch.arange(k.shape[-2])[None]
    qkv = (x.double() for x in (q, k, v))
    return F.scaled_dot_product_attention(*qkv, attn_mask=j <= i + offset).float()


def test_rows_of_a_cache_aligned_bottom_right_are_the_callers():
    """``rows`` index the caller's queries; a causal mask aligned bottom-right puts padding
    rows before them, and ``rows`` was dropped there: every row judged, out-of-range
    indices accepted (a review)."""
    g = torch.Generator().manual_seed(0)
    n_q, n_k = 4, 12
    q = torch.randn(1, 2, n_q, 8, generator=g)
    k, v = (torch.randn(1, 2, n_k, 8, generator=g) for _ in range(2))
    out = _masked(q, k, v, n_k - n_q)
    kw = {"causal": True, "causal_align": "bottom_right", "precision": "fp32"}
    with pytest.raises(ValueError, match=r"^rows: expected indices in \[0, 4\)"):
        assert_attention_close(out, q, k, v, rows=[100], **kw)
    rep = assert_attention_close(out, q, k, v, rows=[1], **kw)
    assert rep.cases[0].counts["within"] == 2 * 8  # one row of two heads
    bad = out.clone()
    bad[..., 2, :] += 1  # a row not judged
    assert_attention_close(bad, q, k, v, rows=[1], **kw)
    with pytest.raises(BoundViolation, match=r"position 2"):
        assert_attention_close(bad, q, k, v, rows=[2], **kw)


def test_causal_with_a_kv_cache_is_aligned_as_declared():
    """Decoding several tokens over a KV cache (n_q < n_k): flash-attention >= 2.1 aligns
    its causal mask bottom-right, PyTorch's is_causal top-left. Both were refused (a
    review: a KV-cache kernel with n_q > 1 could not be tested); each is now judged, the
    other alignment fails, and positions are the caller's."""
    g = torch.Generator().manual_seed(0)
    n_q, n_k = 4, 12
    q = torch.randn(2, 2, n_q, 16, generator=g)
    k, v = (torch.randn(2, 2, n_k, 16, generator=g) for _ in range(2))
    with pytest.raises(ValueError, match="causal: 4 queries and 12 keys: pass causal_align"):
        assert_attention_close(_masked(q, k, v, n_k - n_q), q, k, v, causal=True)
    rep = assert_attention_close(
        _masked(q, k, v, n_k - n_q), q, k, v, causal=True, causal_align="bottom_right"
    )
    assert rep.cases[0].counts["within"] == 2 * 2 * n_q * 16
    assert_attention_close(_masked(q, k, v, 0), q, k, v, causal=True, causal_align="top_left")
    with pytest.raises(
        BoundViolation, match=r"out\[0, 0, 0, 0\] \(batch 0, head 0, position 0"
    ) as e:
        assert_attention_close(
            _masked(q, k, v, 0), q, k, v, causal=True, causal_align="bottom_right"
        )
    again = replay(e.value.path)  # the saved case keeps its alignment
    assert again.cases[0].counts == e.value.report.cases[0].counts and not again.ok
    with pytest.raises(ValueError, match="causal_align: aligns a causal mask"):
        assert_attention_close(_masked(q, k, v, 99), q, k, v, causal_align="top_left")
    with pytest.raises(ValueError, match="causal_align: expected None"):
        assert_attention_close(q, q, q, q, causal=True, causal_align="right")
    with pytest.raises(ValueError, match="without a key"):
        assert_attention_close(v, v, q, q, causal=True, causal_align="bottom_right")
    # a left-padded KV cache: the leading keys masked, which only the padding rows would
    # see alone (those were refused as "a query sees no key", a review)
    km = torch.ones(2, n_k, dtype=torch.bool)
    km[:, :3] = False
    i, j = torch.arange(n_q)[:, None], torch.arange(n_k)[None]
    s = (q.double() @ k.double().mT / 4).masked_fill(
        ~((j <= i + n_k - n_q) & km[:, None, None]), -math.inf
    )
    out = (torch.softmax(s, -1) @ v.double()).float()
    assert_attention_close(out, q, k, v, causal=True, causal_align="bottom_right", key_mask=km)
    # assert_within_bound takes no alignment: its message does not offer one
    with pytest.raises(ValueError, match="causal: requires n_q == n_k here"):
        assert_within_bound(lambda q, k, v, causal: q, "softmax", q, k, v, causal=True)


def test_chunked_prefill_packs_queries_and_keys_apart():
    """flash-attention's varlen functions take cu_seqlens_q and cu_seqlens_k: chunked
    prefill packs a few new queries per sequence against all its keys (refused before:
    one cu_seqlens only). A one-element defect is located in the caller's packing."""
    g = torch.Generator().manual_seed(1)
    cu_q, cu_k = [0, 3, 5], [0, 8, 14]
    q = torch.randn(5, 2, 16, generator=g)
    k, v = (torch.randn(14, 2, 16, generator=g) for _ in range(2))
    parts = []
    for s in range(2):
        rq, rk = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        qs, ks, vs = (x[r].transpose(0, 1) for x, r in ((q, rq), (k, rk), (v, rk)))
        parts.append(_masked(qs, ks, vs, ks.shape[-2] - qs.shape[-2]).transpose(0, 1))
    out = torch.cat(parts)
    kw = {"layout": "bthd", "causal": True, "causal_align": "bottom_right"}
    rep = assert_attention_close(out, q, k, v, cu_seqlens=torch.tensor(cu_q),
                                 cu_seqlens_k=np.array(cu_k), **kw)  # fmt: skip
    assert [c.counts["within"] for c in rep.cases] == [3 * 2 * 16, 2 * 2 * 16]
    bad = out.clone()
    bad[4, 1, 3] += 0.01
    with pytest.raises(BoundViolation, match=r"sequence 1, position 1 \(packed row 4\)") as e:
        assert_attention_close(bad, q, k, v, cu_seqlens=cu_q, cu_seqlens_k=cu_k, **kw)

    def varlen(q, k, v, causal, cu_seqlens, cu_seqlens_k):  # (as flash_attn_varlen_func)
        assert causal and list(cu_seqlens_k) == cu_k
        return out

    # (the replay passed the kernel cu_seqlens alone: a review)
    assert replay(e.value.path, kernel=varlen).ok
    with pytest.raises(ValueError, match="cu_seqlens_k: expected as many offsets"):
        assert_attention_close(out, q, k, v, cu_seqlens=cu_q, cu_seqlens_k=[0, 14], **kw)


def test_a_layout_read_wrongly_is_suggested():
    """[B, T, H, D] tensors passed with the default [B, H, T, D] layout: every element was
    violated and the message said nothing of the layout (a review)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2, 16, generator=g) for _ in range(3))
    out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    with pytest.raises(BoundViolation, match="pass layout='bthd'"):
        assert_attention_close(out, q, k, v)
    assert_attention_close(out, q, k, v, layout="bthd")


@pytest.mark.parametrize("fn", [None, "softmax_attention"])
def test_assert_within_bound_names_a_non_callable_fn(fn):
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)  # "'NoneType' object is not callable" before
    with pytest.raises(TypeError, match="^fn: expected a callable kernel"):
        assert_within_bound(fn, "softmax", x, x, x)


def test_a_causal_row_unbounded_under_any_schedule_is_told_to_declare_its_block():
    """A review: a correct causal fp16 kernel casting its weights failed the guide's
    declaration (block=None also covers a shift by a future key's logit, 20 above the row's
    only visible one: that weight flushes to 0 in fp16) and was sent to allow_unbounded,
    which stops checking the elements unbounded for a reason. The message names block=;
    declaring it, the row is bounded and the kernel passes."""
    q = torch.tensor([[1.0], [1.0]], dtype=torch.float16)
    k = torch.tensor([[0.0], [20.0]], dtype=torch.float16)
    v = torch.tensor([[1.0], [2.0]], dtype=torch.float16)
    out = torch.tensor([[1.0], [2.0]], dtype=torch.float16)  # exact
    with pytest.raises(BoundViolation) as e:
        assert_attention_close(out, q, k, v, precision=Precision("fp16", weights="fp16"),
                               layout="...td", causal=True)  # fmt: skip
    assert "declares its block (block=BLOCK_N, ONE_PASS" in str(e.value)
    assert_attention_close(out, q, k, v, precision=Precision("fp16", weights="fp16", block=16),
                           layout="...td", causal=True)  # fmt: skip


@pytest.mark.parametrize("allow", [False, True])
def test_an_inf_where_the_declaration_overflows_fails_even_when_unbounded_is_allowed(allow):
    """bf16 values near 3e38: a correct kernel's fp32 sums overflow, as the declaration
    allows (the bound is infinite). Not a proof of a defect, but never accepted: the
    assertion fails under ``allow_unbounded`` too, shows the inf and says why (the message
    used to offer allow_unbounded=True)."""
    q, k = torch.zeros(1, 2, dtype=torch.bfloat16), torch.zeros(4, 2, dtype=torch.bfloat16)
    v = torch.full((4, 2), 3e38).to(torch.bfloat16)
    out = (v.float().sum(0, keepdim=True) / 4).to(torch.bfloat16)  # inf
    with pytest.raises(BoundViolation) as e:
        assert_attention_close(out, q, k, v, precision=Precision("bf16"), layout="...td",
                               allow_unbounded=allow)  # fmt: skip
    msg = str(e.value)
    assert "(UNBOUNDED)" in msg and "out = inf where the exact value is finite" in msg
    assert "never accepted, not even by allow_unbounded=True" in msg
    assert "allow_unbounded=True accepts them" not in msg


def test_the_replay_line_puts_a_test_modules_folder_on_the_path(tmp_path, monkeypatch):
    """A kernel defined in a test module is importable in pytest (which put the module's
    folder on the path) but not from the working directory, where ``attnprec replay``
    imports it: the printed line failed with "cannot import" (a review). It now puts that
    folder on ``PYTHONPATH``; a module the working directory holds needs nothing, and a
    kernel that cannot be imported back asks for ``--kernel``."""
    import importlib
    import sys

    from attnprec.testing.assertions import replay_line

    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "kern_in_tests.py").write_text("def f(q, k, v):\n    return v\n")
    (tmp_path / "kern_at_root.py").write_text("def f(q, k, v):\n    return v\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "tests"))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("kern_in_tests", "kern_at_root"):
        monkeypatch.delitem(sys.modules, name, raising=False)
        importlib.import_module(name)
    where = tmp_path / "case.pt"
    assert replay_line(where, "kern_in_tests:f") == f"PYTHONPATH=tests attnprec replay {where}"
    assert replay_line(where, "kern_at_root:f") == f"attnprec replay {where}"
    assert replay_line(where, "torch.nn.functional:softmax") == f"attnprec replay {where}"
    assert replay_line(where, None) == f"attnprec replay {where} --kernel MODULE:FUNCTION"


def test_the_narrower_compute_hint_speaks_of_the_method():
    """A gated kernel's failure spoke of "scores and weights" (softmax's words) in its hint
    to declare 16-bit compute (a review); it says what the kernel computes."""
    from attnprec.analysis.precision import Precision
    from attnprec.attention import gated_linear_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(16, 4, generator=g).half() for _ in range(3))
    log_g = -torch.rand(16, 4, generator=g).double()

    def scaled_up(q, k, v, **kw):
        return gated_linear_attention(q.float(), k.float(), v.float(), **kw).mul(1.01).half()

    with pytest.raises(BoundViolation) as e:
        assert_within_bound(scaled_up, "gated", q, k, v, precision=Precision("fp16"), log_g=log_g)
    msg = str(e.value)
    assert "one that computes in fp16 (plain PyTorch" in msg and "scores and weights" not in msg


def test_a_scale_held_in_the_storage_format_gets_a_hint():
    """A kernel that holds 1/sqrt(d) in fp16 computes another method than the declared one
    (rightly a failure); the message says which scale to pass, and with it the kernel is
    within (a review: only compute='fp16' passed it, 195-1,350x looser than its error)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(64, 48, generator=g).half() for _ in range(3))
    held = float(torch.tensor(48**-0.5).half())

    def fp16_scale(q, k, v, **kw):
        return softmax_attention(q.float(), k.float(), v.float(), scale=held).half()

    with pytest.raises(BoundViolation) as e:
        assert_within_bound(fp16_scale, "softmax", q, k, v)
    assert f"pass scale={held!r}" in str(e.value)
    assert assert_within_bound(fp16_scale, "softmax", q, k, v, scale=held).ok


def _packed(lens, seed=3):
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    g = torch.Generator().manual_seed(seed)
    total = int(cu[-1])
    return cu, *(torch.randn(total, 2, D, generator=g) for _ in range(3))


def _varlen(q, k, v, cu_seqlens, causal=True):
    parts = []
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
        parts.append(softmax_attention(qs, ks, vs, causal=causal).transpose(0, 1))
    return torch.cat(parts) if parts else torch.zeros_like(q)


def test_packed_pieces_references_are_held_only_while_needed(monkeypatch):
    """A packed batch's references are all formed before a kernel runs (they check the
    keywords first), and one piece at a time when the output is given; none keeps the
    float64 stored values (a review's decode case held 16x the caller's v)."""
    import attnprec.analysis.audit as audit_mod

    events = []
    real_refs, real_judge = audit_mod._references, audit_mod._judge

    def refs(*a, **kw):
        events.append("refs")
        run = real_refs(*a, **kw)
        assert not any(
            isinstance(x, torch.Tensor) and x.dtype == torch.float64 and x.shape == run.v.shape
            for x in run
        )
        return run

    def judge(*a, **kw):
        events.append("judge")
        return real_judge(*a, **kw)

    monkeypatch.setattr(audit_mod, "_references", refs)
    monkeypatch.setattr(audit_mod, "_judge", judge)
    cu, q, k, v = _packed([5, 11, 7])

    def kernel(q, k, v, cu_seqlens, causal):
        events.append("kernel")
        return _varlen(q, k, v, cu_seqlens, causal)

    assert_within_bound(kernel, "softmax", q, k, v, layout="bthd", cu_seqlens=cu, causal=True)
    assert events == ["refs"] * 3 + ["kernel"] + ["judge"] * 3
    events.clear()
    out = _varlen(q, k, v, cu)
    assert_attention_close(out, q, k, v, layout="bthd", cu_seqlens=cu, causal=True)
    assert events == ["refs", "judge"] * 3


def test_a_write_into_the_inputs_fails_when_every_packed_sequence_is_empty():
    """With every packed sequence empty there is no case to carry the write (the report
    was ok)."""
    cu, q, k, v = _packed([0, 0])

    def writes(q, k, v, cu_seqlens, causal):
        cu_seqlens.fill_(1)
        return torch.zeros_like(q)

    with pytest.raises(AssertionError, match=r"wrote into its inputs \(cu_seqlens\)"):
        assert_within_bound(writes, "softmax", q, k, v, layout="bthd", cu_seqlens=cu, causal=True)
    report = assert_within_bound(
        lambda q, k, v, **kw: torch.zeros_like(q), "softmax", q, k, v, layout="bthd",
        cu_seqlens=cu, causal=True,
    )  # fmt: skip
    assert report.cases == []
    # with sequences, each case carries the write, and the message says it once
    cu, q, k, v = _packed([3, 4])
    with pytest.raises(BoundViolation) as e:
        assert_within_bound(writes, "softmax", q, k, v, layout="bthd", cu_seqlens=cu, causal=True)
    assert all(c.mutated == ["cu_seqlens"] for c in e.value.report.cases)
    head = str(e.value).split("\ndetails")[0]  # (the details describe each case)
    assert head.count("wrote into its inputs") == 1


def test_log_attention_unbounded_by_its_log_space_sums_is_told_what_to_declare():
    """Log attention in fp16 compute under the default sums=None: every element is
    unbounded ("log-space sums in fp16": partial sums held as logs rounded to compute), and
    the message said only allow_unbounded=True. It now names the declarations that describe
    the usual kernels; with sums='linear' the same output passes."""
    from attnprec.attention import log_attention

    g = torch.Generator().manual_seed(0)
    # (64 tokens: at 32 the sums stay within the magnitude check since the normalizer and
    # sums of one sign take no cancellation charge, and every element is bounded)
    q, k, v = ((torch.randn(64, 8, generator=g) * 0.5).half() for _ in range(3))
    out = log_attention(q.double(), k.double(), v.double()).half()
    prec = Precision("fp16", compute="fp16")
    with pytest.raises(BoundViolation) as e:
        assert_attention_close(out, q, k, v, method="log", precision=prec, layout="...td")
    assert "log-space sums in fp16" in str(e.value)
    assert "declares sums='linear'" in str(e.value)
    assert "declares its block" not in str(e.value)  # (its normalizer: the log-sums')
    # the audit's own report (the CLI's text and JSON) carries the same hint
    (case,) = e.value.report.cases
    assert len(case.hints) == 1 and "declares sums='linear'" in case.hints[0]
    assert f"hint: {case.hints[0]}" in case.describe() and case.to_dict()["hints"] == case.hints
    assert_attention_close(
        out, q, k, v, method="log", precision=Precision("fp16", compute="fp16", sums="linear"),
        layout="...td",
    )  # fmt: skip


def test_a_left_padded_causal_batch_is_told_which_row_and_judged_on_the_others():
    """A review: a left-padded causal batch's padding rows see no key, and the error named
    neither the batch item nor the row, and assert_attention_close took no rows= to leave
    them out. The error names both; rows= judges the others."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    km = torch.ones(2, 6, dtype=torch.bool)
    km[1, :2] = False  # item 1 padded on the left: its rows 0 and 1 see no key
    with pytest.raises(ValueError, match="query row 0 of batch item 1 sees no key"):
        assert_attention_close(q, q, k, v, layout="...td", causal=True, key_mask=km)
    seen = torch.ones(6, 6, dtype=torch.bool).tril() & km[:, None, :]
    w = torch.softmax((q @ k.transpose(-1, -2) / 2).masked_fill(~seen, -math.inf), -1)
    ref = w.nan_to_num(0.0) @ v  # (the padding rows: no key, 0 here, not judged)
    report = assert_attention_close(
        ref, q, k, v, layout="...td", causal=True, key_mask=km, rows=[2, 3, 4, 5]
    )
    assert report.cases[0].rows == [2, 3, 4, 5]
