"""Formats, Precision and the exact rounding emulation round_to."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnprec.analysis.precision import FORMATS, ONE_PASS, Format, Precision, round_to

TORCH_FORMATS = [name for name, f in FORMATS.items() if f.torch_dtype is not None]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Equal values with equal signs (so -0.0 != 0.0); any NaN equals any NaN."""
    both_nan = torch.isnan(a) & torch.isnan(b)
    return both_nan | ((a == b) & (torch.signbit(a) == torch.signbit(b)))


def _all_fp32_bit_patterns(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**31), 2**31, (n,), generator=g, dtype=torch.int64)
    return bits.to(torch.int32).view(torch.float32)


@pytest.mark.parametrize(
    "name,p,emin,emax,mx",
    [
        ("fp64", 53, -1022, 1023, torch.finfo(torch.float64).max),
        ("fp32", 24, -126, 127, torch.finfo(torch.float32).max),
        ("fp16", 11, -14, 15, 65504.0),
        ("bf16", 8, -126, 127, torch.finfo(torch.bfloat16).max),
        ("tf32", 11, -126, 127, (2 - 2**-10) * 2.0**127),
        ("e4m3", 4, -6, 8, 448.0),
        ("e5m2", 3, -14, 15, 57344.0),
    ],
)
def test_format_fields(name, p, emin, emax, mx):
    f = Format.of(name)
    assert (f.precision, f.emin, f.emax, f.max) == (p, emin, emax, mx)
    assert f.u == 2.0**-p
    assert f.min_normal == 2.0**emin
    assert f.min_subnormal == 2.0 ** (emin - p + 1)
    if f.torch_dtype is not None:
        fi = torch.finfo(f.torch_dtype)
        assert (f.max, f.min_normal, 2 * f.u) == (fi.max, fi.tiny, fi.eps)
        assert Format.of(f.torch_dtype) is f


def test_format_of_rejects():
    with pytest.raises(ValueError, match="fmt"):
        Format.of("fp8")
    with pytest.raises(TypeError, match="fmt"):
        Format.of(3)
    with pytest.raises(ValueError, match="fmt"):
        Format.of(torch.int32)


def test_precision_fields_and_errors():
    p = Precision("bf16", rounding="rtz")
    assert p.storage is FORMATS["bf16"] and p.compute is FORMATS["fp32"]
    assert p.accumulate is FORMATS["fp32"] and p.rounding == "rtz"
    assert Precision(torch.float16, "fp32", torch.float64).accumulate is FORMATS["fp64"]
    with pytest.raises(ValueError, match="compute"):
        Precision("fp16", compute="fp12")
    with pytest.raises(TypeError, match="accumulate"):
        Precision("fp16", accumulate=1.5)
    with pytest.raises(ValueError, match="rounding"):
        Precision("fp16", rounding="up")


def test_block_sums_is_checked_and_described():
    assert Precision("fp16", block=64).block_sums == "any"
    assert "each summed on its own" in Precision("fp16", block=64, block_sums="separate").describe()
    assert "possibly fused" in Precision("fp16", block=64).describe()
    with pytest.raises(ValueError, match="^block_sums: expected 'any' or 'separate'"):
        Precision("fp16", block=64, block_sums="fused")
    for block in (None, ONE_PASS):  # no blocks of keys to sum apart
        with pytest.raises(ValueError, match="^block_sums: 'separate' describes blocks"):
            Precision("fp16", block=block, block_sums="separate")


def test_constants_is_checked_and_described():
    assert Precision("fp16").constants == "any"
    assert "split over both as roots" in Precision("fp16").describe()
    assert "applied once" in Precision("fp16", constants="folded").describe()
    with pytest.raises(ValueError, match="^constants: expected 'any' or 'folded'"):
        Precision("fp16", constants="query")


def test_merges_is_checked_and_described():
    assert Precision("fp32").merges is None
    assert "at most 7 merges each" in Precision("fp32", merges=7).describe()
    for bad in (0, -1, True, 1.5, "3", 2**53 + 1, 10**400):
        with pytest.raises(ValueError, match=r"^merges: expected an integer in \[1, 2\*\*53\]"):
            Precision("fp32", merges=bad)
    with pytest.raises(ValueError, match="^merges: split states merge through their lse"):
        Precision("fp32", merges=3, sums="linear")
    assert "held in bf16" in Precision("bf16", merges=3).describe()
    assert "held in fp32" in Precision("bf16", merges=3, merge_format="fp32").describe()
    with pytest.raises(ValueError, match="^merge_format: the format of merged split states"):
        Precision("bf16", merge_format="fp32")
    with pytest.raises(ValueError, match="^merge_format:"):
        Precision("bf16", merges=3, merge_format="fp31")


