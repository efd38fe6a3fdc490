"""FP8 attention (e4m3/e5m2 with scale factors, the weights cast to FP8): the quantizer,
the declaration, the bound of the reference kernel on every family, defective kernels."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings

from attnprec.analysis.audit import audit, audit_output
from attnprec.analysis.bounds import attention_error_bound
from attnprec.analysis.precision import (
    ONE_PASS,
    Format,
    Precision,
    fp8_weights_scale,
    quantize,
    round_to,
    scale_factors,
)
from attnprec.analysis.reference import reference
from attnprec.attention import softmax_attention
from attnprec.fp8 import fp8_precision, fp8_softmax_attention
from attnprec.methods import FAMILIES, SCALED_FAMILIES
from attnprec.testing import attention_inputs, make_inputs

FMTS = ("e4m3", "e5m2")
SCALINGS = ("tensor", 8)


def _inputs(family: str, seed: int = 0, n: int = 20, d: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return make_inputs(family, n_q=n, d_k=d, dtype=torch.float32, generator=g)


def _kernel(fmt: str, scaling: object):
    def fn(q, k, v, **kw):
        return fp8_softmax_attention(q, k, v, fmt=fmt, scaling=scaling, **kw)

    return fn


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("family", FAMILIES + SCALED_FAMILIES)
def test_reference_kernel_within_its_bound(fmt, scaling, family):
    q, k, v = _inputs(family, seed=len(family))
    causal = family in ("ties", "overrange")
    rep = audit(
        _kernel(fmt, scaling), "softmax", q, k, v, precision=fp8_precision(fmt, scaling),
        family=family, causal=causal,
    )  # fmt: skip
    case = rep.cases[0]
    assert case.counts["violated"] == 0 and case.counts["unbounded"] == 0, case.describe()
    assert case.verdict == "ok", case.describe()
    # the bound is not vacuous: within a small factor of the error
    assert case.total.tightness < 20


def _no_p_descale(q, k, v, **kw):
    # forgets to divide by the weights scale after the P8 @ V8 product
    return fp8_softmax_attention(q, k, v, **kw).float() * fp8_weights_scale("e4m3")


def _clipping_scales(q, k, v, **kw):
    # scales 8x too small: values beyond max / 8 saturate in e4m3
    held = []
    for x in (q, k, v):
        codes, s = quantize(x, "e4m3", scale=scale_factors(x, "e4m3") / 8)
        held.append(codes * s)
    return softmax_attention(*held, **kw).to(torch.bfloat16)


@pytest.mark.parametrize("fn", [_no_p_descale, _clipping_scales])
def test_defective_fp8_kernels_are_flagged(fn):
    q, k, v = _inputs("typical", seed=3)
    case = audit(fn, "softmax", q, k, v, precision=fp8_precision()).cases[0]
    assert case.verdict == "VIOLATED" and case.counts["violated"] > 0


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("scaling", SCALINGS)
def test_quantize_a_priori_bound(fmt, scaling):
    f = Format.of(fmt)
    q, _, v = _inputs("overrange", seed=1, n=33)
    for x in (q, v, q * 1e-30):
        s = scale_factors(x, f, scaling)
        assert torch.equal(s, s.float().double())  # float32 scales
        codes, s2 = quantize(x, f, scaling)
        assert torch.equal(s, s2)
        x64 = x.double()
        assert bool(((x64 / s).abs() <= f.max).all())  # no value clips
        err = (codes * s - x64).abs()
        assert bool((err <= s * (f.u * (x64 / s).abs() + f.min_subnormal / 2)).all())
        assert torch.equal(Precision(f, scaling=scaling).stored(x), codes * s)


def test_quantization_part_covers_the_stored_inputs():
    # the exact output moves by at most the quantization part when q, k, v are quantized
    q, k, v = _inputs("outliers", seed=5)
    prec = fp8_precision("e5m2", 4)
    b = attention_error_bound("softmax", q, k, v, prec)
    held = [prec.stored(x) for x in (q, k, v)]
    moved = (softmax_attention(*held) - softmax_attention(q.double(), k.double(), v.double())).abs()
    assert bool((moved <= b.quantization).all()) and bool((b.quantization > 0).any())


@settings(max_examples=6, deadline=None)
@given(attention_inputs("softmax", families=("overrange", "typical"), max_n=12, max_d=6))
def test_strategy_draws_the_overrange_family(case):
    assert case.q.dtype == torch.float32 and bool(torch.isfinite(case.v).all())
    rep = audit(
        _kernel("e4m3", 4), "softmax", case.q, case.k, case.v,
        precision=fp8_precision("e4m3", 4), **case.params,
    )  # fmt: skip
    assert rep.cases[0].counts["violated"] == 0


def test_overrange_needs_scales():
    q, k, v = _inputs("overrange")
    assert float(q.abs().max()) > 448 and float(v.abs().max()) > 57344
    assert float(k.abs().max()) < 2.0**-9 * 2**3
    with pytest.raises(ValueError, match="v: overflows the storage format e5m2"):
        attention_error_bound("softmax", q, k, v, "e5m2")


@pytest.mark.parametrize("scale", [-1.0, 0.0, math.nan, math.inf, torch.tensor([1.0, -2.0])])
def test_bad_scale_named(scale):
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="scale: expected positive finite"):
        quantize(x, "e4m3", scale=scale)


def test_bad_arguments_named():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="fmt: expected one of"):
        quantize(x, "e3m4")
    with pytest.raises(ValueError, match="fmt: expected one of"):
        fp8_precision("fp16")
    with pytest.raises(ValueError, match="fmt: expected one of"):
        fp8_softmax_attention(x, x, x, fmt="e8m0")
    with pytest.raises(ValueError, match="scaling: expected"):
        Precision("e4m3", scaling="row")
    with pytest.raises(ValueError, match="scaling: expected"):
        scale_factors(x, "e4m3", 0)
    with pytest.raises(ValueError, match="weights_scale: expected a finite number"):
        Precision("e4m3", weights="e4m3", weights_scale=-1.0)
    with pytest.raises(ValueError, match="weights_scale: expected at most"):
        Precision("e4m3", weights="e4m3", weights_scale=1000.0)
    with pytest.raises(ValueError, match="weights_scale: expected at least 0.015625"):
        Precision("e4m3", weights="e4m3", weights_scale=2.0**-10)
    with pytest.raises(ValueError, match="weights_scale: expected at least 6.1"):
        Precision("fp16", compute="fp16", weights="bf16", weights_scale=1e-10)
    with pytest.raises(ValueError, match="weights_scale: needs weights="):
        Precision("e4m3", weights_scale=2.0)
    with pytest.raises(ValueError, match="weights: expected one of"):
        Precision("e4m3", weights="e9m9")
    with pytest.raises(ValueError, match="x: expected finite"):
        scale_factors(torch.tensor([[1.0, math.nan]]), "e4m3")
    with pytest.raises(ValueError, match="precision: scale factors and weight casts"):
        attention_error_bound("log", x, x, x, fp8_precision())


def test_inputs_held_in_an_fp8_dtype_are_accepted():
    """q, k, v as float8_e4m3fn tensors (a review): the finiteness check called torch's
    isfinite, which e4m3 lacks, and every bound and audit raised its NotImplementedError;
    the attention functions accepted them. A NaN among them is refused naming it."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, 4, generator=g).to(torch.float8_e4m3fn) for _ in range(3))
    prec = Precision("e4m3")
    b = attention_error_bound("softmax", q, k, v, prec)
    assert bool(torch.isfinite(b.total).all())
    out = softmax_attention(*(x.float() for x in (q, k, v))).to(torch.float8_e4m3fn)
    rep = audit_output(out, "softmax", q, k, v, precision=prec)
    assert rep.ok
    bad = v.clone()
    bad[3, 1] = math.nan
    with pytest.raises(ValueError, match="^v: expected finite"):
        attention_error_bound("softmax", q, k, bad, prec)


