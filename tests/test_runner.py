"""Row shards of an audit case (attnprec.runner): sharded runs give the unsharded case."""

import json
import math
import sys
import types

import numpy as np
import pytest
import torch

from attnprec.runner import Job, merge_shards, run_job, run_jobs, shard_jobs

FP32 = {"compute": "fp32", "accumulate": "fp32"}
# Figures of the bound and of the float64 reference: evaluated over blocks of rows, so their
# last bits depend on which rows share a block (runner docstring); every other figure must
# be equal.
BOUND_KEYS = {"max_bound", "tightness", "typical_bound", "typical_tightness", "bound"}
BOUND_KEYS |= {"approximation", "rounding", "max_error", "error"}
# The quantization part, the difference of two float64 outputs: within their radii (the
# runner docstring: absolute 1e-12 on values of order 1).
DIFF_KEYS = {"quantization"}


def _job(kernel, method, n, family="typical", d=8, **kw):
    return Job(kernel, kernel.rpartition(":")[2], method, "fp16", family, n, d, precision=FP32,
               **kw)  # fmt: skip


# softmax causal, log, gated, a wrong kernel (log attention audited as softmax: violated
# elements, so the worst element is a violated one) and sampled rows
JOBS = [
    _job("attnprec.attention:softmax_attention", "softmax", 70, params={"causal": True}),
    _job("attnprec.attention:log_attention", "log", 64, family="outliers"),
    _job("attnprec.attention:gated_linear_attention", "gated", 64),
    _job("attnprec.attention:log_attention", "softmax", 66, params={"causal": True}),
    _job("attnprec.attention:softmax_attention", "softmax", 300, audit={"rows": 25}),
]


