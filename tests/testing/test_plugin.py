"""The pytest plugin (attnprec.testing.plugin): options, profiles, the fixture, the report,
and the CI example of docs/ci.md, run as shown.

Each test runs pytest in-process on files of its own (``pytester``); the Hypothesis profile
those runs load is global, so it is restored after each test.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# Imported here, not first inside an in-process run (pytester unloads what such a run imports).
import attnprec.analysis.audit  # noqa: F401
import attnprec.attention  # noqa: F401
from attnprec.testing.plugin import PROFILES, profile_name

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "ci.md"
PLUGIN = ROOT / "src" / "attnprec" / "testing" / "plugin.py"


@pytest.fixture(autouse=True)
def _restore_hypothesis_profile():
    name = settings.get_current_profile_name()
    yield
    settings.load_profile(name)


def doc_block(name: str, language: str = "python") -> str:
    """The code of the ``{code-block}`` named ``name`` in docs/ci.md."""
    text = DOC.read_text(encoding="utf-8")
    pattern = (
        rf"```\{{code-block\}} {language}\n(?::[a-z]+: [^\n]*\n)*?:name: {re.escape(name)}\n"
        r"(?::[a-z]+: [^\n]*\n)*\n(.*?)```"
    )
    m = re.search(pattern, text, re.S)
    assert m, f"docs/ci.md: the {name} block is missing"
    return m.group(1)


# --------------------------------------------------------------------------------------------
# Registration


def test_options_fixture_and_marker_are_registered(pytester):
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--attnprec-profile={ci,thorough}*", "*--attnprec-report=PATH*"])
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.attnprec(method=None, *"])
    result = pytester.runpytest("--fixtures")
    result.stdout.fnmatch_lines(["attnprec_audit*", "*Audit a kernel on every input family*"])


def test_a_suite_that_does_not_use_it_is_untouched(pytester):
    pytester.makepyfile("def test_plain():\n    assert True\n")
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    assert "attnprec:" not in result.stdout.str()


def test_loading_the_plugin_imports_nothing_heavy():
    # The plugin module itself (its package is attnprec.testing's business): only pytest.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('_probe', {str(PLUGIN)!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "heavy = ('torch', 'hypothesis', 'numpy', 'attnprec')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------
# --attnprec-profile

PROFILE_PROBE = """
from hypothesis import settings

DECORATED = settings(deadline=None)  # made at import, as @settings(...) on a test is


def test_profile():
    s = settings.default
    print("PROFILE", settings.get_current_profile_name(), s.max_examples, s.derandomize,
          s.deadline, DECORATED.max_examples)
"""


@pytest.mark.parametrize("choice", [None, "ci", "thorough"])
def test_the_profile_option_selects_the_profile(pytester, choice):
    # The project loads a profile of its own; only the option replaces it.
    pytester.makeconftest(
        "from hypothesis import settings\n"
        "settings.register_profile('project', max_examples=7, derandomize=False)\n"
        "settings.load_profile('project')\n"
    )
    pytester.makepyfile(PROFILE_PROBE)
    args = ["-s"] + (["--attnprec-profile", choice] if choice else [])
    result = pytester.runpytest(*args)
    result.assert_outcomes(passed=1)
    if choice is None:
        result.stdout.fnmatch_lines(["*PROFILE project 7 False None 7"])
        assert "attnprec:" not in result.stdout.str()
        return
    n = PROFILES[choice]["max_examples"]
    derandomize = PROFILES[choice]["derandomize"]
    name = profile_name(choice)
    result.stdout.fnmatch_lines(
        [f"attnprec: hypothesis profile '{name}'", f"*PROFILE {name} {n} {derandomize} None {n}"]
    )


# --------------------------------------------------------------------------------------------
# The fixture

CORRECT = """
import pytest
import torch
from attnprec.attention import softmax_attention, taylor_attention
from attnprec.testing import FAMILIES