@pytest.mark.parametrize("method", ["ssd", "selective_scan", "h3", "gated"])
@pytest.mark.parametrize("held", ["qkv", "params"])
def test_the_recurrent_methods_accept_fp8_inputs_and_parameters(method, held):
    """A review: the state-space and gated references raised torch's NotImplementedError
    on e4m3 q, k, v (isinf) and on e4m3 parameters (isfinite, log_g > 0), and so did the
    plain implementations on e4m3 parameters. One-byte floats are now read widened to
    float32 (exact) where they enter: the same reference as of the float32 copies."""
    from attnprec.attention import (
        gated_linear_attention,
        h3_attention,
        selective_scan_attention,
        ssd_attention,
    )

    f8 = torch.float8_e4m3fn
    g = torch.Generator().manual_seed(0)
    q, k = ((torch.randn(5, 3, generator=g) * 4).to(f8) for _ in range(2))
    v = torch.randn(5, 2, generator=g).to(f8)
    params = {
        "ssd": {"dt": torch.rand(5, generator=g) + 0.1, "A": -0.5},
        "selective_scan": {
            "delta": torch.rand(5, 2, generator=g) + 0.1,
            "A": -torch.rand(2, 3, generator=g) - 0.1,
        },
        "h3": {"shift": torch.randn(2, generator=g), "log_decay": -torch.rand(3, generator=g)},
        "gated": {"log_g": -torch.rand(5, generator=g)},
    }[method]
    if held == "params":
        q, k, v = (x.float() for x in (q, k, v))
        params = {key: x.to(f8) if isinstance(x, torch.Tensor) else x for key, x in params.items()}
    wide = {key: x.float() if isinstance(x, torch.Tensor) else x for key, x in params.items()}
    ref = reference(method, q, k, v, causal=True, **params)
    ref32 = reference(method, q.float(), k.float(), v.float(), causal=True, **wide)
    assert torch.equal(ref.value, ref32.value) and torch.equal(ref.radius, ref32.radius)
    prec = Precision("e4m3" if held == "qkv" else "fp32")
    assert bool(torch.isfinite(attention_error_bound(method, q, k, v, prec, **params).total).all())
    fn = {
        "ssd": ssd_attention,
        "selective_scan": selective_scan_attention,
        "h3": h3_attention,
        "gated": gated_linear_attention,
    }[method]
    out = fn(q.float(), k.float(), v.float(), causal=True, **params)
    assert torch.equal(out, fn(q.float(), k.float(), v.float(), causal=True, **wide))


