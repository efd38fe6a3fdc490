"""The float64 references and the bounds compute where their inputs are
(``attnprec._device``): on a CUDA device they give the CPU's results (up to the order of
float64 sums) and return them on that device; the ball backends, the gated recurrence and
the state-space methods' references compute on the CPU and return on the device too.

Each test runs twice: on a simulated CUDA device (``fake_cuda``: CPU memory that refuses
what CUDA tensors refuse, so CI sees every place where a device tensor meets a CPU one)
and on a real one, where there is one (skipped otherwise).
"""

from __future__ import annotations

import os

import pytest
import torch

from attnprec.analysis import Precision, reference
from attnprec.analysis.audit import audit
from attnprec.analysis.bounds import attention_error_bound
from attnprec.attention import MixtureLSE, favor_projection
from attnprec.testing import params as P
from fake_cuda import FakeCuda

F64 = torch.float64
N = 1100  # (several of the CPU's row blocks, softmax's too)


class _Device:
    """Where a test computes: ``moved(x)`` to the device, ``computed_there(fn)`` runs
    ``fn`` and asserts that its work happened on the device."""

    def __init__(self, fake: FakeCuda | None) -> None:
        self.fake = fake

    def moved(self, params: dict) -> dict:
        return {key: x.cuda() if torch.is_tensor(x) else x for key, x in params.items()}

    def computed_there(self, fn, inputs_numel: int):
        if self.fake is not None:
            before = self.fake.device_ops
            out = fn()
            assert self.fake.device_ops - before > 50  # its blocks ran on the device
            return out
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        # float64 copies of the inputs at least; computed on the CPU, only the results
        # (fewer bytes here) would have come to the device
        assert torch.cuda.max_memory_allocated() - base > inputs_numel * 8
        return out


@pytest.fixture(params=["simulated", "cuda"])
def device(request):
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        yield _Device(None)
        return
    with FakeCuda() as fake:
        yield _Device(fake)


def _inputs(n=N, d=8, d_v=6):
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, n, d, generator=g).half() for _ in range(2))
    v = torch.randn(2, n, d_v, generator=g).half()
    return q, k, v


def _on_device(x: torch.Tensor) -> bool:
    return x.device.type == "cuda"


#: Methods with a float64 reference (and a bound over the same inputs).
F64_CASES = {
    "softmax": ("softmax", {}),
    "softmax-window": ("softmax", {"window": 48}),
    "softmax-mask": ("softmax", {"key_mask": torch.arange(N).remainder(7).ne(3).expand(2, -1)}),
    "log": ("log", {}),
    "taylor": ("taylor", {"degree": 2}),
    "polynomial": ("polynomial", {"coeffs": [1.0, 1.0, 0.5]}),
    "linear": ("linear", {}),
    "favor": ("favor", {"projection": favor_projection(16, 8, generator=torch.Generator())}),
    "semiring": ("semiring", {"semiring": MixtureLSE((1.0, 2.0), (1.0, 0.5))}),
}


@pytest.mark.parametrize("rows", [None, 40], ids=["every-row", "sampled"])
@pytest.mark.parametrize("name", sorted(F64_CASES))
def test_float64_reference_on_the_device(device, name, rows):
    """Certified intervals that overlap the CPU's, radii as tight (the same radius rules,
    other summation orders), the same rows, on the device."""
    method, params = F64_CASES[name]
    q, k, v = _inputs()
    kw = {"causal": True, "backend": "float64", "rows": rows}
    cpu = reference(method, q, k, v, **kw, **params)
    gq, gk, gv = q.cuda(), k.cuda(), v.cuda()
    got = device.computed_there(
        lambda: reference(method, gq, gk, gv, **kw, **device.moved(params)),
        q.numel() + k.numel() + v.numel(),
    )
    assert _on_device(got.value) and _on_device(got.radius) and got.backend == "float64"
    assert (cpu.rows is None) == (got.rows is None)
    assert cpu.rows is None or torch.equal(cpu.rows, got.rows.cpu())
    gv_, gr = got.value.cpu(), got.radius.cpu()
    fin = torch.isfinite(cpu.radius)
    assert torch.equal(fin, torch.isfinite(gr))
    assert bool(((gv_ - cpu.value).abs() <= gr + cpu.radius)[fin].all())
    # the same rules on values equal up to rounding; 2x leaves room for a row whose
    # choice between key states and pairs (a threshold on its radius) flips with the
    # summation order: either choice is certified
    assert bool((gr <= 2 * cpu.radius + 2.0**-1000)[fin].all())


