"""PyTorch's attention kernels as audit targets (attnprec.targets): each target meets its
declaration on every input family, a too-tight declaration is caught, names and backends
that cannot run give clear errors, the command audits a target, and the docs' example runs."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnprec import targets
from attnprec.analysis.audit import audit
from attnprec.analysis.precision import ONE_PASS, Precision
from attnprec.cli import main
from attnprec.runner import Job, _precision, run_job
from attnprec.testing import FAMILIES, make_inputs

DOC = Path(__file__).resolve().parents[1] / "docs" / "pytorch_kernels.md"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_TARGETS = [n for n in targets.NAMES if targets.available(n, "cpu")[0]]
CUDA = torch.cuda.is_available()


def family_batch(dtype, n, d=16, seed=0):
    """One case per input family, stacked as the heads of one call (exact in ``dtype``)."""
    qkv = []
    for i, fam in enumerate(FAMILIES):
        g = torch.Generator().manual_seed(seed + i)
        qkv.append(make_inputs(fam, n_q=n, d_k=d, dtype=torch.float64, generator=g))
    return [torch.stack(x).to(dtype) for x in zip(*qkv, strict=True)]


def assert_met(report):
    c = report.cases[0]
    bad = {k: c.counts[k] for k in ("violated", "unbounded", "undecided", "atypical")}
    assert not any(bad.values()), c.describe()
    assert c.total.tightness >= 1


# --------------------------------------------------------------------------------------------
# Each target meets its own declaration


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("name", [n for n in CPU_TARGETS if n != "torch:flex"])
def test_cpu_target_meets_its_declaration_on_every_family(name, dtype):
    fn, prec = targets.target(name), targets.precision_for(name, dtype, "cpu")
    # n = 13: not a multiple of the vector width (the kernels' scalar tails); n = 64 causal
    for n, causal in ((13, False), (64, True)):
        q, k, v = family_batch(dtype, n)
        assert_met(audit(fn, "softmax", q, k, v, precision=prec, kernel=name, causal=causal))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
def test_compiled_flex_meets_its_declaration_on_every_family(dtype):
    # One compilation per dtype (seconds each): causal, so the block mask's schedule runs.
    name = "torch:flex"
    if name not in CPU_TARGETS:
        pytest.fail(targets.available(name, "cpu")[1])  # a C++ compiler is part of the setup
    q, k, v = family_batch(dtype, 64)
    prec = targets.precision_for(name, dtype, "cpu")
    rep = audit(targets.target(name), "softmax", q, k, v, precision=prec, causal=True)
    assert_met(rep)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("name", targets.NAMES)
def test_cuda_target_meets_its_declaration_on_every_family(name, dtype):
    ok, _ = targets.available(name, "cuda")
    takes = name not in ("torch:sdpa-flash", "torch:sdpa-cudnn") or dtype != torch.float32
    if not (ok and takes):  # this GPU or dtype has no such kernel: a clear error instead
        q, k, v = (x.cuda() for x in family_batch(dtype, 16))
        with pytest.raises(RuntimeError, match=re.escape(name)):
            targets.target(name)(q, k, v)
        return
    prec = targets.precision_for(name, dtype, "cuda")

    def fn(q, k, v, **kw):
        return targets.target(name)(q.cuda(), k.cuda(), v.cuda(), **kw).cpu()

    for n, causal in ((13, False), (64, True)):
        q, k, v = family_batch(dtype, n)
        assert_met(audit(fn, "softmax", q, k, v, precision=prec, kernel=name, causal=causal))


# --------------------------------------------------------------------------------------------
# The declaration is checked, not trusted


@pytest.mark.parametrize("name", ["torch:sdpa-flash", "torch:flex-eager"])
def test_a_too_tight_declaration_is_caught(name):
    # Both round the weights to fp16 before weights @ v: fp64 work understates that.
    q, k, v = family_batch(torch.float16, 64)
    tight = Precision("fp16", compute="fp64", accumulate="fp64", block=ONE_PASS)
    rep = audit(targets.target(name), "softmax", q, k, v, precision=tight)
    assert rep.cases[0].counts["violated"] > 0
    assert_met(audit(targets.target(name), "softmax", q, k, v,
                     precision=targets.precision_for(name, torch.float16, "cpu")))  # fmt: skip


def test_the_math_backend_keeps_fp16_under_the_reduction_flag():
    # allow_fp16_bf16_reduction_math_sdp: the math backend works in fp16 and the declaration
    # follows the flag; the fp32 declaration of the default setting is then too tight.
    name = "torch:sdpa-math"
    q, k, v = family_batch(torch.float16, 64)
    default = targets.precision_for(name, torch.float16, "cpu")
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        flagged = targets.precision_for(name, torch.float16, "cpu")
        assert flagged.compute.name == "fp16" and default.compute.name == "fp32"
        assert_met(audit(targets.target(name), "softmax", q, k, v, precision=flagged))
        rep = audit(targets.target(name), "softmax", q, k, v, precision=default)
        assert rep.cases[0].counts["violated"] > 0
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(False)


def test_declarations_follow_the_float32_matmul_precision():
    before = torch.get_float32_matmul_precision()
    try:
        for level, fmt in (("highest", "fp32"), ("high", "tf32"), ("medium", "bf16")):
            torch.set_float32_matmul_precision(level)
            assert targets.precision_for("torch:sdpa-math", "fp32", "cpu").compute.name == fmt
    finally:
        torch.set_float32_matmul_precision(before)


def test_declarations_per_backend():
    """The declarations of docs/pytorch_kernels.md (the fingerprints' choices)."""
    cpu = {n: targets.precision_for(n, "fp16", "cpu") for n in CPU_TARGETS}
    assert (cpu["torch:sdpa-math"].compute.name, cpu["torch:sdpa-math"].block) == (
        "fp32", ONE_PASS)  # fmt: skip
    flash = cpu["torch:sdpa-flash"]
    assert (flash.compute.name, flash.accumulate.name, flash.block) == ("fp16", "fp32", 512)
    assert flash.elementary.exp == targets.CPU_FLASH_EXP_ULP
    assert cpu["torch:sdpa"] == flash  # the looser of flash and math: flash
    assert cpu["torch:flex"].block == targets.CPU_FLEX_BLOCK
    for n in ("torch:sdpa-flash", "torch:sdpa-efficient", "torch:sdpa-cudnn", "torch:flex"):
        p = targets.precision_for(n, "bf16", "cuda")
        assert (p.compute.name, p.accumulate.name, p.block) == ("bf16", "fp32", None)
    with pytest.raises(ValueError, match="dtype: the flash backend on cuda"):
        targets.precision_for("torch:sdpa-flash", "fp32", "cuda")
    assert targets.precision_for("torch:sdpa", "fp32", "cuda").compute.name == "tf32"


# --------------------------------------------------------------------------------------------
# Names, backends that cannot run, bad operands


@pytest.mark.parametrize("bad", ["torch:nope", "sdpa", "", None, 3])
def test_a_bad_name_raises_naming_the_argument_and_the_names(bad):
    for call in (targets.target, targets.available, lambda n: targets.precision_for(n, "fp16")):
        with pytest.raises(ValueError, match=r"name: .*torch:sdpa-math"):
            call(bad)


def test_bad_dtype_and_device_are_named():
    with pytest.raises(ValueError, match="dtype:"):
        targets.precision_for("torch:sdpa", torch.float64)
    with pytest.raises(ValueError, match="dtype:"):
        targets.precision_for("torch:sdpa", "int8")
    with pytest.raises(ValueError, match="device:"):
        targets.precision_for("torch:sdpa", "fp16", "mps")
    with pytest.raises(ValueError, match="device:"):
        targets.precision_for("torch:sdpa-cudnn", "fp16", "cpu")


@pytest.mark.parametrize("name", ["torch:sdpa-efficient", "torch:sdpa-cudnn"])
def test_a_backend_without_a_kernel_here_raises_runtime_error(name, monkeypatch):
    ok, why = targets.available(name, "cpu")
    assert not ok and "no CPU kernel" in why and name in why
    # As on a machine without CUDA (this one, or a GPU machine told to use the CPU):
    monkeypatch.setattr(targets, "_default_device", lambda: "cpu")
    backend = targets.TARGETS[name].backend
    with pytest.raises(RuntimeError, match=f"{re.escape(name)}: the {backend} backend") as e:
        targets.target(name)
    if not CUDA:
        assert "no GPU here" in str(e.value)
    # The function given CPU tensors says the same, wherever it runs.
    q = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=f"the {backend} backend has no CPU kernel"):
        targets._FUNCTIONS[name](q, q, q)