def test_every_family_and_form(attnprec_audit):
    report = attnprec_audit(softmax_attention, "softmax", dtype=torch.float16,
                            precision="fp16", sizes=[(8, 4), (3, 2)], causal=(False, True))
    assert report.ok and len(report.cases) == len(FAMILIES) * 2 * 2
    assert {c.family for c in report.cases} == set(FAMILIES)
    assert {c.params.get("causal", False) for c in report.cases} == {False, True}


def test_dtype_from_precision_and_rectangles(attnprec_audit):
    report = attnprec_audit(softmax_attention, "softmax", precision="fp16",
                            families=["outliers"], sizes=[(3, 5, 4, 1)])
    (case,) = report.cases
    assert (case.dtype, case.family, case.shape) == ("fp16", "outliers", (3, 5, 4, 1))


@pytest.mark.attnprec("taylor", dtype="fp32", families=["typical", "ties"], degree=2)
def test_defaults_and_parameters_from_the_marker(attnprec_audit):
    report = attnprec_audit(taylor_attention, sizes=[(4, 2)])
    assert [c.params for c in report.cases] == [{"degree": 2}] * 2
    assert {c.dtype for c in report.cases} == {"fp32"}


def test_bad_arguments_name_themselves(attnprec_audit):
    with pytest.raises(TypeError, match="method: required"):
        attnprec_audit(softmax_attention, dtype=torch.float16)
    with pytest.raises(ValueError, match="sizes: causal audits need n_q == n_k"):
        attnprec_audit(softmax_attention, "softmax", precision="fp16", sizes=[(2, 3, 1, 1)],
                       causal=True)
    with pytest.raises(ValueError, match="families"):
        attnprec_audit(softmax_attention, "softmax", precision="fp16", families=["nope"])
    # a string flag is truthy (it accepted unchecked elements), a float seed was truncated
    for flag in ("allow_unbounded", "allow_atypical"):
        with pytest.raises(TypeError, match=f"{flag}: expected a bool"):
            attnprec_audit(softmax_attention, "softmax", precision="fp16", **{flag: "false"})
    with pytest.raises(TypeError, match="seed: expected an integer"):
        attnprec_audit(softmax_attention, "softmax", precision="fp16", seed=1.9)


def test_required_parameters_left_out_are_drawn_per_case(attnprec_audit):
    # (a review: "log_g: required" and "delta: required", where the command line draws
    # them; a log_g follows the size, so one given would need a call per size)
    from attnprec.attention import gated_linear_attention, selective_scan_attention

    report = attnprec_audit(gated_linear_attention, "gated", precision="fp32", causal=True,
                            families=["typical"], sizes=[(8, 4), (5, 3)])
    assert report.ok and len(report.cases) == 2
    report = attnprec_audit(selective_scan_attention, "selective_scan", precision="fp32",
                            causal=True, families=["typical"], sizes=[(6, 3)])
    assert report.ok and len(report.cases) == 1
"""


def test_the_fixture_passes_a_correct_kernel(pytester):
    pytester.makepyfile(CORRECT)
    result = pytester.runpytest()
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(["attnprec: 30 cases audited in 4 tests, verdict ok; *"])


WRONG = """
import torch


def zeros(q, k, v):
    return torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)


def test_zeros(attnprec_audit):
    attnprec_audit(zeros, "softmax", dtype=torch.float16, precision="fp16", sizes=[(4, 2)])