#: Bound cases: (method, params, precision).
BOUND_CASES = {
    **{name: (m, p, "bf16") for name, (m, p) in F64_CASES.items()},
    "softmax-block": ("softmax", {}, Precision("fp16", block=64)),
    "softmax-split": ("softmax", {}, Precision("bf16", block=32, sums="log")),
    "softmax-fp8": ("softmax", {}, Precision("e4m3", "fp32", "fp32", scaling=64)),
    "log-state": ("log", {"evaluation": "state"}, Precision("fp16", sums="linear")),
    "gated": ("gated", {"log_g": -torch.rand(2, N, 8, dtype=F64)}, "bf16"),
    "gated-state": (
        "gated",
        {"log_g": -torch.rand(2, N, 8, dtype=F64), "evaluation": "state"},
        Precision("bf16", sums="linear"),
    ),
}


@pytest.mark.parametrize("name", sorted(BOUND_CASES))
def test_bounds_on_the_device(device, name):
    """Every part the CPU's up to the order of float64 sums and the chords' choice, on the
    device: its row blocks are larger (``_device.GPU_BLOCKS``; the CPU's take several
    blocks here, softmax's too), so this also checks how little the bounds depend on
    them."""
    method, params, prec = BOUND_CASES[name]
    q, k, v = _inputs()
    if method == "linear":  # the bound takes the features
        q, k = (torch.nn.functional.elu(x.float()).add(1).half() for x in (q, k))
        params = {"feature_map": None}
    cpu = attention_error_bound(method, q, k, v, prec, causal=True, **params)
    gq, gk, gv = q.cuda(), k.cuda(), v.cuda()
    got = device.computed_there(
        lambda: attention_error_bound(
            method, gq, gk, gv, prec, causal=True, **device.moved(params)
        ),
        q.numel() + k.numel() + v.numel(),
    )
    # the float64 sums' own error over N keys (a part as small as ~1e-13 is made of it); the
    # rounding part also takes the exps per key, not their chords (at most 0.8% above
    # them, docs/bounds/attention.md), in the blocks where some row needs it
    noise = 2 * N * 2.0**-53 * float(v.abs().max())  # gamma_N max|v| on each side
    rtol = {"total": 1e-2, "rounding": 1e-2, "quantization": 1e-9, "approximation": 1e-9}
    for part, tol in rtol.items():
        a, b = getattr(cpu, part), getattr(got, part)
        assert _on_device(b), part
        b = b.cpu()
        fin = torch.isfinite(a)
        assert torch.equal(fin, torch.isfinite(b)), part
        assert bool(((a - b).abs() <= tol * a.abs() + noise)[fin].all()), part
    assert set(cpu.unbounded) == set(got.unbounded)
    assert all(_on_device(m) for m in got.unbounded.values())


def test_cpu_paths_return_on_the_device(device):
    """The ball backends, the gated recurrence and a state-space method's reference compute
    on the CPU and return on the inputs' device: the CPU's results."""
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(12, 3, generator=g, dtype=F64) for _ in range(3))
    lg = -torch.rand(12, 3, generator=g, dtype=F64)
    h3 = P.h3_defaults(3, 12, g)
    runs = [
        ("softmax", {"backend": "mpmath", "causal": True}),
        ("gated", {"log_g": lg, "causal": True}),
        ("h3", h3),
    ]
    for method, kw in runs:
        cpu = reference(method, q, k, v, **kw)
        got = reference(method, q.cuda(), k.cuda(), v.cuda(), **device.moved(kw))
        assert _on_device(got.value) and _on_device(got.radius)
        assert torch.equal(got.value.cpu(), cpu.value), method
        assert torch.equal(got.radius.cpu(), cpu.radius), method