def test_inputs_a_kernel_rejects_raise_naming_the_backend():
    # PyTorch's CPU flash kernel takes one head size for q, k and v.
    q, k, v = torch.randn(8, 16), torch.randn(8, 16), torch.randn(8, 4)
    with pytest.raises(RuntimeError, match="torch:sdpa-flash: the flash backend cannot run"):
        targets.target("torch:sdpa-flash")(q, k, v)


def test_bad_operands_are_named():
    fn = targets.target("torch:sdpa-math")
    q = torch.randn(6, 4)
    with pytest.raises(ValueError, match="causal"):
        fn(q, torch.randn(5, 4), torch.randn(5, 4), causal=True)
    with pytest.raises(TypeError, match="q, k, v"):
        fn(q, q.double(), q)
    with pytest.raises(ValueError, match="k: expected d_k"):
        fn(q, torch.randn(6, 3), q)
    with pytest.raises(TypeError, match="scale"):
        fn(q, q, q, scale="big")
    with pytest.raises(TypeError, match="causal"):
        fn(q, q, q, causal=1)


@pytest.mark.parametrize("name", [n for n in CPU_TARGETS if n != "torch:flex"])
def test_layouts_batches_and_empty_inputs(name):
    fn = targets.target(name)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 8, 4, generator=g)
    k, v = torch.randn(3, 8, 4, generator=g), torch.randn(1, 8, 4, generator=g)  # broadcast
    out = fn(q, k, v, scale=0.3)
    assert out.shape == (2, 3, 8, 4)
    for b in range(2):
        for h in range(3):  # each head alone (2-D) gives the same result
            torch.testing.assert_close(out[b, h], fn(q[b, h], k[h], v[0], scale=0.3))
    assert fn(torch.randn(0, 4), k[0], v[0]).shape == (0, 4)
    assert fn(q[0, 0], k[0], torch.randn(8, 0)).shape == (8, 0)
    assert fn(torch.randn(0, 8, 4), k[0], v[0]).shape == (0, 8, 4)
    with pytest.raises(ValueError, match="k: expected at least one key"):
        fn(q[0, 0], torch.randn(0, 4), torch.randn(0, 4))