"""


def test_the_fixture_fails_a_wrong_kernel_readably(pytester):
    pytester.makepyfile(WRONG)
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E*BoundViolation: zeros (softmax): 6 of 6 audited cases not within the bound, "
            "verdict VIOLATED (indices in attnprec's * order)",
            "E*zeros (softmax, fp16, typical, n_q=4, n_k=4, d_k=2, d_v=2; storage=fp16, "
            "*VIOLATED, 8 of 8 elements violated*",
            "E*  total vs exact softmax on the inputs as given: VIOLATED",
            "E*at index (0, 0) (violated): |out - ref| = *, bound = *",
            "E*bound parts there: quantization *, approximation *, rounding *",
            # Four cases in full, the others in a line each.
            "E*zeros (cancel, n_q=4, n_k=4, d_k=2, d_v=2): VIOLATED, 8 of 8 elements violated",
            "E*zeros (real, n_q=4, n_k=4, d_k=2, d_v=2): VIOLATED, 8 of 8 elements violated",
        ]
    )
    out = result.stdout.str()
    assert "plugin.py:" not in out  # the plugin's frames are hidden from the traceback
    described = [line for line in out.splitlines() if line.startswith("E") and "total vs" in line]
    assert len(described) == 4
    # each failing case saved, as the assertions save theirs (a review: the fixture's
    # failures could not be replayed), and replayed to the same verdict
    saved = sorted(set(re.findall(r"replay: attnprec replay (\S+\.pt)", out)))
    assert saved  # (cases of equal inputs share their file, as the assertions' do)
    from attnprec.testing import replay

    assert all(replay(pytester.path / path).verdict == "VIOLATED" for path in saved)


# --------------------------------------------------------------------------------------------
# --attnprec-report

REPORTED = """
import pytest
import torch
from attnprec.attention import softmax_attention

KW = dict(dtype=torch.float16, precision="fp16", families=["typical"], sizes=[(4, 2)])


def test_ok(attnprec_audit):
    attnprec_audit(softmax_attention, "softmax", **KW)


def test_wrong(attnprec_audit):
    attnprec_audit(lambda q, k, v: 2 * softmax_attention(q, k, v), "softmax", kernel="twice",
                   **KW)


def test_raises(attnprec_audit):
    def broken(q, k, v):
        raise RuntimeError("kernel launch failed")

    attnprec_audit(broken, "softmax", **KW)


def test_plain():
    pass


@pytest.mark.skip(reason="not today")
def test_skipped():
    pass


@pytest.mark.xfail(reason="known")
def test_xfail():
    assert False
"""


def test_the_report_is_written_and_parseable(pytester):
    pytester.makepyfile(test_reported=REPORTED)
    result = pytester.runpytest("--attnprec-report", "out/attnprec.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--attnprec-report: the directory of * does not exist"])
    (pytester.path / "out").mkdir()
    result = pytester.runpytest("--attnprec-report", "out/attnprec.json")
    result.assert_outcomes(passed=2, failed=2, skipped=1, xfailed=1)
    result.stdout.fnmatch_lines(
        [
            "attnprec: report -> out/attnprec.json",
            "attnprec: 2 cases audited in 3 tests, verdict VIOLATED; *; report written to *",
        ]
    )
    data = json.loads((pytester.path / "out" / "attnprec.json").read_text(encoding="utf-8"))
    assert (data["ok"], data["verdict"], data["exit_status"]) == (False, "VIOLATED", 1)
    assert (data["partial"], data["profile"], data["pytest_exit_status"]) == (False, None, 1)
    # AuditReport.to_json's figures, merged, each case tagged with its test.
    cases = {c["test"].split("::")[1]: c for c in data["cases"]}
    assert set(cases) == {"test_ok", "test_wrong"}
    assert cases["test_ok"]["verdict"] == "ok" and cases["test_wrong"]["kernel"] == "twice"
    assert cases["test_wrong"]["total"]["counts"]["violated"] > 0
    for cls, n in data["counts"].items():
        assert n == sum(c["counts"][cls] for c in data["cases"])
    assert data["violations"] == data["counts"]["violated"] > 0
    (failure,) = data["failures"]
    assert failure["test"].endswith("::test_raises") and failure["family"] == "typical"
    assert failure["error"] == "RuntimeError: kernel launch failed"
    # Every test's outcome, with its audits.
    tests = {t["nodeid"].split("::")[1]: t for t in data["tests"]}
    outcomes = {name: (t["outcome"], t["audits"], t["verdict"]) for name, t in tests.items()}
    assert outcomes == {
        "test_ok": ("passed", 1, "ok"),
        "test_wrong": ("failed", 1, "VIOLATED"),
        "test_raises": ("failed", 1, "VIOLATED"),
        "test_plain": ("passed", 0, None),
        "test_skipped": ("skipped", 0, None),
        "test_xfail": ("xfailed", 0, None),
    }
    assert data["outcomes"] == {"passed": 2, "failed": 2, "skipped": 1, "xfailed": 1}


def test_the_report_gathers_the_audits_of_xdist_workers(pytester):
    pytest.importorskip("xdist")
    pytester.makepyfile(test_reported=REPORTED)
    result = pytester.runpytest("-n", "1", "--attnprec-report", "r.json", "-k", "ok or plain")
    result.assert_outcomes(passed=2)
    data = json.loads((pytester.path / "r.json").read_text(encoding="utf-8"))
    assert data["verdict"] == "ok" and len(data["cases"]) == 1
    assert data["cases"][0]["test"] == "test_reported.py::test_ok"
    assert {t["nodeid"]: t["audits"] for t in data["tests"]} == {
        "test_reported.py::test_ok": 1,
        "test_reported.py::test_plain": 0,
    }


INTERRUPTED = """
import torch
from attnprec.attention import softmax_attention