def _ssm_cases() -> dict:
    g = torch.Generator().manual_seed(6)
    d, n = 6, 96
    state = {"evaluation": "state"}
    return {
        "selective_scan": ("selective_scan", P.selective_scan_defaults(d, n, g)),
        "selective_scan-state": ("selective_scan", {**P.selective_scan_defaults(d, n, g),
                                                    **state}),
        "ssd-sampled": ("ssd", {**P.ssd_defaults(d, n, g), "rows": 20}),
        "ssd-state-sampled": ("ssd", {**P.ssd_defaults(d, n, g), **state, "rows": 20}),
        "ssm-fft": ("ssm", {**P.ssm_defaults(d, n, g), "form": "fft"}),
        "h3-state-sampled": ("h3", {**P.h3_defaults(d, n, g), **state, "rows": 20}),
    }  # fmt: skip


SSM_CASES = _ssm_cases()


@pytest.mark.parametrize("name", sorted(SSM_CASES))
def test_state_space_bounds_on_the_device(device, name):
    """The state-space methods' bounds (their own bound functions, both evaluations,
    sampled rows) on the device: the CPU's up to the order of float64 sums."""
    method, params = SSM_CASES[name]
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(96, 6, generator=g, dtype=F64) for _ in range(3))
    prec = Precision("bf16", sums="linear")
    cpu = attention_error_bound(method, q, k, v, prec, **params)
    got = device.computed_there(
        lambda: attention_error_bound(
            method, q.cuda(), k.cuda(), v.cuda(), prec, **device.moved(params)
        ),  # fmt: skip
        q.numel() + k.numel() + v.numel(),
    )
    assert (cpu.rows is None) == (got.rows is None)
    assert cpu.rows is None or torch.equal(cpu.rows, got.rows.cpu())
    noise = 2 * 96 * 2.0**-53 * float(v.abs().max())
    for part in ("total", "rounding", "quantization"):
        a, b = getattr(cpu, part), getattr(got, part)
        assert _on_device(b), part
        b = b.cpu()
        fin = torch.isfinite(a)
        assert torch.equal(fin, torch.isfinite(b)), part
        assert bool(((a - b).abs() <= 1e-9 * a.abs() + noise)[fin].all()), part
    assert set(cpu.unbounded) == set(got.unbounded)


