"""Bad input: a clear ValueError/TypeError naming the argument, for every method."""

from __future__ import annotations

import pytest
import torch

from attnprec.attention import (
    LogExpMean,
    MixtureLSE,
    SoftMaxPlus,
    Tropical,
    favor_attention,
    favor_features,
    favor_projection,
    gated_linear_attention,
    linear_attention,
    log_attention,
    polynomial_attention,
    semiring_attention,
    softmax_attention,
    taylor_attention,
    taylor_features,
    taylor_multinomials,
)

F64 = torch.float64


def _qkv(n_q=4, n_k=4, d_k=3, d_v=2, dtype=F64):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(n_q, d_k, generator=g).to(dtype),
        torch.randn(n_k, d_k, generator=g).to(dtype),
        torch.randn(n_k, d_v, generator=g).to(dtype),
    )


CALLS = {
    "softmax": lambda q, k, v, **kw: softmax_attention(q, k, v, **kw),
    "log": lambda q, k, v, **kw: log_attention(q, k, v, **kw),
    "taylor": lambda q, k, v, **kw: taylor_attention(q, k, v, degree=2, **kw),
    "polynomial": lambda q, k, v, **kw: polynomial_attention(q, k, v, (1.0, 1.0, 0.5), **kw),
    "linear": lambda q, k, v, **kw: linear_attention(q, k, v, **kw),
    "favor": lambda q, k, v, **kw: favor_attention(q, k, v, num_features=4, **kw),
    "semiring": lambda q, k, v, **kw: semiring_attention(q, k, v, semiring=LogExpMean(1.0), **kw),
    "gated": lambda q, k, v, **kw: gated_linear_attention(
        q, k, v, torch.zeros(k.shape[-2], dtype=F64), **kw
    ),
}
ALL = list(CALLS)
NONCAUSAL = [m for m in ALL if m != "gated"]


@pytest.mark.parametrize("method", ALL)
def test_mismatched_d_k(method):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="^k: expected d_k=3"):
        CALLS[method](q, k[:, :2], v)


@pytest.mark.parametrize("method", NONCAUSAL)
def test_mismatched_n_k(method):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="^v: expected n_k=4"):
        CALLS[method](q, k, v[:3])


@pytest.mark.parametrize("method", NONCAUSAL)
def test_causal_needs_square(method):
    q, k, v = _qkv(n_q=3, n_k=4)
    with pytest.raises(ValueError, match="^causal"):
        CALLS[method](q, k, v, causal=True)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("bad", [torch.complex128, torch.int64, torch.bool])
def test_non_real_float_tensors(method, bad):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="^q: expected a real floating-point tensor"):
        CALLS[method](q.to(bad), k, v)


@pytest.mark.parametrize("method", ALL)
def test_mixed_dtypes(method):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="q, k, v: expected one dtype"):
        CALLS[method](q, k.float(), v)


@pytest.mark.parametrize("method", ["log", "taylor", "polynomial", "linear", "favor"])
def test_state_needs_causal(method):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="^state"):
        CALLS[method](q, k, v, return_state=True)


@pytest.mark.parametrize("method", ["log", "taylor", "linear", "favor", "gated"])
def test_state_of_wrong_kind(method):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="^state"):
        CALLS[method](q, k, v, causal=True, state=(1, 2))


def test_state_from_another_method():
    q, k, v = _qkv()
    _, st = taylor_attention(q, k, v, causal=True, return_state=True)
    with pytest.raises(ValueError, match="^state: produced by 'taylor'"):
        linear_attention(q, k, v, causal=True, state=st)


@pytest.mark.parametrize("degree", [-1, -5])
def test_negative_degree(degree):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="^degree"):
        taylor_attention(q, k, v, degree=degree)


@pytest.mark.parametrize("degree", [2.0, True, "2"])
def test_non_integer_degree(degree):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="^degree"):
        taylor_attention(q, k, v, degree=degree)