KW = dict(dtype=torch.float16, precision="fp16", families=["typical"], sizes=[(4, 2)])


def test_a(attnprec_audit):
    attnprec_audit(softmax_attention, "softmax", **KW)


def test_b():
    {stop}


def test_c(attnprec_audit):
    attnprec_audit(softmax_attention, "softmax", **KW)
"""


@pytest.mark.parametrize(
    ("stop", "args", "outcome"),
    [("raise KeyboardInterrupt", (), "incomplete"), ("assert False", ("-x",), "failed")],
)
def test_an_interrupted_or_stopped_session_is_never_ok(pytester, stop, args, outcome):
    pytester.makepyfile(test_interrupted=INTERRUPTED.format(stop=stop))
    result = pytester.runpytest_subprocess(*args, "--attnprec-report", "r.json")  # Ctrl-C: its own
    assert result.ret != 0
    data = json.loads((pytester.path / "r.json").read_text(encoding="utf-8"))
    assert data["ok"] is False and data["partial"] is True
    assert (data["verdict"], data["exit_status"]) == ("PARTIAL", 130)
    assert data["pytest_exit_status"] == int(result.ret)
    tests = {t["nodeid"].split("::")[1]: t["outcome"] for t in data["tests"]}
    assert tests == {"test_a": "passed", "test_b": outcome}  # test_c never ran
    # the terminal line says what the report says
    result.stdout.fnmatch_lines(["*attnprec: *verdict PARTIAL*not ok (exit status 130)*"])


def test_a_session_stopped_after_its_last_test_is_whole(pytester):
    """``-x`` stopping at the last test left nothing unrun: not partial, pytest's exit
    status, and the terminal line agrees (it said "verdict ok" and nothing else)."""
    body = INTERRUPTED.format(stop="assert False")
    pytester.makepyfile(test_stopped=body[: body.index("def test_c")])
    result = pytester.runpytest("-x", "--attnprec-report", "r.json")
    data = json.loads((pytester.path / "r.json").read_text(encoding="utf-8"))
    assert result.ret == 1 and data["partial"] is False and data["verdict"] == "ok"
    assert data["ok"] is False and data["exit_status"] == 1
    result.stdout.fnmatch_lines(["*attnprec: *verdict ok*not ok (exit status 1)*"])


def test_a_failing_session_with_passing_audits_is_not_ok(pytester):
    pytester.makepyfile(test_interrupted=INTERRUPTED.format(stop="assert False"))
    result = pytester.runpytest("--attnprec-report", "r.json")
    data = json.loads((pytester.path / "r.json").read_text(encoding="utf-8"))
    assert result.ret == 1 and data["verdict"] == "ok"
    assert data["ok"] is False and data["exit_status"] == 1


def test_a_kernel_exiting_is_a_failure_of_its_case(pytester):
    """A kernel raising SystemExit inside ``attnprec_audit`` is recorded as a failure of its
    case (verdict VIOLATED), as the command line records it; the report said ok, 0 cases."""
    pytester.makepyfile(
        test_exit="""
import torch

def exits(q, k, v, **kw):
    raise SystemExit(0)

def test_exit(attnprec_audit):
    attnprec_audit(exits, "softmax", dtype=torch.float16, precision="fp16",
                   families=["typical"], sizes=[(4, 2)])