@pytest.mark.parametrize("name", TORCH_FORMATS)
def test_round_to_matches_torch_casts(name):
    """Bit-exact against torch's casts on 2^18 random fp32 bit patterns (all classes:
    normals, subnormals, ties, overflow, inf, NaN) and on the edges of the format."""
    f = FORMATS[name]
    x = _all_fp32_bit_patterns(2**18, seed=1)
    edges = [f.max, f.max * (1 + f.u), f.max * (1 + f.u / 2), f.min_subnormal / 2]
    edges += [f.min_subnormal * 1.5, f.min_normal * (1 - f.u), math.inf, 0.0, -0.0]
    e = torch.tensor(edges, dtype=torch.float64).float()
    x = torch.cat([x, e, -e, torch.tensor([math.nan])])
    ref = x.to(f.torch_dtype).double()
    got = round_to(x.double(), name)
    bad = ~_same_bits(ref, got)
    assert not bad.any(), (x[bad][:5], ref[bad][:5], got[bad][:5])
    # a tensor held in the format already rounds to itself, in either rounding (the
    # shortcut of such inputs: float64, a copy)
    held = x.to(f.torch_dtype)
    for rounding in ("rne", "rtz"):
        same = round_to(held, name, rounding)
        assert same.dtype == torch.float64 and _same_bits(same, held.double()).all()


@pytest.mark.parametrize("rounding", ["rne", "rtz"])
def test_round_to_in_chunks_is_the_same_rounding(monkeypatch, rounding):
    """Inputs past ``ROUND_CHUNK`` entries round in chunks: bit for bit the same result, of
    the same shape and layout, for permuted, sliced and expanded inputs and every format."""
    import attnprec.analysis.precision as P

    x = _all_fp32_bit_patterns(2**14, seed=3).double().reshape(16, 32, 32)
    inputs = [x.permute(2, 0, 1), x[:, ::2], x[:1].expand(3, 32, 32)]
    whole = {(i, name): round_to(a, name, rounding) for i, a in enumerate(inputs)
             for name in TORCH_FORMATS}  # fmt: skip
    monkeypatch.setattr(P, "ROUND_CHUNK", 1000)  # chunks, the last one short
    for (i, name), ref in whole.items():
        got = round_to(inputs[i], name, rounding)
        assert got.shape == ref.shape and got.stride() == ref.stride(), (i, name)
        assert _same_bits(ref, got).all(), (i, name)


def test_round_to_rtz_matches_bf16_truncation():
    """'rtz' to bf16 is the Triton interpreter's conversion: drop the low 16 bits.

    NaNs are left out: truncating a NaN whose payload sits in the low bits gives inf, while
    round_to keeps NaN (documented)."""
    x = _all_fp32_bit_patterns(2**18, seed=2)
    x = x[~torch.isnan(x)]
    truncated = (x.view(torch.int32) & ~0xFFFF).view(torch.float32).double()
    got = round_to(x.double(), "bf16", "rtz")
    assert _same_bits(truncated, got).all()


def _exact_round(x: float, f: Format, rounding: str) -> float:
    """Reference rounding in rationals: the nearest (ties even) or truncated grid point."""
    if x == 0 or not math.isfinite(x):
        return x
    a = Fraction(abs(x))
    e = max(math.floor(math.log2(a)), f.emin)
    while Fraction(2) ** e > a:  # floor(log2) in exact terms
        e -= 1
    while Fraction(2) ** (e + 1) <= a:
        e += 1
    e = max(e, f.emin)
    ulp = Fraction(2) ** (e - f.precision + 1)
    m = a / ulp
    r = math.floor(m)
    if rounding == "rne" and (m - r > Fraction(1, 2) or (m - r == Fraction(1, 2) and r % 2)):
        r += 1
    y = r * ulp
    if y > f.max:
        y = Fraction(f.max) if (rounding == "rtz" or not f.has_inf) else None
    return math.copysign(math.inf if y is None else float(y), x)


@given(
    x=st.floats(allow_nan=False, allow_infinity=False, width=64),
    name=st.sampled_from(sorted(FORMATS)),
    rounding=st.sampled_from(["rne", "rtz"]),
)
def test_round_to_exact_in_rationals(x, name, rounding):
    """Any float64 (not only fp32 values): single rounding, checked in exact rationals."""
    f = FORMATS[name]
    got = round_to(torch.tensor([x], dtype=torch.float64), f, rounding).item()
    want = _exact_round(x, f, rounding)
    assert _same_bits(
        torch.tensor([got], dtype=torch.float64), torch.tensor([want], dtype=torch.float64)
    ).all()
    if math.isfinite(got) and abs(x) <= f.max:
        assert abs(got - x) <= f.rounding_error(abs(x), rounding)


def test_round_to_single_rounding_differs_from_torch_double_cast():
    # torch casts float64 -> fp16 through float32; round_to rounds once (documented).
    x = torch.tensor([1 + 2**-11 + 2**-40], dtype=torch.float64)
    assert round_to(x, "fp16").item() == 1 + 2**-10
    assert x.to(torch.float16).double().item() == 1.0