def test_feature_helpers_bad_args():
    with pytest.raises(ValueError, match="^p"):
        taylor_features(torch.ones(3, dtype=F64), -1)
    with pytest.raises(TypeError, match="^x"):
        taylor_features(torch.ones(3, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="^d"):
        taylor_multinomials(0, 2)
    # capped as taylor_attention's degree (a hang and an OverflowError before), d = 0 refused
    with pytest.raises(ValueError, match="^p: expected at most 170"):
        taylor_features(torch.ones(3, dtype=F64), 10**30)
    with pytest.raises(ValueError, match="^p: expected at most 170"):
        taylor_multinomials(3, 10**30)
    with pytest.raises(ValueError, match="^x: expected d >= 1"):
        taylor_features(torch.ones(2, 0, dtype=F64), 2)


@pytest.mark.parametrize(
    ("coeffs", "exc"),
    [
        ((), ValueError),
        ((1.0, float("nan")), ValueError),
        ((0.0, 0.0), ValueError),
        ("12", TypeError),
        ((1.0, "a"), TypeError),
        (torch.ones(2, 2, dtype=F64), ValueError),
    ],
)
def test_bad_coeffs(coeffs, exc):
    q, k, v = _qkv()
    with pytest.raises(exc, match="^coeffs"):
        polynomial_attention(q, k, v, coeffs)


@pytest.mark.parametrize("m", [0, -3])
def test_num_features_below_one(m):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="^num_features"):
        favor_attention(q, k, v, num_features=m)
    with pytest.raises(ValueError, match="^num_features"):
        favor_projection(m, 3)


def test_num_features_beyond_int32_named():
    q, k, v = _qkv()  # torch's "Overflow when unpacking long long" before
    with pytest.raises(ValueError, match="^num_features: expected an integer <= 2147483647"):
        favor_attention(q, k, v, num_features=10**30)
    with pytest.raises(ValueError, match="^num_features: expected an integer <= 2147483647"):
        favor_projection(2**31, 3)


@pytest.mark.parametrize("q", [None, [[1.0, 2.0]], torch.tensor(1.0, dtype=F64)])
def test_softmax_validates_q_before_reading_its_shape(q):
    _, k, v = _qkv()  # AttributeError / IndexError before
    with pytest.raises((TypeError, ValueError), match="^q: expected"):
        softmax_attention(q, k, v)


def test_bad_projection_and_scale():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="^projection"):
        favor_attention(q, k, v, projection=torch.ones(4, 2, dtype=F64))
    with pytest.raises(ValueError, match="^projection: has 4 rows"):
        favor_attention(q, k, v, projection=torch.ones(4, 3, dtype=F64), num_features=5)
    with pytest.raises(ValueError, match="^scale"):
        favor_attention(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="^scale"):
        favor_features(q, torch.ones(4, 3, dtype=F64), -0.5)
    with pytest.raises(ValueError, match="^scale"):
        softmax_attention(q, k, v, scale=float("inf"))


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: LogExpMean(0.0), "p"),
        (lambda: LogExpMean(-1.0), "p"),
        (lambda: SoftMaxPlus(0.0), "tau"),
        (lambda: SoftMaxPlus(float("inf")), "tau"),
        (lambda: MixtureLSE((1.0, -1.0), (1.0, 1.0)), "c"),
        (lambda: MixtureLSE((1.0,), (0.0,)), "lam"),
        (lambda: MixtureLSE((1.0, 1.0), (1.0,)), "lam"),
        (lambda: MixtureLSE((), ()), "lam"),
    ],
)
def test_nonpositive_semiring_parameters(make, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        make()


def test_bad_semiring_arguments():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="^semiring"):
        semiring_attention(q, k, v, semiring="max")
    with pytest.raises(ValueError, match="^linearize"):
        semiring_attention(q, k, v, semiring=Tropical(), linearize=("taylor", 2))
    with pytest.raises(ValueError, match="^linearize"):
        semiring_attention(q, k, v, semiring=LogExpMean(1.0), linearize=("chebyshev", 2))
    with pytest.raises(ValueError, match="^linearize"):
        semiring_attention(q, k, v, semiring=LogExpMean(1.0), linearize=("favor", 0))
    with pytest.raises(ValueError, match="^linearize"):
        semiring_attention(q, k, v, semiring=LogExpMean(1.0), linearize=("taylor", -1))
    with pytest.raises(ValueError, match="^linearize"):
        semiring_attention(q, k, v, semiring=LogExpMean(1.0), causal=True, return_state=True)


def test_bad_feature_map():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="^feature_map"):
        linear_attention(q, k, v, feature_map="relu")
    with pytest.raises(TypeError, match="^feature_map"):
        linear_attention(q, k, v, feature_map=3)
    with pytest.raises(ValueError, match="^feature_map"):
        linear_attention(q, k, v, feature_map=lambda x: x.sum())
    with pytest.raises(ValueError, match="^feature_map"):  # features of mixed sign cancel
        linear_attention(q, k, v, feature_map=lambda x: torch.cat([x, -x], -1))