def test_audit_on_the_device(device):
    """An audit of device inputs judges on the CPU with the device's references and bounds:
    the CPU audit's classes for every element."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 700, 16, generator=g).half() for _ in range(3))

    def kernel(q, k, v, causal=False):  # a plain fp32 PyTorch softmax, wherever q is
        s = (q.float() @ k.float().transpose(-1, -2)) * 0.25
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
        return (s.softmax(-1) @ v.float()).half().cpu()

    prec = Precision("fp16", compute="fp32", accumulate="fp32")
    cpu = audit(kernel, "softmax", q, k, v, precision=prec, causal=True, rows=64)
    got = audit(kernel, "softmax", q.cuda(), k.cuda(), v.cuda(), precision=prec, causal=True,
                rows=64)  # fmt: skip
    assert cpu.verdict == got.verdict == "ok"
    a, b = cpu.cases[0], got.cases[0]
    assert a.counts == b.counts and a.rows == b.rows and b.backend == a.backend


@pytest.mark.parametrize("layout", ["bhtd", "varlen"])
def test_assert_attention_close_on_the_device(device, layout):
    """A kernel project's test on the GPU: its output and inputs on the device (heads,
    packed sequences with cu_seqlens, a padding mask), judged as on the CPU."""
    from attnprec.testing import assert_attention_close

    g = torch.Generator().manual_seed(6)
    if layout == "bhtd":
        q, k, v = (torch.randn(2, 3, 300, 16, generator=g).half() for _ in range(3))
        km = torch.rand(2, 300, generator=g) > 0.1
        km[:, 0] = True
        kw = {"layout": "bhtd", "key_mask": km}
        s = (q.float() @ k.float().transpose(-1, -2)) * 0.25
        s = s.masked_fill(~km[:, None, None, :], float("-inf"))
        s = s.masked_fill(torch.ones(300, 300, dtype=torch.bool).triu(1), float("-inf"))
        out = (s.softmax(-1) @ v.float()).half()
    else:  # two sequences of 180 and 120 tokens packed as [T, H, D]
        q, k, v = (torch.randn(300, 2, 16, generator=g).half() for _ in range(3))
        kw = {"layout": "bthd", "cu_seqlens": [0, 180, 300]}
        parts = []
        for a, b in ((0, 180), (180, 300)):
            qs, ks, vs = (x[a:b].transpose(0, 1).float() for x in (q, k, v))
            s = (qs @ ks.transpose(-1, -2)) * 0.25
            s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
            parts.append((s.softmax(-1) @ vs).transpose(0, 1))
        out = torch.cat(parts).half()
    prec = Precision("fp16", compute="fp32", accumulate="fp32")
    cpu = assert_attention_close(out, q, k, v, precision=prec, causal=True, **kw)
    dev = {key: x.cuda() if torch.is_tensor(x) else x for key, x in kw.items()}
    got = assert_attention_close(
        out.cuda(), q.cuda(), k.cuda(), v.cuda(), precision=prec, causal=True, **dev
    )
    assert [c.counts for c in got.cases] == [c.counts for c in cpu.cases]


def test_runner_audits_on_the_device(device, monkeypatch):
    """Where CUDA is present, a job's inputs go to the device before the audit, so its
    references and bounds compute there: the CPU run's counts."""
    from attnprec.runner import Job, run_job

    job = Job("attnprec.attention:gated_linear_attention", "gla", "gated", "fp16", "typical",
              300, 8, precision={"compute": "fp32", "accumulate": "fp32"})  # fmt: skip
    job_sm = Job("attnprec.attention:softmax_attention", "sm", "softmax", "fp16", "typical",
                 900, 8, params={"causal": True}, precision={"compute": "fp32"})  # fmt: skip
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: False)
        # (it would choose Triton's interpreter for the rest of the process: kept as it is)
        m.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
        cpu = [run_job(j) for j in (job, job_sm)]
    if device.fake is not None:  # the runner sees a device
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    got = [device.computed_there(lambda j=j: run_job(j), 900 * 8 * 3) for j in (job, job_sm)]
    for a, b in zip(cpu, got, strict=True):
        assert not a.failures and not b.failures, b.failures
        assert [c.counts for c in a.cases] == [c.counts for c in b.cases]


def test_the_simulated_device_refuses_what_cuda_refuses():
    """The simulation's own rules (they are what makes its passes mean something)."""
    with FakeCuda() as fake:
        x, c = torch.ones(4).cuda(), torch.ones(4)
        assert _on_device(x) and x.is_cuda and not fake.is_marked(c)
        assert _on_device(x * 2) and _on_device(x + torch.tensor(1.0))  # CPU scalars: fine
        for bad in (lambda: x + c, lambda: torch.where(x > 0, x, c), lambda: c[x.long()]):
            with pytest.raises(RuntimeError, match="fake_cuda"):
                bad()
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        with pytest.raises(RuntimeError, match="generator"):
            torch.randperm(4, generator=torch.Generator(), device="cuda")
        assert _on_device(x[torch.tensor([0, 2])])  # CPU indices of a device tensor: fine
        assert not fake.is_marked(x.cpu()) and not fake.is_marked(x.to("cpu"))
        with torch.device("cuda"):
            assert _on_device(torch.zeros(2)) and _on_device(torch.arange(3))
        assert torch.equal(x.cpu(), c)