def _same(a, b, path=""):
    """``a == b`` for nested dicts and lists, NaN equal to NaN; the bound's figures within a
    relative 1e-9."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for key in a:
            _same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and path.rpartition(".")[2] in BOUND_KEYS:
        assert a == pytest.approx(b, rel=1e-9, abs=0.0, nan_ok=True), path
    elif isinstance(a, float) and path.rpartition(".")[2] in DIFF_KEYS:
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12, nan_ok=True), path
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, path


def _same_report(one, many):
    assert many.failures == one.failures and many.partial == one.partial
    assert len(many.cases) == len(one.cases)
    for a, b in zip(one.cases, many.cases, strict=True):
        _same(a.to_dict(), b.to_dict())
        assert list(a.arrays) == list(b.arrays)
        # the float64 reference of a shard's rows: MKL's products round differently for
        # different row counts (AVX-512: 4e-14 on sums of 1100 keys), each within its radius
        radii = a.total.max_radius + b.total.max_radius
        for key, (err, bnd) in a.arrays.items():
            other = b.arrays[key][0]
            same = (other == err) | (np.isnan(other) & np.isnan(err))  # inf, nan: exactly
            assert np.all(same | (np.abs(other - err) <= radii)), key
            np.testing.assert_allclose(b.arrays[key][1], bnd, rtol=1e-9, atol=1e-12)  # DIFF_KEYS


@pytest.fixture(scope="module")
def unsharded():
    report, _ = run_jobs(JOBS, progress=False)
    assert not report.failures and len(report.cases) == len(JOBS)
    return report


def test_the_cases_exercise_what_they_should(unsharded):
    softmax, log, gated, wrong, sampled = unsharded.cases
    assert wrong.verdict == "VIOLATED" and wrong.total.worst["class"] == "violated"
    assert sampled.rows is not None and len(sampled.rows) == 25
    assert softmax.rows is None and softmax.total.worst["class"] in ("within", "atypical")


@pytest.mark.parametrize("shards", [2, 3])
def test_shards_give_the_unsharded_cases(unsharded, shards):
    many, _ = run_jobs(JOBS, shards=shards, progress=False)
    _same_report(unsharded, many)


def test_shards_on_a_process_pool_give_the_unsharded_cases(unsharded):
    many, _ = run_jobs(JOBS[3:], shards=3, workers=2, progress=False)
    _same_report(type(unsharded)(unsharded.cases[3:]), many)


def test_shards_on_a_dask_local_cluster_give_the_unsharded_cases(unsharded):
    pytest.importorskip("distributed")
    many, _ = run_jobs(JOBS[3:], shards=2, workers=2, dask="local", progress=False)
    _same_report(type(unsharded)(unsharded.cases[3:]), many)


def test_the_shards_take_the_whole_case_reference_backend():
    # batch * rows * keys * (d_k + d_v) above AUTO_FLOAT64_WORK for the case (float64),
    # below it for each of its halves (which alone would take arb)
    from attnprec.analysis.reference import AUTO_FLOAT64_WORK

    n, d = 1100, 8
    assert n * n * 2 * d > AUTO_FLOAT64_WORK >= (n // 2 + 1) * n * 2 * d
    job = _job("attnprec.attention:softmax_attention", "softmax", n, params={"causal": True})
    one, _ = run_jobs([job], progress=False)
    many, _ = run_jobs([job], shards=2, progress=False)
    assert one.cases[0].backend == "float64"
    _same_report(one, many)


@pytest.mark.parametrize("count", [2, 3, 4])
def test_merge_names_the_first_violated_element_of_the_case(count):
    # a correct output but for two wrong elements and a NaN: the worst element of the case
    # is [5, 2] (shard 5 % count, its row 5 // count), the NaN makes max_error inf
    from attnprec.analysis.audit import audit_output
    from attnprec.attention import softmax_attention

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 12, 4, generator=g, dtype=torch.float64) for _ in range(3))
    out = softmax_attention(q, k, v, causal=True)
    out[1, 5, 2] += 1.0
    out[0, 5, 2] += 1.0
    out[0, 7, 0] -= 1.0
    out[1, 9, 1] = math.nan
    kw = dict(precision="fp32", causal=True)
    whole = audit_output(out, "softmax", q, k, v, **kw)
    idx = torch.arange(12)
    parts = [audit_output(out, "softmax", q, k, v, rows=idx[i::count], whole_rows=12, **kw)
             for i in range(count)]  # fmt: skip
    merged = merge_shards(_job("given:out", "softmax", 12, d=4), parts)
    assert whole.cases[0].total.worst["index"] == [0, 5, 2]
    assert whole.cases[0].total.max_error == math.inf and whole.cases[0].counts["violated"] == 4
    _same_report(whole, merged)


def test_more_shards_than_rows():
    job = _job("attnprec.attention:log_attention", "log", 4, d=4)
    reports = [run_job(s) for s in shard_jobs(job, 6)]
    assert [len(r.cases) for r in reports] == [1, 1, 1, 1, 0, 0]
    _same_report(run_job(job), merge_shards(job, reports))


def test_a_failed_shard_fails_the_case():
    job = _job("no_such_module_here:fn", "softmax", 8)
    one, _ = run_jobs([job], progress=False)
    many, _ = run_jobs([job], shards=3, progress=False)
    assert not many.cases and len(many.failures) == 1 and many.failures == one.failures
    assert many.verdict == "VIOLATED"


def _module(name, **fns):
    mod = types.ModuleType(name)
    for key, fn in fns.items():
        setattr(mod, key, fn)
    sys.modules[name] = mod


def test_interrupt_keeps_the_shards_done_and_lists_what_did_not_run():
    calls = {"n": 0}

    def fn(q, k, v, **kw):  # wrong on row 0; Ctrl-C during the second case's second shard
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        from attnprec.attention import softmax_attention

        out = softmax_attention(q, k, v, **kw).clone()
        out[..., 0, :] += 0.5
        return out

    _module("shard_interrupt_kernels", fn=fn)
    jobs = [_job("shard_interrupt_kernels:fn", "softmax", 6, family=f, d=4)
            for f in ("typical", "ties", "sinks")]  # fmt: skip
    report, _ = run_jobs(jobs, shards=2, progress=False)
    assert report.partial and not report.ok and report.exit_status == 130
    whole, half = report.cases
    assert (whole.family, whole.rows, whole.partial, whole.elements) == ("typical", None, False, 24)
    # the shard done judged rows 0, 2, 4: its violations on row 0 count
    assert (half.family, half.rows, half.partial, half.elements) == ("ties", [0, 2, 4], True, 12)
    assert half.violations == 4 and half.verdict == "VIOLATED" and report.verdict == "VIOLATED"
    assert [(m["family"], m["missing_shards"], m["shards"]) for m in report.not_run] == [
        ("ties", [1], 2),
        ("sinks", [0, 1], 2),
    ]


def test_a_merged_partial_case_passing_is_partial():
    job = _job("attnprec.attention:softmax_attention", "softmax", 9, d=4)
    shards = [run_job(s) for s in shard_jobs(job, 3)]
    merged = merge_shards(job, [shards[0], None, shards[2]])
    (case,) = merged.cases
    assert case.rows == [0, 2, 3, 5, 6, 8] and case.partial and case.verdict == "PARTIAL"
    assert case.total.worst["index"][0] < 6 and len(case.arrays["total"][0]) == 6 * 4


def test_a_kernel_raising_system_exit_is_a_failure_of_its_case():
    def sysexit(q, k, v, **kw):
        raise SystemExit(0)

    _module("sysexit_kernels", fn=sysexit)
    report, _ = run_jobs([_job("sysexit_kernels:fn", "softmax", 4, d=4)], progress=False)
    assert report.failures[0]["error"] == "SystemExit: 0" and report.exit_status == 1


def test_writes_into_the_device_copies_are_seen(monkeypatch):
    def mutating(q, k, v, **kw):
        from attnprec.attention import softmax_attention

        out = softmax_attention(q, k, v, **kw)
        k.mul_(2.0)
        return out

    _module("mutating_kernels", fn=mutating)
    to = torch.Tensor.to

    def to_copy(self, *a, **kw):  # as on CUDA: the runner's x.to(device) is a new tensor
        out = to(self, *a, **kw)
        return out.clone() if a and isinstance(a[0], torch.device) else out

    monkeypatch.setattr(torch.Tensor, "to", to_copy)
    report = run_job(_job("mutating_kernels:fn", "softmax", 4, d=4))
    assert report.cases[0].mutated == ["k"] and report.verdict == "VIOLATED"


def test_shards_of_a_sample_judge_the_rows_of_the_unsharded_sample():
    job = _job("attnprec.attention:log_attention", "log", 64, d=4,
               params={"causal": True, "chunk_size": 16}, audit={"rows": 12})  # fmt: skip
    one, _ = run_jobs([job], progress=False)
    many, _ = run_jobs([job], shards=3, progress=False)
    assert one.cases[0].rows == many.cases[0].rows
    assert set(one.cases[0].rows) >= {0, 15, 16, 31, 32, 47, 48, 63}


def test_shard_jobs_checks_its_arguments():
    job = JOBS[0]
    assert shard_jobs(job, 1) == [job]
    assert [s.shard for s in shard_jobs(job, 3)] == [(0, 3), (1, 3), (2, 3)]
    fingerprint = _job("attnprec.attention:softmax_attention", "softmax", 8,
                       audit={"infer_precision": True})  # fmt: skip
    assert shard_jobs(fingerprint, 4) == [fingerprint]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="count"):
            shard_jobs(job, bad)
    with pytest.raises(ValueError, match="job: already shard 1 of 3"):
        shard_jobs(shard_jobs(job, 3)[1], 2)
    with pytest.raises(ValueError, match="shards"):
        run_jobs([job], shards=0, progress=False)
    with pytest.raises(ValueError, match="reports"):
        merge_shards(job, [])
    bad_shard = run_job(Job(**{**job.__dict__, "shard": (3, 3)}))
    assert "shard: expected" in bad_shard.failures[0]["error"]


def test_reference_auto_rows_chooses_as_the_whole():
    from attnprec.analysis.reference import reference

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1100, 8, generator=g).half() for _ in range(3))
    rows = torch.tensor([0, 7, 1099])
    assert reference("softmax", q, k, v, rows=rows).backend == "arb"
    whole = reference("softmax", q, k, v, rows=rows, auto_rows=1100)
    assert whole.backend == "float64"
    full = reference("softmax", q, k, v, backend="float64")
    # the same value up to the products' rounding for another row count, within both radii
    gap = (whole.value - full.value[rows]).abs()
    assert (gap <= whole.radius + full.radius[rows]).all()
    with pytest.raises(ValueError, match="auto_rows"):
        reference("softmax", q, k, v, rows=rows, auto_rows=-1)


def test_keep_freed_memory_where_glibc() -> None:
    """The audit's processes keep freed heap (glibc's mallopt); elsewhere it says no."""
    import platform

    from attnprec._alloc import keep_freed_memory

    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize("limit", [-1, 2**31, 1.5, True])
def test_keep_freed_memory_names_a_bad_limit(limit: object) -> None:
    from attnprec._alloc import keep_freed_memory

    with pytest.raises(ValueError, match="limit"):
        keep_freed_memory(limit)  # type: ignore[arg-type]


@pytest.mark.parametrize("progress", [False, True])
def test_a_worker_that_dies_fails_its_case_and_keeps_the_others(tmp_path, monkeypatch, progress):
    """A pool worker killed mid-case (the out-of-memory killer: here os._exit): the broken
    pool raised out of the run, losing the cases done and the JSON; now the jobs the
    broken pool dropped run again, each alone, so only the one that kills its process is a
    failure (with the rows' progress reported too: its queue outlives the worker)."""
    (tmp_path / "dying_kernels.py").write_text(
        "import os\n"
        "from attnprec.attention import softmax_attention\n"
        "def fn(q, k, v, **kw):\n"
        "    if q.shape[-2] == 5:\n"
        "        os._exit(9)\n"
        "    return softmax_attention(q, k, v, **kw)\n"
    )
    monkeypatch.chdir(tmp_path)
    jobs = [_job("dying_kernels:fn", "softmax", n, d=4) for n in (4, 5)]
    report, _ = run_jobs(jobs, workers=2, progress=progress)
    (fail,) = report.failures
    assert fail["error"].startswith("BrokenProcessPool") and report.exit_status == 1
    (case,) = report.cases
    assert case.elements == 4 * 4 and case.verdict == "ok"
    # the one that died, rerun alone, is said (and the other, where it was in flight)
    assert [m["kernel"] for m in report.retried] in (["fn"], ["fn", "fn"])


def test_a_worker_that_died_once_is_said_in_the_report(tmp_path, monkeypatch):
    """A kernel that kills its worker once passes when rerun alone: the report says the
    rerun (a review: the crash left no trace, the verdict ok as if nothing happened)."""
    flag = tmp_path / "died"
    (tmp_path / "once_kernels.py").write_text(
        "import os\n"
        "from attnprec.attention import softmax_attention\n"
        "def fn(q, k, v, **kw):\n"
        f"    if not os.path.exists({str(flag)!r}):\n"
        f"        open({str(flag)!r}, 'w').close()\n"
        "        os._exit(3)\n"
        "    return softmax_attention(q, k, v, **kw)\n"
    )
    monkeypatch.chdir(tmp_path)
    job = _job("once_kernels:fn", "softmax", 6, d=4)
    report, _ = run_jobs([job], workers=2, shards=2, progress=False)
    assert report.verdict == "ok" and len(report.retried) >= 1
    assert json.loads(report.to_json())["retried"][0]["kernel"] == "fn"


def test_a_kernel_raising_keyboard_interrupt_in_a_worker_fails_its_case_only(tmp_path, monkeypatch):
    """Pool workers ignore SIGINT (the parent stops them on Ctrl-C), so a KeyboardInterrupt
    there is the kernel's own: its case's failure (a review: it stopped the whole run as
    interrupted, losing the cases in flight)."""
    (tmp_path / "kbi_kernels.py").write_text(
        "from attnprec.attention import softmax_attention\n"
        "def fn(q, k, v, **kw):\n"
        "    if q.shape[-2] == 5:\n"
        "        raise KeyboardInterrupt\n"
        "    return softmax_attention(q, k, v, **kw)\n"
    )
    monkeypatch.chdir(tmp_path)
    jobs = [_job("kbi_kernels:fn", "softmax", n, d=4) for n in (4, 5, 6)]
    report, _ = run_jobs(jobs, workers=2, progress=False)
    assert not report.partial and not report.not_run and len(report.cases) == 2
    (fail,) = report.failures
    assert fail["error"].startswith("KeyboardInterrupt") and report.exit_status == 1


def test_merged_shards_none_of_which_ran_are_partial_never_ok():
    """A review: merge_shards of shards none of which judged a row returned an empty
    report, ok with exit status 0; and a case with shards missing was partial while its
    report was not."""
    job = _job("attnprec.attention:softmax_attention", "softmax", 2, d=4)
    shards = shard_jobs(job, 4)
    empty = run_job(shards[3])  # a shard without rows
    for reports in ([None, None, None, None], [None, None, None, empty]):
        merged = merge_shards(job, reports)
        assert merged.partial and not merged.ok and merged.exit_status == 130
    done = [run_job(s) for s in shards[:2]]
    merged = merge_shards(job, [done[0], None, None, empty])
    assert merged.partial and merged.cases[0].partial and merged.verdict == "PARTIAL"


def test_an_unreachable_dask_scheduler_names_dask():
    pytest.importorskip("distributed")
    with pytest.raises(ValueError, match="^dask: cannot connect to 'not an address'"):
        run_jobs([_job("attnprec.attention:softmax_attention", "softmax", 4, d=4)],
                 dask="not an address", progress=False)  # fmt: skip


class _Heard:
    """Stands in for the rows' progress line, keeping what it is told."""

    heard: list[tuple] = []

    def __init__(self, jobs, enabled):
        self.enabled = enabled

    def __call__(self, *message):
        _Heard.heard.append(message)

    def finished(self, i):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("where", ["here", "pool", "dask"])
def test_progress_reports_the_rows_of_each_pass(monkeypatch, where):
    """The second progress line hears each running case's stages, and the rows of each
    pass from 0 through all the rows the case judges (every row, or its sample), in order,
    in this process, from a pool's workers and from Dask's."""
    from attnprec import _progress, runner

    if where == "dask":
        pytest.importorskip("distributed")
    monkeypatch.setattr(runner, "_RowsBar", _Heard)
    monkeypatch.setattr(_progress, "EVERY", 0.0)  # (spawned workers keep the default)
    _Heard.heard = []
    jobs = [JOBS[0], JOBS[2], JOBS[4]]  # softmax causal, gated, 25 sampled rows of 300
    kw = {"here": {}, "pool": {"workers": 2}, "dask": {"workers": 2, "dask": "local"}}
    report, _ = run_jobs(jobs, progress=True, **kw[where])
    assert not report.failures
    for i, case in enumerate(report.cases):
        mine = [m[1:] for m in _Heard.heard if m[0] == i]
        assert [s for s, _, t in mine if t == 0] == ["reference", "kernel", "bound"]
        rows = len(case.rows) if case.rows is not None else case.shape[0]
        bound = [(d, t) for s, d, t in mine if s == "bound" and t]
        assert bound[0] == (0, rows) and bound[-1] == (rows, rows)
        # in order within each pass (a bound may take several, each from 0)
        steps = zip(bound[:-1], bound[1:], strict=True)
        assert all(b[0] == 0 or a[0] <= b[0] <= rows for a, b in steps)
        assert any(s == "reference" and d == t == rows for s, d, t in mine)


def test_progress_of_rows_is_throttled_but_ends_are_always_told(monkeypatch):
    from attnprec import _progress

    heard = []
    _progress.rows(5, 10)  # no one listening: nothing happens
    with _progress.listening(lambda *m: heard.append(m)), _progress.stage("bound"):
        monkeypatch.setattr(_progress, "EVERY", math.inf)
        for done in range(11):
            _progress.rows(done, 10)
        monkeypatch.setattr(_progress, "EVERY", 0.0)
        _progress.rows(3, 10)
    assert heard == [("bound", 0, 0), ("bound", 0, 10), ("bound", 10, 10), ("bound", 3, 10)]


def test_a_progress_listener_gone_fails_no_job():
    """A worker's progress messages to a queue that is gone (the run stopping) are dropped,
    the job's result kept."""
    from attnprec.runner import _reported_job

    def gone(message):
        raise BrokenPipeError

    report = _reported_job(0, _job("attnprec.attention:softmax_attention", "softmax", 8), gone)
    assert not report.failures and report.cases[0].verdict == "ok"


def test_a_jobs_declaration_carries_block_sums():
    from dataclasses import replace

    from attnprec.runner import _precision

    job = replace(_job("attnprec.attention:softmax_attention", "softmax", 8),
                  precision={"block": 64, "block_sums": "separate"})  # fmt: skip
    assert _precision(job, "attnprec.attention").block_sums == "separate"
    fp8 = replace(job, dtype="e4m3", kernel="attnprec.fp8:fp8_softmax_attention")
    assert _precision(fp8, "attnprec.fp8").block_sums == "separate"
    assert _precision(replace(job, precision={"block": 64}), "x").block_sums == "any"
    assert _precision(replace(job, precision={"merges": 7}), "x").merges == 7
    kept = _precision(replace(job, precision={"merges": 7, "merge_format": "fp32"}), "x")
    assert kept.merge_format is not None and kept.merge_format.name == "fp32"
    assert _precision(replace(fp8, precision={"merges": 7}), "attnprec.fp8").merges == 7
    assert _precision(replace(job, precision={"block": 64}), "x").constants == "any"
    folded = replace(job, precision={"constants": "folded"})
    assert _precision(folded, "x").constants == "folded"
    assert _precision(replace(fp8, precision={"constants": "folded"}), "y").constants == "folded"
    assert _precision(replace(job, precision={"passes": 2}), "x").passes == 2
    assert _precision(replace(fp8, precision={"passes": 2}), "attnprec.fp8").passes == 2
    assert _precision(replace(job, precision={"block": 64}), "x").passes == 1


@pytest.mark.parametrize("method", ["selective_scan", "ssd", "gated"])
def test_the_jobs_inputs_keep_the_signs_of_c_and_b(method):
    """The command line's inputs for the state-space models and gated attention are
    signed (they took elu(x) + 1 of them, as for linear attention's features: a kernel
    dropping their signs passed every family); linear attention's are its features."""
    from attnprec.runner import _inputs

    q, k, _, _ = _inputs(_job("attnprec.attention:softmax_attention", method, 16))
    assert bool((q < 0).any()) and bool((k < 0).any())
    q, k, _, params = _inputs(_job("attnprec.attention:linear_attention", "linear", 16))
    assert params["feature_map"] is None and bool((q > 0).all()) and bool((k > 0).all())