"""
    )
    result = pytester.runpytest_subprocess("--attnprec-report", "r.json")
    data = json.loads((pytester.path / "r.json").read_text(encoding="utf-8"))
    assert result.ret != 0 and data["ok"] is False
    assert data["verdict"] == "VIOLATED" and "SystemExit" in data["failures"][0]["error"]


# --------------------------------------------------------------------------------------------
# docs/ci.md


def test_the_docs_example_runs_as_shown(pytester, monkeypatch):
    import torch

    if importlib.util.find_spec("triton") is None:
        pytest.skip("the example kernel needs triton")
    # As the workflow does on the CPU.
    if not torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytester.makepyfile(
        my_kernels=doc_block("ci-example-kernel"),
        test_attention_bounds=doc_block("ci-example-test"),
    )
    # The documented command, with fewer examples than `ci` (the rest of its settings).
    pytester.makeconftest(
        "from hypothesis import settings\n"
        "from attnprec.testing.plugin import profile_name, register_profiles\n"
        "register_profiles()\n"
        "settings.register_profile(\n"
        "    'docs-smoke', parent=settings.get_profile(profile_name('ci')), max_examples=20\n"
        ")\n"
    )
    args = ("--attnprec-profile", "ci", "--attnprec-report", "attnprec.json")
    # In a process of its own, as a user runs it (and Triton's extension is loaded there).
    result = pytester.runpytest_subprocess(*args, "--hypothesis-profile", "docs-smoke")
    result.assert_outcomes(passed=2)
    data = json.loads((pytester.path / "attnprec.json").read_text(encoding="utf-8"))
    assert data["ok"] and data["exit_status"] == 0 and data["profile"] == "ci"
    assert len(data["cases"]) == 6 * 3  # every family, three sizes
    assert {t["outcome"] for t in data["tests"]} == {"passed"}


def test_the_docs_workflow_runs_the_documented_command():
    yaml = pytest.importorskip("yaml")
    text = DOC.read_text(encoding="utf-8")
    m = re.search(r"```\{code-block\} yaml\n(?::[a-z]+: [^\n]*\n)*\n(.*?)```", text, re.S)
    assert m, "docs/ci.md: the workflow block is missing"
    workflow = yaml.safe_load(m.group(1))
    jobs = workflow["jobs"]
    assert set(jobs) == {"cpu", "gpu"}
    assert jobs["cpu"]["env"]["TRITON_INTERPRET"] == "1"
    for name, job in jobs.items():
        runs = "\n".join(step.get("run", "") for step in job["steps"])
        assert "pytest --attnprec-profile ci --attnprec-report attnprec" in runs, name
        upload = [
            s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact")
        ]
        assert upload and upload[0]["if"] == "always()", name
    cpu_install = "\n".join(step.get("run", "") for step in jobs["cpu"]["steps"])
    assert "--index-url https://download.pytorch.org/whl/cpu" in cpu_install
    assert "pytest --attnprec-profile ci --attnprec-report attnprec.json" in text


ASSERTED = """
import pytest
import torch
from attnprec.testing import BoundViolation, assert_within_bound
from attnprec.attention import softmax_attention

def twice(q, k, v, **kw):
    return 2 * softmax_attention(q, k, v, **kw)

def inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 4, generator=g) for _ in range(3)]

def test_asserted():
    assert_within_bound(twice, "softmax", *inputs())

def test_expected():
    with pytest.raises(BoundViolation):
        assert_within_bound(twice, "softmax", *inputs())
"""


def test_a_test_failed_by_an_assertion_counts_in_the_report(pytester):
    """A BoundViolation raised outside the fixture failed the session while the report said
    ``verdict: ok`` (a review): its audit is now in the report. A violation the test
    expects (``pytest.raises``) passes the test and stays out of it."""
    pytester.makepyfile(test_asserted=ASSERTED)
    result = pytester.runpytest("--attnprec-report", "attnprec.json", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    data = json.loads((pytester.path / "attnprec.json").read_text(encoding="utf-8"))
    assert (data["ok"], data["verdict"], data["exit_status"]) == (False, "VIOLATED", 1)
    (case,) = data["cases"]
    assert case["test"].endswith("::test_asserted") and case["counts"]["violated"] > 0
    tests = {t["nodeid"].split("::")[1]: (t["outcome"], t["verdict"]) for t in data["tests"]}
    assert tests == {"test_asserted": ("failed", "VIOLATED"), "test_expected": ("passed", None)}


GQA = """
import pytest
import torch


