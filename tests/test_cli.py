"""The attnprec command: plumbing, the bound and formats subcommands, argument errors."""

import json
import math
import subprocess
import sys

import pytest
import torch

from attnprec.analysis.bounds import rounding as rb
from attnprec.analysis.bounds import taylor as tb
from attnprec.analysis.precision import FORMATS
from attnprec.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_formats_table_lists_every_format(capsys):
    code, out, _ = run(capsys, "formats")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:2] == ["format", "p"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == set(FORMATS)
    for name, f in FORMATS.items():
        p, u, mx = rows[name][1:4]
        assert int(p) == f.precision
        assert float(u) == pytest.approx(f.u, rel=1e-5)  # printed with 6 significant digits
        assert float(mx) == pytest.approx(f.max, rel=1e-5)


def test_bound_taylor_reports_the_degree_needed(capsys):
    code, out, _ = run(capsys, "bound", "taylor", "--radius", "2", "--tol", "1e-3")
    assert code == 0
    needed = tb.taylor_degree_needed(2.0, 1e-3)
    assert f"degree needed: {needed}" in out
    table = [
        line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0].isdigit()
    ]
    assert [int(r[0]) for r in table] == list(range(needed + 1))
    # The last row meets the tolerance, the one before does not.
    assert float(table[-1][2]) <= 1e-3 < float(table[-2][2])


def test_bound_taylor_unreachable_tolerance_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bound", "taylor", "--radius", "50", "--tol", "1e-9", "--max-degree", "3"])
    assert e.value.code == 2
    assert "max_degree" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--op", "sum", "--n", "1000", "--precision", "bf16"], rb.sum_gamma(1000, 2.0**-8)),
        (
            ["--op", "sum", "--n", "1000", "--precision", "fp16", "--order", "pairwise"],
            rb.sum_gamma(1000, 2.0**-11, "pairwise"),
        ),
        (
            ["--op", "dot", "--n", "64", "--precision", "fp16", "--accumulate", "fp32"],
            rb.dot_gamma(64, 2.0**-24),
        ),
        (
            ["--op", "probabilistic", "--n", "4096", "--precision", "bf16", "--delta", "1e-4"],
            rb.probabilistic_gamma(4096, 2.0**-8, rb.hm_lambda(4096, 2.0**-8, 1e-4)),
        ),
    ],
)
def test_bound_rounding_constants(capsys, argv, expected):
    code, out, _ = run(capsys, "bound", "rounding", *argv)
    assert code == 0
    assert f"{expected:.6g}" in out


