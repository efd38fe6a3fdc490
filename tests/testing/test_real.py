"""The captured real activations: sizes, exactness, cropping and errors."""

import pytest
import torch

from attnprec.testing import make_inputs, real_inputs, real_metadata


def test_metadata_describes_the_capture():
    meta = real_metadata()
    assert meta["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert (meta["layers"], meta["heads"], meta["d_head"]) == (6, 12, 32)
    assert len(meta["token_strings"]) == meta["tokens"] >= 64
    assert meta["sentences"]


def test_values_are_float16_exact_and_real():
    meta = real_metadata()
    q, k, v = real_inputs(meta["tokens"], d_k=32, batch=(6, 12))
    for x in (q, k, v):
        assert x.dtype == torch.float64
        assert x.shape == (6, 12, meta["tokens"], 32)
        assert torch.equal(x.to(torch.float16).to(torch.float64), x)
        assert torch.isfinite(x).all()
        # Activations, not zeros or a constant: every head varies.
        assert (x.std(dim=(-2, -1)) > 0).all()
    # q, k and v are different projections.
    assert not torch.equal(q, k) and not torch.equal(k, v)


def test_cropping_is_consistent():
    q, k, v = real_inputs(10, 7, 5, 3, batch=(2, 3))
    assert (q.shape, k.shape, v.shape) == ((2, 3, 10, 5), (2, 3, 7, 5), (2, 3, 7, 3))
    qa, ka, va = real_inputs(16, d_k=8, batch=(6,))
    # Slots run layer-major: batch (2, 3) are slots 0..5.
    assert torch.equal(q.reshape(6, 10, 5), qa[:, :10, :5])
    assert torch.equal(k.reshape(6, 7, 5), ka[:, :7, :5])
    assert torch.equal(v.reshape(6, 7, 3), va[:, :7, :3])
    q1, _, _ = real_inputs(4, d_k=8, offset=3)
    assert torch.equal(q1, qa[3, :4])


def test_make_inputs_real_family_rounds_to_dtype():
    q, k, v = make_inputs("real", n_q=8, n_k=6, d_k=4, dtype=torch.bfloat16)
    q64, k64, v64 = real_inputs(8, 6, 4)
    assert q.dtype == torch.bfloat16 and q.shape == (8, 4)
    assert torch.equal(q, q64.to(torch.bfloat16))
    assert torch.equal(v, v64.to(torch.bfloat16))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(n_q=10_000), "n_q"),
        (dict(n_q=4, n_k=10_000), "n_k"),
        (dict(n_q=4, d_k=33), "d_k"),
        (dict(n_q=4, d_v=64), "d_v"),
        (dict(n_q=0), "n_q"),
        (dict(n_q=4, batch=(73,)), "batch"),
        (dict(n_q=4, batch=(0,)), "batch"),
        (dict(n_q=4, batch=(2,), offset=71), "batch"),
        (dict(n_q=4, offset=72), "offset"),
        (dict(n_q=4, offset=True), "offset"),
    ],
)
def test_requests_beyond_the_capture_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        real_inputs(**kwargs)


def test_error_names_the_captured_size():
    tokens = real_metadata()["tokens"]
    with pytest.raises(ValueError, match=f"at most {tokens}"):
        real_inputs(tokens + 1)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(n_q=True), TypeError, "n_q"),  # a torch TypeError before
        (dict(n_q=4, d_k=True), TypeError, "d_k"),  # d_k = 1 before
        (dict(n_q=4, n_k=2.0), TypeError, "n_k"),
        (dict(n_q=10**30), ValueError, "n_q"),  # torch's "Overflow when unpacking" before
        (dict(n_q=4, d_v=2**31), ValueError, "d_v"),
        (dict(n_q=4, batch=(2.5,)), TypeError, "batch"),  # truncated to 2 before
    ],
)
def test_make_inputs_sizes_named(kwargs, error, name):
    with pytest.raises(error, match=f"^{name}:"):
        make_inputs("typical", **kwargs)