def test_the_table_lists_every_target_without_torch():
    assert set(targets.NAMES) == set(targets.TARGETS) and "torch:sdpa" in targets.NAMES
    assert [line.split()[0] for line in targets.table().splitlines()] == list(targets.NAMES)
    code = "import sys, attnprec.targets as t; t.table(); assert 'torch' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------------------------
# The command and the runner


def test_cli_audits_torch_sdpa(capsys):
    argv = ["audit", "--kernel", "torch:sdpa", "--method", "softmax", "--n", "32"]
    code = main([*argv, "--dtype", "fp16", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [r for r in map(str.split, out.splitlines()) if r[:2] == ["softmax", "torch:sdpa"]]
    assert len(rows) == len(FAMILIES) and all(r[-1] == "ok" for r in rows)


def test_the_runner_uses_the_targets_declaration():
    job = Job("torch:sdpa-flash", "torch:sdpa-flash", "softmax", "bf16", "sinks", 16, 8)
    assert _precision(job, "torch") == targets.precision_for("torch:sdpa-flash", "bf16")
    rep = run_job(job)
    assert not rep.failures and rep.cases[0].verdict == "ok"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--kernel", "torch:nope", "--method", "softmax"], r"--kernel: .*torch:sdpa-math"),
        (["--kernel", "torch:sdpa", "--method", "log"], "--method: torch:sdpa computes softmax"),
    ],
)
def test_cli_rejects_bad_targets(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["audit", *argv])
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_cli_names_a_backend_that_cannot_run(capsys, monkeypatch):
    monkeypatch.setattr(targets, "_default_device", lambda: "cpu")
    with pytest.raises(SystemExit) as e:
        main(["audit", "--kernel", "torch:sdpa-cudnn", "--method", "softmax"])
    assert e.value.code == 2
    assert "--kernel: torch:sdpa-cudnn: the cudnn backend has no CPU kernel" in (
        capsys.readouterr().err
    )


# --------------------------------------------------------------------------------------------
# docs/pytorch_kernels.md


def test_the_docs_example_runs():
    text = DOC.read_text(encoding="utf-8")
    m = re.search(
        r"```\{code-block\} python\n:name: pytorch-kernels-example\n\n(.*?)```", text, re.S
    )
    assert m, "docs/pytorch_kernels.md: the pytorch-kernels-example block is missing"
    exec(compile(m.group(1), str(DOC), "exec"), {"__name__": "docs_example"})