def _attend(q, k, v, causal, tile):
    # [B, T, H, D] queries, [B, T, H_kv, D] keys and values
    g = q.shape[2] // k.shape[2]
    k, v = ((x.repeat(1, 1, g, 1) if tile else x.repeat_interleave(g, 2)) for x in (k, v))
    qh, kh, vh = (x.transpose(1, 2).float() for x in (q, k, v))
    s = qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return (torch.softmax(s, -1) @ vh).transpose(1, 2).to(q.dtype)


def gqa(q, k, v, causal=False):
    assert q.is_contiguous() and k.shape[2] == 2 and q.shape[2] == 4
    return _attend(q, k, v, causal, tile=False)


def gqa_tiled(q, k, v, causal=False):  # K/V heads tiled, not grouped: wrong head mapping
    return _attend(q, k, v, causal, tile=True)


OPTS = dict(precision="fp16", sizes=[(8, 4)], families=["typical"], causal=(False, True),
            layout="bthd", kv_heads=2, batch=(1, 4))


def test_grouped_heads_in_flash_layout(attnprec_audit):
    report = attnprec_audit(gqa, "softmax", **OPTS)
    assert report.ok and len(report.cases) == 2


def test_tiled_heads_fail(attnprec_audit):
    attnprec_audit(gqa_tiled, "softmax", **OPTS)


def test_bad_layout_options_name_themselves(attnprec_audit):
    with pytest.raises(ValueError, match="^layout"):
        attnprec_audit(gqa, "softmax", **{**OPTS, "layout": "bshd"})
    with pytest.raises(ValueError, match="^kv_heads"):
        attnprec_audit(gqa, "softmax", **{**OPTS, "kv_heads": 3})
    with pytest.raises(ValueError, match="^batch"):
        attnprec_audit(gqa, "softmax", **{**OPTS, "batch": (4,)})
"""


def test_the_fixture_takes_flash_layout_and_grouped_heads(pytester):
    """A review: the fixture audited ``[..., T, D]`` kernels only; a flash-layout GQA kernel
    needed an adapter of its own. ``layout=`` and ``kv_heads=`` give it its tensors; the
    wrong head mapping (tiling instead of grouping) fails, naming its element in both
    layouts."""
    pytester.makepyfile(GQA)
    result = pytester.runpytest()
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_tiled_heads_fail*", "E*BoundViolation: gqa_tiled*"])
    # the failing element in the kernel's own layout too (a review read attnprec's
    # [B, H, T, D] index as the kernel's [B, T, H, D] one)
    result.stdout.fnmatch_lines(["E*at index (*) (the kernel's [[]B, T, H, D[]] index (*"])


def test_a_signed_zero_written_into_a_flash_layout_input_is_seen():
    """The layout adapter copies a kernel's writes into its inputs back for the audit, which
    compares bits; the adapter compared values, so a -0.0 written over 0.0 in ``bthd``
    passed as ok while ``...td`` flagged it (a review)."""
    import torch

    from attnprec.analysis.audit import audit
    from attnprec.attention import softmax_attention
    from attnprec.testing.plugin import _in_layout

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=g) for _ in range(3))
    v[0, 0, 0, 0] = 0.0

    def flip(q, k, v, **kw):  # [B, T, H, D]
        v[0, 0, 0, 0] = -0.0
        return softmax_attention(*(x.transpose(1, 2) for x in (q, k, v)), **kw).transpose(1, 2)

    rep = audit(_in_layout(flip, "bthd", None), "softmax", q, k, v, precision="fp32")
    assert not rep.ok and rep.cases[0].mutated == ["v"], rep.cases[0].describe()