def test_elementary_and_output_none_as_in_fp8_precision():
    with pytest.raises(ValueError, match=r"^elementary: expected one of \('default', 'libm'\)"):
        fp8_precision(elementary="libn")  # a bare KeyError before
    # output=None: stored in fmt, as fp8_precision(output=None) declares (a TypeError before)
    q, k, v = _inputs("typical", n=6, d=4)
    prec = fp8_precision("e4m3", output=None)
    assert prec.output_format.name == "e4m3"
    out = fp8_softmax_attention(q, k, v, output=None)
    assert out.dtype == torch.float8_e4m3fn
    b = attention_error_bound("softmax", q, k, v, prec)
    ref = reference("softmax", q, k, v)
    assert bool(((out.double() - ref.value).abs() <= b.total + ref.radius).all())


def test_declaration_describes_the_recipe():
    p = fp8_precision("e5m2", 64)
    assert p.weights_scale == 2.0**15 and p.output_format.name == "bf16"
    text = p.describe()
    assert "per block of 64 rows" in text and "weights cast to e5m2" in text
    assert Precision("fp16").output_format.name == "fp16"


def test_cli_audits_fp8(capsys):
    from attnprec.cli import main

    base = ["audit", "--method", "softmax", "--n", "12", "--d", "4", "--quiet"]
    rc = main([*base, "--dtype", "e5m2", "--fp8-scale", "block", "--fp8-block", "4",
               "--family", "typical", "--family", "overrange"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "fp8.fp8_softmax_attention" in out and "overrange" in out
    # a kernel of the user's under the recipe's declaration (--compute etc. apply)
    rc = main([*base, "--dtype", "e4m3", "--family", "sinks",
               "--kernel", "attnprec.fp8:fp8_softmax_attention"])  # fmt: skip
    assert rc == 0
    for bad in (
        ["audit", "--dtype", "e4m3", "--method", "log"],
        [*base, "--dtype", "e4m3", "--kernel", "torch:sdpa"],
    ):
        with pytest.raises(SystemExit) as e:
            main(bad)
        assert e.value.code == 2
        assert "--dtype" in capsys.readouterr().err


def test_a_python_scale_factor_is_kept_in_float64():
    """A scale given as a Python number is used as given (it was rounded to float32 first:
    1/3 became 0.3333333432674408)."""
    x = torch.tensor([1.0], dtype=torch.float64)
    _, s = quantize(x, "e4m3", scale=1 / 3)
    assert float(s) == 1 / 3


def test_descale_outside_compute_is_unbounded():
    """The logits' descale ``scale s_q s_k`` in compute: N(0, 1) stored in e5m2 have scales
    near 2^-14, their product near 2^-28, which fp16 compute holds as 0 (every logit 0, the
    weights uniform): a review's kernel computing as declared was certified outside the
    bound (2.1-7.0x). Likewise an s_q below fp32's normal range (q near 2^-131): 300x.
    Those rows are unbounded, the reason named; the recipe's fp32 compute on the same
    N(0, 1) inputs is not flagged."""
    q, k, v = _inputs("typical", n=16, d=16)
    reason = "descale scale s_q s_k in fp16"
    eb = attention_error_bound("softmax", q, k, v, fp8_precision("e5m2", "tensor", compute="fp16"))
    assert bool(eb.unbounded[reason].all()) and bool(torch.isinf(eb.total).all())
    for fmt in FMTS:
        eb = attention_error_bound("softmax", q, k, v, fp8_precision(fmt, "tensor"))
        assert not eb.unbounded and bool(torch.isfinite(eb.total).all())
    tiny = torch.full((1, 8), 448 * 2.0**-140)
    eb = attention_error_bound("softmax", tiny, k[:, :8], v, fp8_precision("e4m3", "tensor"))
    assert bool(eb.unbounded["descale scale s_q s_k in fp32"].all())


@pytest.mark.parametrize(
    "case, reason",
    [
        ("s_q", "descale scale s_q s_k in fp32"),
        ("s_v", "value descale s_v / c_p in fp32"),
        ("s_v / c_p", "value descale s_v / c_p in fp32"),
    ],
)
def test_a_scale_constant_a_flushing_kernel_reads_as_zero_is_unbounded(case, reason):
    """A scale factor itself below fp32's normal range, which a flush-to-zero kernel (the
    declaration allows it) reads as 0: every logit or every output 0. A review's kernels
    were 45x (s_q of 7e-40, with every partial product of the descale normal), 1.8x
    (s_v of 5e-40) and 3.4x (s_v / c_p folded, 1.6e-39) outside finite bounds."""
    q, k, v = _inputs("typical", n=16, d=8)
    fmt, scale = "e4m3", None
    if case == "s_q":
        q, k, scale = q * 1e-37, k * 1e30, 1e8
    elif case == "s_v":
        fmt, v = "e5m2", v * 1e-35
    else:  # s_v normal, s_v / c_p not
        fmt, v = "e5m2", v * 1e-30
    kernel = _ftz_kernel(fmt, scale, folded=case == "s_v / c_p")
    y = kernel(q, k, v)
    eb = attention_error_bound("softmax", q, k, v, fp8_precision(fmt, "tensor"), scale=scale)
    assert bool(eb.unbounded[reason].all()) and bool(torch.isinf(eb.total).all())
    ref = reference("softmax", q, k, v, scale=scale)
    # the kernel reads the constant as 0: every logit 0 (uniform weights: every row the
    # same) or every output 0, where the exact rows differ and are nonzero
    if case == "s_q":
        assert bool((y == y[..., :1, :]).all()) and not bool((ref.value == ref.value[:1]).all())
    else:
        assert bool((y == 0).all()) and bool((ref.value != 0).any())


def _ftz_kernel(fmt, scale, folded):
    """The FP8 recipe in fp32 with flush to zero: subnormal operands and results read as 0;
    the value descale as ``((acc s_v) / c_p) / D``, or ``acc (s_v / c_p) / D`` folded."""
    tiny = 2.0**-126

    def ftz(t):
        return torch.where(t.abs() < tiny, torch.zeros_like(t), t)

    def kernel(q, k, v):
        prec = fp8_precision(fmt, "tensor")
        (qc, sq), (kc, sk), (vc, sv) = (quantize(x, fmt, "tensor") for x in (q, k, v))
        qc, kc, vc, sq, sk, sv = (ftz(t.float()) for t in (qc, kc, vc, sq, sk, sv))
        sc = torch.tensor(1 / math.sqrt(q.shape[-1]) if scale is None else scale)
        x = ftz((qc @ kc.transpose(-1, -2)) * ftz(ftz(sc * sq) * sk))
        p = ftz(torch.exp(x - x.amax(-1, keepdim=True)))
        c = torch.tensor(prec.weights_scale, dtype=torch.float32)
        acc = ftz(round_to((p * c).double(), fmt).float() @ vc)
        d = p.sum(-1, keepdim=True)
        o = ftz(ftz(acc * ftz(sv / c)) / d) if folded else ftz(ftz(ftz(acc * sv) / c) / d)
        return o.double()

    return kernel


def test_weights_cast_past_the_format_is_unbounded():
    """The weights' cast, in the kernel's units: e5m2 with ``weights_scale`` its max and an
    exp declared within ``2^20 - 1`` ulps overflows (64,440 > 61,440: every output NaN under
    a finite bound); a mixture's weights reach its number of terms after the shift (2 x 256
    saturated at e4m3's 448, 3.0x outside). Both reviews' cases."""
    from attnprec.analysis.precision import Elementary
    from attnprec.attention.semiring import MixtureLSE

    g = torch.Generator().manual_seed(15)
    q, k, v = (torch.randn(1, 16, 8, generator=g) for _ in range(3))
    loose = fp8_precision(
        "e5m2", "tensor", weights_scale=57344.0, elementary=Elementary(exp=2**20 - 1)
    )
    b = attention_error_bound("softmax", q, k, v, loose)
    assert bool(b.unbounded["weights cast to e5m2"].all())
    assert not attention_error_bound("softmax", q, k, v, fp8_precision("e5m2")).unbounded
    q, k = torch.ones(1, 1, dtype=torch.float64), torch.zeros(8, 1, dtype=torch.float64)
    v = torch.ones(8, 1, dtype=torch.float64)
    mix = MixtureLSE((0.5, 0.5), (0.5, 1.0))
    cast = Precision("bf16", weights="e4m3", weights_scale=256.0)
    b = attention_error_bound("semiring", q, k, v, cast, semiring=mix, scale=1.0)
    assert bool(b.unbounded["weights cast to e4m3"].all())
    ok = Precision("bf16", weights="e4m3", weights_scale=128.0)  # 2 x 128 <= 448
    assert not attention_error_bound("semiring", q, k, v, ok, semiring=mix, scale=1.0).unbounded


def test_mixture_weights_cast_bounded_from_the_inputs():
    """A mixture's weights cast to e4m3 (times 256) on ordinary inputs: each key's weight
    ``sum_r exp(t_r - m)`` reaches 448 / 256 = 1.75 only where its terms nearly meet, so the
    bound is finite where no key's can (one shift by the row maximum; any schedule with
    terms far apart), and a one-pass float32 kernel with a saturating cast stays within
    it. The worst case over the terms, ``n_t x 256 = 512 > 448``, made every element
    unbounded (a review)."""
    from attnprec.attention import MixtureLSE

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 32, 8, generator=g).double() for _ in range(3))
    near, far = MixtureLSE((0.5, 0.5), (0.5, 1.0)), MixtureLSE((1.0, 1e-3), (1.0, 1.5))
    one = Precision("fp32", weights="e4m3", weights_scale=256.0, block=ONE_PASS, sums="linear")
    anyo = Precision("fp32", weights="e4m3", weights_scale=256.0)
    f32 = torch.float32
    for mix, prec in ((near, one), (far, one), (far, anyo)):
        x = (q.to(f32) @ k.to(f32).transpose(-1, -2)) * torch.tensor(8**-0.5, dtype=f32)
        lt = torch.stack([lam * x + math.log(c) for c, lam in mix.terms])
        p = torch.exp(lt - lt.amax((0, -1), keepdim=True)).sum(0)
        p8 = round_to(p.double() * 256, "e4m3").to(f32)  # (saturates at 448)
        y = ((p8 @ v.to(f32)) / 256 / p.sum(-1, keepdim=True)).double()
        ref = reference("semiring", q, k, v, semiring=mix)
        b = attention_error_bound("semiring", q, k, v, prec, semiring=mix)
        assert not b.unbounded and bool(torch.isfinite(b.total).all())
        assert bool(((y - ref.value).abs() + ref.radius <= b.total).all())
    # where a key's terms meet (s near 0: a weight near 2) a running maximum may start at it
    b = attention_error_bound("semiring", q, k, v, anyo, semiring=near)
    assert bool(b.unbounded["weights cast to e4m3"].any())