def test_bound_rounding_lse_evaluates_the_library_bound(capsys):
    import torch

    code, out, _ = run(
        capsys, "bound", "rounding", "--op", "lse", "--n", "100", "--precision", "fp16"
    )
    assert code == 0
    x = torch.randn(100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert f"{float(rb.lse_bound(x, 2.0**-11).max()):.6g}" in out


_SQRT_SOFTMAX = ["audit", "--kernel", "math:sqrt", "--method", "softmax"]


@pytest.mark.parametrize(
    "argv, option",
    [
        (["bound", "taylor", "--radius", "-1", "--tol", "0.1"], "--radius"),
        (["bound", "taylor", "--radius", "1", "--tol", "2"], "--tol"),
        (["bound", "rounding", "--op", "sum", "--n", "0"], "--n"),
        (["bound", "rounding", "--op", "sum", "--n", "4", "--precision", "fp12"], "--precision"),
        # a ValueError traceback (exit 1) before
        (["bound", "rounding", "--op", "sum", "--n", "10", "--order", "blocked"], "--block"),
        # an 800 GB allocation before
        (["bound", "rounding", "--op", "lse", "--n", "100000000000"], "--n"),
        (["bound", "rounding", "--op", "softmax", "--n", "10000001"], "--n"),
        (["audit", "--kernel", "nocolon"], "--method"),
        (["audit", "--kernel", "nocolon", "--method", "softmax"], "--kernel"),
        (["audit", "--kernel", "no_such_module_xyz:f", "--method", "softmax"], "--kernel"),
        (["audit", "--kernel", "math:no_such_fn", "--method", "softmax"], "--kernel"),
        (["audit", "--dtype", "fp8"], "--dtype"),
        (["audit", "--family", "gaussian"], "--family"),
        (["audit", "--n", "0"], "--n"),
        (["audit", "--method", "polynomial", "--coeffs", "1,abc"], "--coeffs"),
        (["audit", "--method", "semiring", "--semiring", "logexpmean:abc"], "--semiring"),
        (["audit", "--json", "/no/such/folder/a.json"], "--json"),
        (["audit", "--block", "zero"], "--block"),
        (
            ["audit", "--kernel", "math:sqrt", "--method", "softmax", "--block-sums", "separate"],
            "--block-sums",
        ),
        (
            [
                "audit",
                "--kernel",
                "math:sqrt",
                "--method",
                "softmax",
                "--block",
                "one-pass",
                "--block-sums",
                "separate",
            ],
            "--block-sums",
        ),
        (["audit", "--block-sums", "fused"], "--block-sums"),
        (["audit", "--constants", "query"], "--constants"),
        (["audit", "--method", "log", "--stabilizer", "data_dash"], "--stabilizer"),
        (["audit", "--kernel", "math:sqrt", "--method", "log", "--sums", "exp"], "--sums"),
        ([*_SQRT_SOFTMAX, "--merges", "0"], "--merges"),
        (["audit", "--kernel", "math:sqrt", "--method", "log", "--merges", "3"], "--merges"),
        ([*_SQRT_SOFTMAX, "--merge-format", "fp32"], "--merge-format"),
        ([*_SQRT_SOFTMAX, "--merges", "3", "--merge-format", "fp31"], "--merge-format"),
        ([*_SQRT_SOFTMAX, "--merges", "3", "--sums", "linear"], "--merges"),
        ([*_SQRT_SOFTMAX, "--passes", "3"], "--passes"),
        (["audit", "--kernel", "math:sqrt", "--method", "log", "--passes", "2"], "--passes"),
        ([*_SQRT_SOFTMAX, "--passes", "2", "--merges", "3"], "--passes"),
        (["audit", "--method", "softmax", "--passes", "2"], "--passes"),
        # state evaluation: partial sums declared as values, and methods that have one
        (["audit", "--kernel", "math:sqrt", "--method", "log", "--evaluation", "state"], "--sums"),
        (
            [
                "audit",
                "--kernel",
                "math:sqrt",
                "--method",
                "softmax",
                "--evaluation",
                "state",
                "--sums",
                "linear",
            ],
            "--evaluation",
        ),  # fmt: skip
        # ignored before: the fingerprint judges every row in one job
        (["audit", "--method", "log", "--infer-precision", "--rows", "5"], "--rows"),
        (["audit", "--method", "log", "--infer-precision", "--shards", "2"], "--shards"),
        # a raw traceback from distributed, exit 1, before
        (["audit", "--method", "log", "--n", "8", "--dask", "no address"], "--dask"),
        ([], "command"),
        # read by nothing, silently ignored before (a review)
        (["audit", "--method", "log", "--compute", "fp16"], "--compute"),
        (["audit", "--method", "log", "--sums", "linear"], "--sums"),
        (["audit", "--method", "log", "--block", "4"], "--block"),
        (["audit", "--kernel", "torch:sdpa", "--method", "softmax", "--merges", "3"], "--merges"),
        (["audit", "--method", "softmax", "--fp8-scale", "block"], "--fp8-scale"),
        (["audit", "--method", "log", "--family", "overrange"], "--family"),
        (["audit", "--method", "log", "--gates", "zero"], "--gates"),
        # a failed case each, exit 1 (VIOLATED), before
        (["audit", "--method", "log", "--seed", "-1"], "--seed"),
    ],
)
def test_bad_arguments_exit_2_naming_the_option(capsys, argv, option):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert option in capsys.readouterr().err


def test_degree_for_another_method_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["audit", "--kernel", "math:sqrt", "--method", "softmax", "--degree", "3"])
    assert e.value.code == 2
    assert "--degree" in capsys.readouterr().err