def test_bad_gates():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="^log_g: expected log-gates <= 0"):
        gated_linear_attention(q, k, v, torch.full((4,), 0.1, dtype=F64))
    with pytest.raises(ValueError, match="^log_g: expected shape"):
        gated_linear_attention(q, k, v, torch.zeros(5, dtype=F64))
    with pytest.raises(TypeError, match="^log_g"):
        gated_linear_attention(q, k, v, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="^causal"):
        gated_linear_attention(q, k, v, torch.zeros(4, dtype=F64), causal=False)
    # per-step gates of a larger batch: a silently larger output before (a review)
    with pytest.raises(ValueError, match="^log_g: batch dims .5,. do not broadcast"):
        gated_linear_attention(q, k, v, torch.zeros(5, 4, dtype=F64))
    with pytest.raises(ValueError, match="^log_g: batch dims"):
        gated_linear_attention(q[None], k[None], v[None], torch.zeros(2, 3, 4, dtype=F64))


@pytest.mark.parametrize("chunk", [0, -1])
def test_bad_chunk_size(chunk):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="^chunk_size"):
        taylor_attention(q, k, v, chunk_size=chunk)


def test_no_keys():
    q, k, v = _qkv(n_k=0)
    with pytest.raises(ValueError, match="^k: expected at least one key"):
        softmax_attention(q, k, v)


@pytest.mark.parametrize(
    ("method", "causal"), [(m, c) for m in ALL for c in (False, True) if c or m != "gated"]
)
def test_no_rows_give_an_empty_output(method, causal):
    """No query and no key: an empty ``[0, d_v]`` output (softmax and the semirings raised
    from ``amax``)."""
    q, k, v = _qkv(n_q=0, n_k=0)
    out = CALLS[method](q, k, v, causal=causal)
    assert out.shape == (0, 2) and out.dtype == F64


def test_a_state_of_another_batch_is_refused():
    """A state carried from inputs of batch (2,) into inputs of batch (1,) broadcast and
    changed the output's shape; into batch (5,) it raised a RuntimeError naming nothing (a
    review). The batch dims are checked, naming ``state``, as the SSMs' are."""
    from attnprec.attention import gated_linear_attention, linear_attention, log_attention

    f64 = torch.float64
    one, two = torch.randn(1, 6, 3, dtype=f64), torch.randn(2, 6, 3, dtype=f64)
    for name in ("linear", "log", "gated"):
        if name == "linear":
            _, st = linear_attention(two, two, two, causal=True, return_state=True)
            call = lambda s: linear_attention(one, one, one, causal=True, state=s)  # noqa: E731
        elif name == "log":
            _, st = log_attention(two, two, two, causal=True, return_state=True)
            call = lambda s: log_attention(one, one, one, causal=True, state=s)  # noqa: E731
        else:
            _, st = gated_linear_attention(
                two, two, two, -torch.ones(2, 6, dtype=f64), return_state=True
            )
            call = lambda s: gated_linear_attention(  # noqa: E731
                one, one, one, -torch.ones(1, 6, dtype=f64), state=s
            )
        with pytest.raises(ValueError, match="state: expected"):
            call(st)


def test_per_step_gates_whose_channel_reading_cannot_fit_are_read_per_step():
    """log_g [2, 3, n] with inputs of batch (2, 3) and n = d_k: the per-channel reading's
    batch (2,) does not fit (2, 3), so only the per-step one is valid; it was refused as
    reading both ways (a review)."""
    from attnprec.attention import gated_linear_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 3, 3, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, 3, 5, generator=g, dtype=torch.float64)
    lg = -torch.rand(2, 3, 3, generator=g, dtype=torch.float64)
    y = gated_linear_attention(q, q, v, lg)
    assert torch.equal(y, gated_linear_attention(q, q, v, lg.unsqueeze(-1).expand(2, 3, 3, 3)))


def test_return_state_is_a_bool():
    """return_state="no" returned a state (a review)."""
    from attnprec.attention import gated_linear_attention, linear_attention, ssd_attention

    f64 = torch.float64
    q = torch.randn(1, 6, 3, dtype=f64)
    with pytest.raises(TypeError, match="return_state"):
        linear_attention(q, q, q, causal=True, return_state="no")
    with pytest.raises(TypeError, match="return_state"):
        gated_linear_attention(q, q, q, -torch.ones(1, 6, dtype=f64), return_state="no")
    with pytest.raises(TypeError, match="return_state"):
        ssd_attention(q, q, q, dt=torch.ones(1, 6, dtype=f64), A=-1.0, return_state=1)