def test_the_built_in_kernel_is_audited_as_one_pass(capsys):
    """It shifts each row by its largest visible logit; audited under ``block=None`` (one
    shift by the whole sequence's maximum allowed) causal rows' cast weights could vanish:
    every run of ``--causal --n 128`` was UNBOUNDED (a review)."""
    from attnprec.cli import main

    rc = main(["audit", "--method", "softmax", "--dtype", "e4m3", "--causal", "--n", "128",
               "--d", "16", "--family", "outliers", "--quiet"])  # fmt: skip
    assert rc == 0, capsys.readouterr().out
    # --fp8-block without --fp8-scale block was ignored silently
    with pytest.raises(SystemExit) as e:
        main(["audit", "--method", "softmax", "--dtype", "e4m3", "--fp8-block", "16"])
    assert e.value.code == 2 and "--fp8-block" in capsys.readouterr().err


def test_a_scale_past_float32_is_refused():
    """An amax above 448 x FLT_MAX needs a float32 scale of inf: NaN codes, NaN outputs with
    no error (a review)."""
    x = torch.full((1, 4, 2), 1e42, dtype=torch.float64)
    with pytest.raises(ValueError, match="^x: .*past float32's range"):
        scale_factors(x, "e4m3")
    with pytest.raises(ValueError, match="past float32's range"):
        fp8_softmax_attention(x, x, x)