def test_help_and_formats_do_not_import_torch():
    # the parser is built from torch-free tables, so --help and formats answer at once
    code = (
        "import sys; from attnprec.cli import build_parser, main; build_parser(); "
        "main(['formats']); main(['methods']); assert 'torch' not in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_a_kernel_from_the_working_directory(capsys, tmp_path, monkeypatch):
    (tmp_path / "mykernels.py").write_text(
        "from attnprec.attention import softmax_attention as attn\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    argv = ["audit", "--kernel", "mykernels:attn", "--method", "softmax", "--dtype", "fp16"]
    argv += ["--family", "typical", "--n", "6", "--d", "4", "--quiet"]
    code, out, _ = run(capsys, *argv)
    assert code == 0, out


def test_a_kernel_that_raises_is_one_failed_case(capsys):
    argv = ["audit", "--kernel", "math:sqrt", "--method", "softmax", "--dtype", "fp16"]
    argv += ["--family", "typical", "--family", "ties", "--n", "6", "--d", "4", "--quiet"]
    code, out, _ = run(capsys, *argv)
    assert code == 1 and out.count("ERROR math:sqrt") == 2 and "TypeError" in out


def test_families_draw_from_their_own_seeds():
    from attnprec.runner import Job, _inputs

    base = dict(kernel="k:f", label="k", method="softmax", dtype="fp32", n=8, d=4)
    q1, _, _, _ = _inputs(Job(family="typical", **base))
    q2, _, _, _ = _inputs(Job(family="outliers", **base))
    assert not torch.equal(q1[0], q2[0])


def test_interrupt_keeps_a_partial_report(tmp_path):
    from attnprec.runner import Job, run_jobs

    calls = {"n": 0}

    def fn(q, k, v, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        from attnprec.attention import softmax_attention

        return softmax_attention(q, k, v, **kw)

    import types

    mod = types.ModuleType("interrupt_kernels")
    mod.fn = fn
    sys.modules["interrupt_kernels"] = mod
    fp32 = {"compute": "fp32", "accumulate": "fp32"}
    jobs = [Job("interrupt_kernels:fn", "fn", "softmax", "fp16", fam, 6, 4, precision=fp32)
            for fam in ("typical", "ties", "sinks")]  # fmt: skip
    report, _ = run_jobs(jobs, progress=False)
    assert report.partial and len(report.cases) == 1
    # what ran passed, but not everything ran: never ok
    assert report.cases[0].verdict == "ok" and report.verdict == "PARTIAL"
    data = json.loads(report.to_json(str(tmp_path / "p.json")))
    assert data["partial"] is True and data["ok"] is False and data["verdict"] == "PARTIAL"
    assert [m["family"] for m in data["not_run"]] == ["ties", "sinks"]


def test_two_workers_give_the_same_report(capsys, tmp_path):
    argv = ["audit", "--method", "log", "--dtype", "fp16", "--family", "typical"]
    argv += ["--family", "ties", "--n", "6", "--d", "4", "--quiet"]
    one = tmp_path / "one.json"
    two = tmp_path / "two.json"
    assert run(capsys, *argv, "--json", str(one))[0] == 0
    assert run(capsys, *argv, "--json", str(two), "--workers", "2")[0] == 0
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert [c["total"] for c in a["cases"]] == [c["total"] for c in b["cases"]]


def test_infer_precision_names_the_tightest_declaration(capsys):
    argv = ["audit", "--kernel", "attnprec.attention:softmax_attention", "--method"]
    argv += ["softmax", "--dtype", "fp32", "--family", "typical", "--n", "8", "--d", "4"]
    code, out, _ = run(capsys, *argv, "--infer-precision", "--quiet")
    assert code == 0 and "consistent with fp32 compute, fp32 accumulate" in out


def test_python_dash_m_runs_the_command():
    r = subprocess.run(
        [sys.executable, "-m", "attnprec", "formats"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "bf16" in r.stdout and "e4m3" in r.stdout


def test_a_reader_that_stops_early_gets_no_traceback():
    """``attnprec audit | head -1``: the command stops quietly, status 128 + SIGPIPE."""
    argv = [sys.executable, "-m", "attnprec", "audit", "--method", "log", "--dtype", "fp16"]
    argv += ["--family", "typical", "--n", "6", "--d", "4", "--quiet"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) in (0, 141) and "Traceback" not in err, err


def test_a_reader_that_stops_early_still_gets_the_report_file(tmp_path):
    """``attnprec audit --json r.json | head -c 100``: the prints stop at the closed pipe, and
    the report is written before them (a review: an earlier run's passing r.json was left
    in place after a run whose every case was violated)."""
    import json
    import os

    (tmp_path / "offrow.py").write_text(
        "from attnprec.attention import softmax_attention\n"
        "def attn(q, k, v, **kw):\n"
        "    y = softmax_attention(q, k, v, **kw).clone()\n"
        "    y[..., 1, :] += 1\n"
        "    return y\n"
    )
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"ok": True, "verdict": "ok"}))  # an earlier run's
    argv = [sys.executable, "-m", "attnprec", "audit", "--kernel", "offrow:attn", "--method"]
    argv += ["softmax", "--dtype", "fp16", "--n", "8", "--d", "4", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and "Traceback" not in err, err
    rep = json.loads(out.read_text())
    assert rep["ok"] is False and rep["cases"] and rep["counts"]["violated"] > 0


def test_audit_of_a_builtin_kernel_writes_json_and_plot(capsys, tmp_path):
    import json

    js, png = tmp_path / "a.json", tmp_path / "a.png"
    argv = ["audit", "--method", "log", "--dtype", "fp16", "--family", "typical"]
    argv += ["--family", "real", "--n", "8", "--d", "4", "--json", str(js), "--plot", str(png)]
    code, out, err = run(capsys, *argv)
    assert code == 0, out
    data = json.loads(js.read_text())
    assert data["ok"] is True and not data["failures"]
    assert [(c["method"], c["dtype"], c["family"]) for c in data["cases"]] == [
        ("log", "fp16", "typical"),
        ("log", "fp16", "real"),
    ]
    for c in data["cases"]:
        assert c["verdict"] == "ok" and c["total"]["tightness"] >= 1
    rows = [line.split() for line in out.splitlines() if line.startswith("log ")]
    assert [r[-1] for r in rows] == ["ok", "ok"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "2/2" in err  # the progress bar


def test_audit_of_a_user_function(capsys):
    argv = ["audit", "--kernel", "attnprec.attention:softmax_attention", "--method", "softmax"]
    argv += ["--dtype", "fp16", "--family", "outliers", "--n", "8", "--d", "4", "--quiet"]
    code, out, err = run(capsys, *argv)
    assert code == 0, out
    assert "attnprec.attention:softmax_attention" in out and err == ""


@pytest.mark.parametrize("evaluation", ["pairs", "state"])
def test_audit_of_a_user_linear_kernel_takes_features(capsys, evaluation):
    """A user's linear kernel gets the features elu(x) + 1 and ``feature_map=None``, as the
    built-in ones (it got the raw inputs, so its own elu + 1 met a bound over raw features:
    'could not be audited'); the state evaluation with the sums declared as values."""
    argv = ["audit", "--kernel", "attnprec.attention.linear:linear_attention"]
    argv += ["--method", "linear", "--dtype", "bf16", "--family", "typical", "--n", "16"]
    argv += ["--d", "4", "--quiet", "--evaluation", evaluation, "--sums", "linear"]
    code, out, err = run(capsys, *argv)
    assert code == 0, out + err
    assert "1 cases audited, 0 not ok, 0 could not be audited" in out


def test_audit_exits_1_on_a_violation(capsys):
    # Heinsen's log attention is not softmax attention: audited as softmax, it must fail.
    argv = ["audit", "--kernel", "attnprec.attention:log_attention", "--method", "softmax"]
    argv += ["--dtype", "fp16", "--family", "typical", "--n", "8", "--d", "4", "--quiet"]
    code, out, _ = run(capsys, *argv)
    assert code == 1
    assert "VIOLATED" in out and "elements violated" in out


def test_bound_favor_reports_the_features_needed(capsys):
    from attnprec.analysis.bounds import favor_features_needed

    code, out, _ = run(
        capsys, "bound", "favor", "--radius", "0.5", "--tol", "0.1", "--delta", "0.01"
    )
    assert code == 0
    assert f"random features needed: {favor_features_needed(0.5, 0.1, 0.01)}" in out


def test_dask_local_cluster_gives_the_same_report():
    pytest.importorskip("distributed")
    from attnprec.runner import Job, run_jobs

    jobs = [Job("attnprec.kernels.log:log_attention", "log", "log", "fp16", fam, 6, 4)
            for fam in ("typical", "ties")]  # fmt: skip
    here, _ = run_jobs(jobs, progress=False)
    there, _ = run_jobs(jobs, workers=2, dask="local", progress=False)
    assert [c.total.max_bound for c in here.cases] == [c.total.max_bound for c in there.cases]
    assert [c.counts for c in here.cases] == [c.counts for c in there.cases]


def _kernels(name, **fns):
    import types

    mod = types.ModuleType(name)
    for key, fn in fns.items():
        setattr(mod, key, fn)
    sys.modules[name] = mod


def _wrong_at(row, col, value):
    def fn(q, k, v, **kw):
        from attnprec.attention import softmax_attention

        out = softmax_attention(q, k, v, **kw).clone()
        out[..., row, col] = value
        return out

    return fn


AUDIT = ["audit", "--method", "softmax", "--dtype", "fp16", "--family", "typical", "--quiet"]


def test_infer_precision_meeting_no_declaration_fails(capsys, tmp_path):
    _kernels("cli_nan_kernels", nan=_wrong_at(1, 0, math.nan))
    js = tmp_path / "f.json"
    argv = [*AUDIT, "--kernel", "cli_nan_kernels:nan", "--n", "8", "--d", "4"]
    code, out, _ = run(capsys, *argv, "--infer-precision", "--json", str(js))
    assert code == 1 and "no declaration tried is met" in out
    data = json.loads(js.read_text())
    assert data["ok"] is False and data["verdict"] == "VIOLATED"
    (fp,) = data["fingerprints"]
    assert fp["kernel"] == "cli_nan_kernels:nan" and fp["fingerprint"]["best"] is None
    assert len(fp["fingerprint"]["rows"]) > 1


def test_sampled_rows_are_said_and_unjudged_nan_is_never_ok(capsys, tmp_path):
    _kernels("cli_row_kernels", nan16=_wrong_at(16, 0, math.nan))
    js = tmp_path / "s.json"
    argv = [*AUDIT, "--kernel", "cli_row_kernels:nan16", "--n", "32", "--rows", "4"]
    code, out, _ = run(capsys, *argv, "--json", str(js))
    table = out.splitlines()
    assert table[0].split()[5] == "rows" and "4 of 32" in table[2]
    assert "1 judged on sampled rows only (4 of 32 rows)" in out
    data = json.loads(js.read_text())
    assert 16 not in data["cases"][0]["rows"] and data["cases"][0]["unjudged_nonfinite"] == [16]
    assert code == 4 and data["verdict"] == "UNDECIDED" and data["ok"] is False
    assert data["sampled_cases"] == 1
    # the rows are drawn with --seed (every seed drew seed 0's rows)
    drawn = set()
    for seed in ("1", "2"):
        run(capsys, *argv, "--seed", seed, "--json", str(js))
        drawn.add(tuple(json.loads(js.read_text())["cases"][0]["rows"]))
    assert len(drawn) == 2


def test_the_real_family_at_its_captured_size_is_said(capsys, tmp_path):
    """A review: family real ran at 128 tokens and 32 channels whatever --n and --d said,
    and --rows then judged every row, silently."""
    argv = ["audit", "--method", "softmax", "--dtype", "fp16", "--family", "real", "--quiet"]
    argv += ["--kernel", "attnprec.attention:softmax_attention", "--n", "200", "--d", "8"]
    code, out, _ = run(capsys, *argv, "--rows", "150")
    assert code == 0 and "1 of family real at its captured size n 128, d 8" in out
    code, out, _ = run(capsys, *argv[:-4], "--n", "16", "--d", "8")
    assert code == 0 and "captured size" not in out


def test_a_kernel_raising_system_exit_fails_its_case(capsys):
    def sysexit(q, k, v, **kw):
        raise SystemExit(0)

    _kernels("cli_exit_kernels", sysexit=sysexit)
    code, out, _ = run(capsys, *AUDIT, "--kernel", "cli_exit_kernels:sysexit", "--n", "4")
    assert code == 1 and "ERROR cli_exit_kernels:sysexit" in out and "SystemExit" in out


SLOW_KERNEL = """
import os, pathlib, time
from attnprec.attention import softmax_attention

def slow(q, k, v, **kw):
    pathlib.Path(os.environ["ATTNPREC_TEST_MARK"]).touch()
    time.sleep(120)
    return softmax_attention(q, k, v, **kw)
"""


def test_two_ctrl_c_stop_the_workers_and_write_the_partial_report(tmp_path):
    import os
    import signal
    import time

    (tmp_path / "slow_kernels.py").write_text(SLOW_KERNEL)
    mark, js = tmp_path / "started", tmp_path / "p.json"
    argv = [sys.executable, "-m", "attnprec", *AUDIT, "--kernel", "slow_kernels:slow"]
    argv += ["--family", "ties", "--n", "8", "--d", "4", "--workers", "2", "--json", str(js)]
    env = {**os.environ, "ATTNPREC_TEST_MARK": str(mark)}
    p = subprocess.Popen(argv, cwd=tmp_path, env=env, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not mark.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert mark.exists(), p.communicate(timeout=5)[0] if p.poll() is not None else "slow"
        p.send_signal(signal.SIGINT)  # an impatient user: Ctrl-C twice
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=60)  # no hang waiting for the running kernels
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, out
    data = json.loads(js.read_text())
    assert data["partial"] is True and data["ok"] is False and data["verdict"] == "PARTIAL"
    assert [m["family"] for m in data["not_run"]] == ["typical", "ties"]


def test_interrupt_at_start_up_writes_a_partial_report(capsys, tmp_path, monkeypatch):
    """Ctrl-C before the run loop (imports, the pool's start): a traceback and no JSON
    before; now a partial report with every case not run, exit 130, written whole (the JSON
    is renamed into place: no truncated file, no stale one left looking current)."""
    import attnprec.runner as runner

    def stopped(*a, **kw):
        raise KeyboardInterrupt

    js = tmp_path / "a.json"
    js.write_text("stale")
    monkeypatch.setattr(runner, "run_jobs", stopped)
    code = main(["audit", "--method", "log", "--dtype", "bf16", "--n", "8", "--shards", "2",
                 "--json", str(js), "--quiet"])  # fmt: skip
    data = json.loads(js.read_text())
    assert code == 130 and data["partial"] is True and data["verdict"] == "PARTIAL"
    assert data["not_run"] and all(m["missing_shards"] == [0, 1] for m in data["not_run"])
    assert not list(tmp_path.glob("a.json.tmp*"))


def test_interrupt_before_the_cases_are_set_up_writes_a_partial_report(tmp_path, monkeypatch):
    """Ctrl-C while the jobs are built (the first instant: imports): "interrupted", exit
    130, and an earlier run's JSON was left looking current; now the JSON says partial,
    nothing run."""
    import signal

    import attnprec.cli as cli

    def stopped(*a, **kw):
        raise KeyboardInterrupt

    js = tmp_path / "a.json"
    js.write_text('{"verdict": "ok"}')
    monkeypatch.setattr(cli, "_jobs", stopped)
    before = signal.getsignal(signal.SIGINT)
    code = main(["audit", "--method", "log", "--json", str(js), "--quiet"])
    data = json.loads(js.read_text())
    assert code == 130 and data["partial"] is True and data["verdict"] == "PARTIAL"
    assert not data["cases"] and signal.getsignal(signal.SIGINT) is before


def test_an_output_file_that_cannot_be_written_names_its_option(capsys, tmp_path, monkeypatch):
    """A JSON or plot that fails at the end (a file system that refuses it, a plot format
    matplotlib rejects): a usage error naming the option, not a traceback and exit 1 (read
    as VIOLATED) after an ok run (a review)."""
    from attnprec.analysis.report import AuditReport

    def refused(self, path=None):
        raise ValueError(f"path: cannot write {path!r}: Permission denied")

    base = ["audit", "--method", "log", "--n", "8", "--family", "typical", "--dtype", "bf16"]
    with monkeypatch.context() as m:
        m.setattr(AuditReport, "to_json", refused)
        with pytest.raises(SystemExit) as e:
            main([*base, "--json", str(tmp_path / "a.json"), "--quiet"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "--json: cannot write" in err
    assert "verdict ok" in out  # printed before the error (a review: nothing was)
    # (matplotlib: a test dependency, the plot extra)
    with pytest.raises(SystemExit) as e:
        main([*base, "--plot", str(tmp_path / "p.out"), "--quiet"])
    assert e.value.code == 2 and "--plot: " in capsys.readouterr().err


def test_a_ctrl_c_a_library_swallows_still_makes_the_run_partial(tmp_path, monkeypatch):
    """A Ctrl-C inside a case that some code catches (a bare except around an import):
    the run went on to rc 0 and "ok" (a review); it is partial, exit 130."""
    import os
    import signal

    import attnprec.runner as runner

    real = runner.run_jobs

    def swallowed(*a, **kw):
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:  # noqa: BLE001 (the library's bare except)
            pass
        return real(*a, **kw)

    monkeypatch.setattr(runner, "run_jobs", swallowed)
    js = tmp_path / "a.json"
    code = main(["audit", "--method", "log", "--n", "8", "--family", "typical", "--dtype",
                 "bf16", "--json", str(js), "--quiet"])  # fmt: skip
    data = json.loads(js.read_text())
    assert code == 130 and data["partial"] is True and data["verdict"] == "PARTIAL"


def test_a_ctrl_c_at_start_up_is_kept_until_the_imports_are_done(tmp_path, monkeypatch):
    """A Ctrl-C while the jobs are built (imports): raised inside torch's import it left
    torch half-loaded and the partial report crashed, or a library swallowed it (a
    review). It is kept, and the run stops before any case: partial, exit 130."""
    import os
    import signal

    import attnprec.cli as cli

    real = cli._jobs

    def interrupted(args):
        os.kill(os.getpid(), signal.SIGINT)  # (kept: no KeyboardInterrupt here)
        return real(args)

    monkeypatch.setattr(cli, "_jobs", interrupted)
    js = tmp_path / "a.json"
    code = main(["audit", "--method", "log", "--n", "8", "--json", str(js), "--quiet"])
    data = json.loads(js.read_text())
    assert code == 130 and data["partial"] is True and not data["cases"] and data["not_run"]


def test_replay_names_the_file_and_the_kernel(capsys, tmp_path):
    """A file that holds no saved case, and a --kernel that cannot be imported: usage
    errors naming ``file`` and ``--kernel`` (a traceback, and ``file: kernel: ...``,
    before; a review)."""
    bad = tmp_path / "x.pt"
    bad.write_text('{"a": 1}')
    for argv, option in (
        (["replay", str(bad)], "file: "),
        (["replay", str(bad), "--kernel", "no_such_module_xyz:f"], "--kernel: "),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and option in capsys.readouterr().err


def test_accepted_unbounded_elements_are_described(tmp_path, capsys):
    """A review: with --allow-unbounded the command said ok (exit 0) for a case whose
    elements were mostly never checked, and printed neither the reason nor the hint."""
    from attnprec.cli import main

    (tmp_path / "mylog.py").write_text(
        "from attnprec.attention import log_attention\n"
        "def kern(q, k, v, **kw):\n"
        "    return log_attention(q.double(), k.double(), v.double(), **kw).to(q.dtype)\n"
    )
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        status = main(["audit", "--kernel", "mylog:kern", "--method", "log", "--dtype", "fp16",
                       "--compute", "fp16", "--family", "typical", "--n", "40", "--d", "8",
                       "--allow-unbounded", "--quiet"])  # fmt: skip
    finally:
        sys.path.remove(str(tmp_path))
    text = capsys.readouterr().out
    # (40 tokens: 192 of 320 elements unbounded, accepted; 16 tokens were 120 of 128
    # until the normalizer's floor and sums of one sign took their terms' signs)
    assert status == 0
    assert "192 unbounded" in text and "accepted: unbounded" in text
    assert "not checked (no finite bound), because of: log-space sums in fp16" in text
    assert "hint: sums=None covers partial sums held as logs" in text