def test_round_to_rejects():
    with pytest.raises(TypeError, match="x"):
        round_to(torch.tensor([1, 2]), "fp16")
    with pytest.raises(ValueError, match="rounding"):
        round_to(torch.tensor([1.0]), "fp16", "rtn")
    with pytest.raises(ValueError, match="fmt"):
        round_to(torch.tensor([1.0]), "fp4")


def test_rounding_error_rtz_and_tensor():
    f = FORMATS["fp16"]
    a = torch.tensor([0.0, 1.0, 100.0], dtype=torch.float64)
    binade = torch.tensor([0.0, 1.0, 64.0], dtype=torch.float64)  # 2^floor(log2 a)
    assert torch.equal(f.rounding_error(a, "rtz"), 2 * f.u * binade + f.min_subnormal)
    assert f.rounding_error(0.0) == f.min_subnormal / 2
    # half an ulp of the binade holds every value up to abs_x, each rounding's worst case
    assert f.rounding_error(1.999) == f.u + f.min_subnormal / 2
    g = torch.Generator().manual_seed(0)
    for rounding in ("rne", "rtz"):
        x = torch.rand(100_000, generator=g, dtype=torch.float64) * 1.999
        err = (round_to(x, "fp16", rounding) - x).abs()
        assert bool((err <= f.rounding_error(1.999, rounding)).all())


def test_tf32_is_a_compute_format_only():
    """tf32 rounds the operands of a tensor-core product (ties away); no tensor holds it,
    and a storage of tf32 rounded the inputs to nearest even: a kernel that converts them as
    the hardware does was 1.49x outside the quantization part (a review)."""
    assert Precision("fp32", compute="tf32").compute is FORMATS["tf32"]
    for field in ("storage", "weights", "output"):
        kw = {"storage": "fp32", field: "tf32"}
        with pytest.raises(ValueError, match=f"{field}: tf32 is a compute format"):
            Precision(**kw)


def test_rtz_rounds_every_conversion_to_storage():
    """rounding='rtz' (the Triton interpreter's float32->bfloat16 truncation) applies to the
    inputs held in storage and to the weights' cast, not only to the output store."""
    x = torch.tensor([1 + 2.0**-8 + 2.0**-12, -(1 + 2.0**-7 + 2.0**-9)], dtype=torch.float64)
    assert torch.equal(Precision("bf16", rounding="rtz").stored(x), round_to(x, "bf16", "rtz"))
    assert not torch.equal(round_to(x, "bf16", "rtz"), round_to(x, "bf16"))
    assert FORMATS["bf16"].rounding_units("rtz") == (2.0**-7, 2.0**-133)
    assert FORMATS["bf16"].rounding_units("rne") == (2.0**-8, 2.0**-134)


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (("x", 0, 10, -10, math.nan), "precision"),
        (("x", 11, 14, 15, 65504.0), "emin"),
        (("x", 11, -14, 0, 65504.0), "emax"),
        (("x", 11, -14, 15, 1e9), "max"),
        (("x", 11, -14, 15, math.nan), "max"),
        (("x", 11, -14, 15, 65504.0, "False"), "has_inf"),
        ((3, 11, -14, 15, 65504.0), "name"),
    ],
)
def test_a_user_format_is_checked(args, name):
    """A review: ``Format("x", 0, 10, -10, nan)`` was taken (``u = 1``) and every bound
    trusted it."""
    with pytest.raises((TypeError, ValueError), match=f"^{name}:"):
        Format(*args)
    assert Format("x", 11, -14, 15, 65504.0).u == 2.0**-11
    # the OCP MX FP4 format (least normal 1: emin = 0) and NumPy numbers, kept as Python's
    fp4 = Format("e2m1", 2, 0, 2, np.float16(6.0), np.bool_(False))
    assert fp4.max == 6.0 and type(fp4.max) is float and fp4.has_inf is False
    assert float(round_to(torch.tensor([2.6], dtype=torch.float64), fp4)) == 3.0


def test_the_logs_floor_is_counted_as_its_ulps_are():
    """One definition of a log's absolute error near 1 (it was written five ways: a
    merge's, a semiring's log c, the log-space sums', the recurrences'): ``log_abs`` units
    of float32 (of compute when wider), plus ``narrow`` ulps of a narrower compute, as
    :meth:`Precision.op_error` counts the log's relative error."""
    from attnprec.analysis.precision import ELEMENTARY, Elementary

    u32 = 2.0**-24
    assert Precision("fp32").log_floor() == 4 * u32
    assert Precision("fp64", compute="fp64").log_floor() == 4 * 2.0**-53
    half = Precision("fp16", compute="fp16")
    assert half.log_floor() == 4 * u32 + 2 * 1.1 * 2.0**-11
    assert Precision("fp32", elementary=ELEMENTARY["libm"]).log_floor() == 0.0
    assert Precision("bf16", compute="bf16", elementary=Elementary(log_abs=8.0)).log_floor() == (
        8 * u32 + 2 * 1.1 * 2.0**-8
    )
