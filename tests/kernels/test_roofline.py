"""benchmarks/roofline.py against the kernels' actual tensors and schedule constants."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from kernel_checks import elu1

from attnprec import kernels as K
from attnprec.kernels import _common, _featured, log, recurrence

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "roofline.py"
_spec = importlib.util.spec_from_file_location("roofline", _PATH)
assert _spec is not None and _spec.loader is not None
R = sys.modules.setdefault("roofline", importlib.util.module_from_spec(_spec))
if not hasattr(R, "Cost"):
    _spec.loader.exec_module(R)


def test_constants_match_the_code():
    assert R.BLOCK == _common.BLOCK == log.BLOCK == _featured.BLOCK
    assert R.BLOCK_F == _featured.BLOCK_F
    assert R.LOG_MAX_SEGMENTS == log.MAX_SEGMENTS
    assert R.BLOCK_T == recurrence.BLOCK_T and R.BLOCK_STEP == recurrence.BLOCK_STEP
    assert R.DECODE_TILE == log.DECODE_TILE == _featured.DECODE_TILE
    assert (R.TARGET_PROGRAMS, R.SEG_MIN_CHUNKS, R.SEG_BYTES) == (
        _common.TARGET_PROGRAMS, _common.SEG_MIN_CHUNKS, _common.SEG_BYTES)  # fmt: skip
    for nb in (1, 2, 7, 32, 255, 256, 1024):
        for n in (1, 300, 1100, 65536):
            for elems in (96, 10**5, 10**7):
                assert R.segments(nb, n, 32, elems, 64) == _common.segments(nb, n, 32, elems, 64)
                assert R.segments(nb, n, 32, elems) == _common.segments(nb, n, 32, elems)
    for d in (1, 16, 17, 64, 200):
        assert R.next_pow2(d) == _common.next_pow2(d)


@pytest.mark.parametrize("d_k,d_v", [(4, 3), (16, 16), (64, 64), (64, 128)])
def test_decode_tiles_match_the_launch(d_k, d_v):
    bdk, bdv = R.next_pow2(d_k), R.next_pow2(d_v)
    c = R.log_cost("decode", d_k=d_k, d_v=d_v, batch=5)
    assert c.parts["rows_per_program"] == log.decode_rows(bdk * bdv)
    c = R.linear_cost("decode", m=d_k, d_v=d_v, batch=5)
    br, bf = _featured.decode_tiles(bdv)
    assert (c.parts["rows_per_program"], c.parts["feature_block"]) == (br, bf)


def _tokens(kind, nb, n, dtype):
    g = torch.Generator().manual_seed(0)
    if kind == "recurrence":
        return (0.9 + 0.1 * torch.rand(nb, n, generator=g)).to(dtype), torch.randn(
            nb, n, generator=g).to(dtype)  # fmt: skip
    q, k, v = (torch.randn(nb, n, d, generator=g).to(dtype) for d in (4, 4, 3))
    return (elu1(q), elu1(k), v) if kind == "linear" else (q, k, v)


def _cost(kind, phase, *, nb, itemsize, n=1):
    if kind == "log":
        return R.log_cost(phase, n=n, d_k=4, d_v=3, batch=nb, itemsize=itemsize)
    if kind == "taylor":
        return R.taylor_cost(phase, n=n, d_k=4, d_v=3, degree=2, batch=nb, itemsize=itemsize)
    if kind == "linear":
        return R.linear_cost(phase, n=n, m=4, d_v=3, batch=nb, itemsize=itemsize)
    return R.recurrence_cost(phase, n=n, rows=nb, itemsize=itemsize)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["log", "taylor", "linear", "recurrence"])
def test_bytes_match_the_tensors(kind, dtype):
    """State bytes = what KernelState.tensors hold; decode reads and writes them once; the
    I/O bytes are those of the token tensors and the output."""
    nb, n = 3, 5
    toks = _tokens(kind, nb, n, dtype)
    s = torch.empty((), dtype=dtype).element_size()
    params = {"degree": 2} if kind == "taylor" else {}
    # prefill: one chunk, no segments: every program reads and writes its row's state once
    if kind == "recurrence":
        y, st = K.linear_recurrence(*toks, return_state=True)
    else:
        fn = {"log": K.log_attention, "taylor": K.taylor_attention,
              "linear": K.linear_attention}[kind]  # fmt: skip
        y, st = fn(*toks, causal=True, return_state=True, **params)
    m = st.tensors[-1].shape[-1] if kind in ("taylor", "linear") else 0
    if kind == "taylor":
        assert m == R.taylor_features(4, 2) == math.comb(6, 2)
    assert st.nbytes() == nb * R.state_bytes(kind, d_k=4, d_v=3, m=m)
    pre = _cost(kind, "prefill", n=n, nb=nb, itemsize=s)
    io = sum(x.numel() * x.element_size() for x in (*toks, y))
    assert pre.io_bytes == io
    if kind != "recurrence":
        assert pre.state_bytes == 2 * st.nbytes()
    # decode: one token per row, the state read and written back
    one = [x[:, -1:] if kind != "recurrence" else x[:, -1] for x in toks]
    yd, st = K.decode_step(st, *one)
    dec = _cost(kind, "decode", nb=nb, itemsize=s)
    assert dec.state_bytes == 2 * st.nbytes()
    assert dec.io_bytes == sum(x.numel() * x.element_size() for x in (*one, yd))
    assert dec.hbm_bytes >= dec.io_bytes + dec.state_bytes


def test_segmented_prefill_is_counted():
    """Few long sequences run in segments: the cost follows the wrapper's schedule."""
    c = R.log_cost("prefill", n=1100, d_k=4, d_v=3, batch=2)
    assert c.parts["segments"] == _common.segments(2, 1100, 32, 64 * 4 * 5, 64) == 4
    assert c.parts["head"] == 4 * (1100 // (4 * 32)) * 32
    c1 = R.log_cost("prefill", n=300, d_k=4, d_v=3, batch=2)  # below 512 tokens: one program
    assert c1.parts["segments"] == 1 and c1.state_bytes == 2 * 2 * R.state_bytes("log", d_k=4,
                                                                                 d_v=3)  # fmt: skip
    c = R.taylor_cost("prefill", n=1100, d_k=4, d_v=3, degree=2, batch=2)
    assert c.parts["segments"] == _common.segments(2, 1100, 32, 2 * 16 * 3)


def test_roofline_and_fraction():
    c = R.taylor_cost("decode", d_k=16, d_v=16, degree=2, batch=1024)
    r = R.roofline(c)
    assert r["time_s"] == max(r["hbm_s"], r["fp32_s"], r["sfu_s"]) and r["bound"] == "hbm"
    assert r["hbm_s"] == pytest.approx(c.hbm_bytes / R.H200.hbm)
    assert R.fraction(2 * r["time_s"], c) == pytest.approx(0.5)
    # every phase of every kernel evaluates at the issue's sizes
    rows = R.issue_cases()
    assert len(rows) == 2 * (5 * 3 + 4 * 2)  # d x (decode and 2 prefills; 2 non-causal)
    assert all(R.roofline(c)["time_s"] > 0 for *_, c in rows)
    with pytest.raises(ValueError, match="^phase: "):
        R.log_cost("backward", d_k=4, d_v=4)
