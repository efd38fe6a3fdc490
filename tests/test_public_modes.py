"""Every public callable under the global modes a kernel project's test suite may set.

Autograd: inputs that require grad (a test that also checks the backward pass) are taken,
with the results of the plain call. Flush-to-zero (``torch.set_flush_denormal(True)``):
subnormal numbers read as zero in the library's own float64 work, so a certified radius
or a sound bound would rest on inputs it never saw; every call that takes tensors refuses
it, naming the mode, in the calling thread and in torch's worker threads alike. The
callables and their valid arguments are ``test_public_flags._calls()``, which must cover
the whole public API.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from test_public_flags import _calls


def _with_grad(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().clone().requires_grad_()
    if isinstance(x, (list, tuple)) and not isinstance(x, torch.Size):
        return type(x)(_with_grad(y) for y in x)
    return x


def _values(r):
    """What a result says, for comparison: its tensors, a bound's total, a reference's
    value and radius, a report's verdict."""
    if isinstance(r, torch.Tensor):
        return [r.detach()]
    if isinstance(r, (list, tuple)):
        return [t for x in r for t in _values(x)]
    return [getattr(r, f) for f in ("total", "value", "radius", "verdict") if hasattr(r, f)]


@pytest.mark.parametrize("public", sorted(_calls()))
def test_inputs_that_require_grad_are_taken(public):
    """The bounds' and audits' passes write with ``out=``, which autograd refuses: the
    analysis runs under ``no_grad`` (it is never differentiated) and gives what the plain
    call gives."""
    torch.manual_seed(0)
    fn, args, kwargs = _calls()[public]
    plain = fn(*args, **kwargs)
    torch.manual_seed(0)  # (the same inputs and generators again)
    fn, args, kwargs = _calls()[public]
    graded = fn(*[_with_grad(a) for a in args], **{k: _with_grad(v) for k, v in kwargs.items()})
    # the differentiable functions (lognum's, the methods') may take another path for the
    # gradient: the same values up to a few roundings of the output's scale; the analysis
    # gives the same bits
    exact = ".analysis." in public or ".testing." in public
    for a, b in zip(_values(plain), _values(graded), strict=True):
        if isinstance(a, torch.Tensor):
            fin = a[a.isfinite()].abs()
            scale = float(fin.max()) if fin.numel() and a.is_floating_point() else 0.0
            ulps = 0.0 if exact else 8 * torch.finfo(a.dtype).eps * scale
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=ulps, equal_nan=True)
        else:
            assert a == b


def _run(code: str) -> str:
    here = os.path.dirname(__file__)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_flush_to_zero_is_refused_by_every_call_that_takes_tensors():
    """In a fresh process, the mode set in the calling thread."""
    out = _run(
        """
        import torch
        from test_public_flags import _calls

        calls = _calls()
        torch.set_flush_denormal(True)

        def tensors(x):
            if isinstance(x, torch.Tensor):
                return True
            if isinstance(x, (list, tuple, dict)):
                return any(tensors(y) for y in (x.values() if isinstance(x, dict) else x))
            return False

        for key, (fn, args, kwargs) in sorted(calls.items()):
            if not tensors([args, kwargs]) and not hasattr(fn, "__self__"):
                continue
            try:
                fn(*args, **kwargs)
                print("TAKEN", key)
            except RuntimeError as e:
                print("REFUSED" if "set_flush_denormal" in str(e) else "OTHER", key)
        """
    )
    lines = out.splitlines()
    taken = [x for x in lines if not x.startswith("REFUSED")]
    assert not taken, taken
    assert len(lines) >= 30, out


def test_flush_to_zero_in_the_worker_threads_alone_is_refused():
    """Worker threads keep the mode they started with: the calling thread's is not enough
    to probe. With one thread the work runs in the caller, and the result is the default
    mode's."""
    out = _run(
        """
        import torch
        from attnprec.analysis import reference
        g = torch.Generator().manual_seed(0)
        q, k = (torch.randn(64, 4, generator=g) for _ in range(2))
        v = torch.full((64, 4), 2.0**-140)  # float32 subnormals
        torch.set_num_threads(2)
        torch.set_flush_denormal(True)
        torch.ones(1 << 20).sum()  # the worker starts under the mode
        torch.set_flush_denormal(False)
        try:
            reference("softmax", q, k, v)
            print("taken")
        except RuntimeError as e:
            print("refused" if "set_flush_denormal" in str(e) else "other")
        torch.set_num_threads(1)
        r = reference("softmax", q, k, v)
        print(float((r.value - 2.0**-140).abs().max() / 2.0**-140))
        """
    )
    refused, rel = out.split()
    assert refused == "refused"
    assert float(rel) < 1e-12


def test_a_kernel_that_differentiates_inside_is_audited():
    """The references and bounds run without a graph; the kernel runs in the caller's grad
    mode (a review: ``no_grad`` around the whole audit broke a kernel that checks its
    backward pass in its forward)."""
    from attnprec.analysis.audit import audit
    from attnprec.attention import softmax_attention

    def kernel(q, k, v):
        qq = q.detach().requires_grad_(True)
        out = softmax_attention(qq, k, v)
        torch.autograd.grad(out.sum(), qq)
        return out

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(16, 8, generator=g) for _ in range(3))
    assert audit(kernel, "softmax", q, k, v, precision="fp32").verdict == "ok"


def test_a_pool_grown_under_flush_to_zero_and_shrunk_back_is_refused():
    """The worker probe was cached per thread count: a pool grown under the mode and shrunk
    back to the probed count kept the count, and a certified reference came out 24,832 of
    131,072 values outside its radius (a review). The references and bounds probe afresh:
    they refuse whenever the workers flush."""
    out = _run(
        """
        import torch
        from attnprec.analysis import reference
        from attnprec.lognum import _checks as C
        g = torch.Generator().manual_seed(0)
        q, k = (torch.randn(64, 4, generator=g) for _ in range(2))
        v = torch.full((64, 4), 2.0**-140)
        big = lambda: (torch.full((1 << 18,), 2.0**-1070, dtype=torch.float64) * 1.0).sum()
        torch.set_num_threads(4)
        reference("softmax", q, k, v)  # probed: cached
        torch.set_num_threads(2)
        big()
        torch.set_flush_denormal(True)
        for n in (4, 8, 4):
            torch.set_num_threads(n)
            big()
        torch.set_flush_denormal(False)
        flushing = not C._workers_keep_subnormals()
        try:
            reference("softmax", q, k, v)
            print(flushing, "taken")
        except RuntimeError as e:
            print(flushing, "refused" if "set_flush_denormal" in str(e) else "other")
        """
    )
    flushing, what = out.split()
    assert what == ("refused" if flushing == "True" else "taken")