def _cache_kernel(q, k, v, prec: Precision) -> torch.Tensor:
    # the kernel's inputs as it holds them (its whole tensors scaled), a causal mask
    # aligned bottom-right, float64 arithmetic
    qh, kh, vh = (prec.stored(x) for x in (q, k, v))
    n_q, n_k = q.shape[-2], k.shape[-2]
    vis = torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q)
    s = (qh @ kh.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(s.masked_fill(~vis, -math.inf), -1) @ vh


def _cache_inputs(n_q: int, n_k: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, n_q, 8, generator=g)
    q[..., -1, :] *= 1e4  # a last row far larger: the blocks' scales differ
    k, v = (torch.randn(1, 1, n_k, 8, generator=g) for _ in "kv")
    return q, k, v


def test_a_padding_that_moves_the_scale_blocks_is_refused():
    # bottom_right puts n_k - n_q zero rows before the queries; with blocks of 4 rows and
    # one row of padding every judged row's block moved, and the bound was that of
    # another quantization (a review: a kernel that dropped a query row passed, the
    # correct one failed). Now refused, naming the precision and the alignment
    from attnprec.testing import assert_attention_close

    q, k, v = _cache_inputs(8, 9)
    prec = fp8_precision("e4m3", 4, block=ONE_PASS)
    out = _cache_kernel(q, k, v, prec)
    with pytest.raises(ValueError, match=r"precision: scaling=4.*causal_align='bottom_right'"):
        assert_attention_close(
            out, q, k, v, precision=prec, causal=True, causal_align="bottom_right"
        )


@pytest.mark.parametrize(("scaling", "n_k"), [(4, 12), ("tensor", 9)])
def test_a_padding_that_keeps_the_scales_is_judged(scaling, n_k):
    # a padding of whole blocks, or zero rows under one scale per tensor: the kernel's
    # scales, so the correct kernel passes and one that drops a query row fails
    from attnprec.testing import assert_attention_close

    q, k, v = _cache_inputs(8, n_k)
    prec = fp8_precision("e4m3", scaling, block=ONE_PASS)
    out = _cache_kernel(q, k, v, prec)
    kw = {"precision": prec, "causal": True, "causal_align": "bottom_right"}
    assert_attention_close(out, q, k, v, **kw)
    # inputs held in the FP8 dtype (a review: the scale check raised isfinite's error)
    held = [(100 * x / x.abs().amax()).to(torch.float8_e4m3fn) for x in (q, k, v)]
    out_h = _cache_kernel(*(x.to(torch.float64) for x in held), prec)
    assert_attention_close(out_h, *held, **kw)
    bad = out.clone()
    bad[..., 3, :] = v[..., : n_k - 8 + 4, :].double().mean(-2)
    with pytest.raises(AssertionError):
        assert_attention_close(bad, q, k, v, **kw)


def test_keys_dropped_or_sequences_cut_out_under_other_scales_are_refused():
    # top_left drops the keys no query sees, and cu_seqlens judges each sequence alone:
    # under one scale per tensor the kernel's scale counts the rest too
    from attnprec.testing import assert_attention_close

    q, k, v = _cache_inputs(4, 6)
    k[..., 5, :] *= 1e4  # unseen under top_left, yet it sets the kernel's scale of k
    prec = fp8_precision("e4m3", "tensor", block=ONE_PASS)
    out = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match=r"precision: scaling='tensor'.*whole k.*top_left"):
        assert_attention_close(out, q, k, v, precision=prec, causal=True, causal_align="top_left")
    g = torch.Generator().manual_seed(1)
    qp, kp, vp = (torch.randn(1, 8, 8, generator=g) for _ in "qkv")
    qp[:, 4:] *= 1e4
    with pytest.raises(ValueError, match=r"precision: scaling='tensor'.*whole q.*cu_seqlens"):
        assert_attention_close(
            torch.zeros(1, 8, 8), qp, kp, vp, precision=prec, cu_seqlens=torch.tensor([0, 4, 8])
        )
