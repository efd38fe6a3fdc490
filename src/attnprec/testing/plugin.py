"""pytest plugin: attnprec audits, Hypothesis profiles and a JSON report in a project's CI.

Installed with attnprec (entry point ``pytest11``, name ``attnprec``; disable it with
``-p no:attnprec``). It adds

``--attnprec-profile {ci,thorough}``
    Load a Hypothesis profile for the property tests: ``ci`` is derandomized (a red run
    reproduces) with 200 examples per property, ``thorough`` draws 10,000 random ones; both
    without a per-example deadline (kernels compile). Without the option the plugin leaves
    Hypothesis's settings alone (whatever profile the project loads stays loaded).
``--attnprec-report PATH``
    Write a JSON report at the end of the session: every audit made through the
    ``attnprec_audit`` fixture, and the audit of every test that a
    :class:`~attnprec.testing.BoundViolation` failed (``assert_within_bound``,
    ``assert_attention_close``), merged (the keys of
    :meth:`attnprec.analysis.report.AuditReport.to_json`, each case tagged with its test),
    the exit status (the audit verdict's, else pytest's: never 0, nor ``ok`` true, for an
    interrupted or failing session), and the outcome of every test that ran (from its call;
    ``incomplete`` when it never got there).
the ``attnprec_audit`` fixture
    Returns :class:`KernelAuditor`: ``attnprec_audit(fn, method, dtype=..., precision=...)``
    audits ``fn`` on every input family (:func:`attnprec.testing.make_inputs`, fixed seeds)
    and raises :class:`~attnprec.testing.BoundViolation` (an ``AssertionError``) when a case
    fails.
the ``attnprec`` marker
    ``@pytest.mark.attnprec(method, dtype=..., precision=..., ...)`` gives the fixture its
    defaults (any keyword of :meth:`KernelAuditor.__call__`, and method parameters).

The plugin is loaded by every pytest run where attnprec is installed, so it imports
nothing heavy at import time: torch, Hypothesis and :mod:`attnprec.analysis` are imported
inside the hooks and the fixture that need them.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from attnprec.analysis.report import AuditReport

__all__ = [
    "DEFAULT_SIZES",
    "PROFILES",
    "KernelAuditor",
    "profile_name",
    "register_profiles",
]

#: Hypothesis settings per ``--attnprec-profile`` choice (the same counts as attnprec's own
#: test suite); both also get ``deadline=None`` and suppress the ``too_slow`` health check.
#: Every setting that makes the choice is explicit: a profile registered without one would
#: inherit it from whatever profile the project had loaded.
PROFILES: dict[str, dict[str, Any]] = {
    # Derandomized so a red run reproduces; >= 200 examples per property.
    "ci": {"max_examples": 200, "derandomize": True, "print_blob": True},
    # 50x the CI examples, random (print_blob: a failure prints how to replay it).
    "thorough": {"max_examples": 10_000, "derandomize": False, "print_blob": True},
}

#: ``sizes`` of :meth:`KernelAuditor.__call__` when neither the call nor the marker gives
#: them: ``(n, d)`` means ``n_q = n_k = n`` and ``d_k = d_v = d``.
DEFAULT_SIZES: tuple[tuple[int, ...], ...] = ((1, 1), (5, 3), (16, 8))

#: Keywords of :meth:`KernelAuditor.__call__` that the ``attnprec`` marker may set; its other
#: keywords are method parameters.
_OPTIONS = (
    "method",
    "dtype",
    "precision",
    "families",
    "sizes",
    "causal",
    "batch",
    "seed",
    "bound_options",
    "allow_unbounded",
    "allow_atypical",
    "kernel",
    "layout",
    "kv_heads",
)
#: Failing cases described in full in a fixture's assertion message; the rest in one line.
_DESCRIBED = 4


def profile_name(choice: str) -> str:
    """The Hypothesis profile registered for an ``--attnprec-profile`` choice.

    The profiles are namespaced (``attnprec-ci``), so a project's own ``ci`` profile is
    never replaced.
    """
    return f"attnprec-{choice}"


def register_profiles() -> None:
    """Register :data:`PROFILES` with Hypothesis (as :func:`profile_name` names them)."""
    from hypothesis import HealthCheck, settings

    common: dict[str, Any] = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
    for choice, values in PROFILES.items():
        settings.register_profile(profile_name(choice), **{**common, **values})


# --------------------------------------------------------------------------------------------
# Options, configuration, header


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("attnprec", "attnprec: audits of attention kernels")
    group.addoption(
        "--attnprec-profile",
        choices=tuple(PROFILES),
        default=None,
        help="load a Hypothesis profile for the property tests: ci (derandomized, "
        f"{PROFILES['ci']['max_examples']} examples) or thorough "
        f"({PROFILES['thorough']['max_examples']} random examples); without it, Hypothesis's "
        "settings are left as the project loads them",
    )
    group.addoption(
        "--attnprec-report",
        metavar="PATH",
        default=None,
        help="write a JSON report at the end of the session: every audit made through the "
        "attnprec_audit fixture, merged, and the outcome of every test",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # First, so that Hypothesis's own options apply after it: --hypothesis-verbosity and
    # --hypothesis-seed on top of the profile loaded here, --hypothesis-profile instead of it.
    config.addinivalue_line(
        "markers",
        "attnprec(method=None, *, dtype=None, precision=None, families=None, sizes=None, "
        "causal=None, ...): defaults for the attnprec_audit fixture (other keywords are "
        "method parameters)",
    )
    choice = config.getoption("attnprec_profile")
    if choice:
        try:
            from hypothesis import settings
        except ImportError:
            raise pytest.UsageError(
                "--attnprec-profile: needs Hypothesis (pip install hypothesis)"
            ) from None
        register_profiles()
        settings.load_profile(profile_name(choice))
    path = config.getoption("attnprec_report")
    if path:
        # Resolved now (as --junitxml is), so a test that changes directory cannot move it.
        path = os.path.normpath(os.path.abspath(path))
        if not os.path.isdir(os.path.dirname(path)):
            raise pytest.UsageError(f"--attnprec-report: the directory of {path!r} does not exist")
    recorder = _Recorder(config, path)
    config.stash[_RECORDER] = recorder
    config.pluginmanager.register(recorder, "attnprec-recorder")


def pytest_unconfigure(config: pytest.Config) -> None:
    recorder = config.stash.get(_RECORDER, None)
    if recorder is not None:
        config.pluginmanager.unregister(recorder)


def pytest_report_header(config: pytest.Config) -> list[str]:
    choice = config.getoption("attnprec_profile")
    path = config.getoption("attnprec_report")
    if not choice and not path:
        return []
    parts = []
    if choice:
        parts.append(f"hypothesis profile {profile_name(choice)!r}")
    if path:
        parts.append(f"report -> {path}")
    return ["attnprec: " + ", ".join(parts)]


# --------------------------------------------------------------------------------------------
# The session's record: audits and test outcomes


class _Recorder:
    """What the session saw: each audit (the test's node id and ``to_json``'s content), and
    each test's outcome. One per configuration, registered as a plugin for its hooks; under
    pytest-xdist the controller receives the workers' test reports as they come, and their
    audits when they finish."""

    def __init__(self, config: pytest.Config, path: str | None = None) -> None:
        self.config = config
        self.path = path
        self.audits: list[dict[str, Any]] = []
        self.tests: dict[str, dict[str, Any]] = {}
        self.session: pytest.Session | None = None

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.session = session

    def final(self, exitstatus: int) -> dict[str, Any]:
        """:meth:`merged` for the session's end: partial where it was interrupted, or
        stopped (``-x``, ``--maxfail``) before every collected test ran; the terminal line
        and the JSON report both say this."""
        session = self.session
        ran = sum(entry["outcome"] != "incomplete" for entry in self.tests.values())
        stopped = session is not None and bool(session.shouldstop or session.shouldfail)
        collected = 0 if session is None else session.testscollected
        partial = exitstatus == pytest.ExitCode.INTERRUPTED or (stopped and ran < collected)
        return self.merged(partial=partial, pytest_exit_status=int(exitstatus))

    def add_audit(self, nodeid: str, report: AuditReport) -> None:
        self.audits.append({"test": nodeid, "report": json.loads(report.to_json())})

    def add_failure(self, nodeid: str, failure: dict[str, str]) -> None:
        content = {"ok": False, "verdict": "VIOLATED", "partial": False, "counts": {}}
        content |= {"violations": 0, "cases": [], "failures": [failure]}
        self.audits.append({"test": nodeid, "report": content})

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        """A test failed by :class:`~attnprec.testing.BoundViolation` (an assertion outside
        the fixture) adds its audit: the report said ``verdict: ok`` for a session that
        such an assertion failed (a review)."""
        report = yield
        mod = sys.modules.get("attnprec.testing.assertions")  # (never imported: none raised)
        if mod is None or call.when != "call" or not report.failed or call.excinfo is None:
            return report
        err = call.excinfo.value
        group = getattr(err, "exceptions", None)  # (an exception group: Hypothesis's several)
        for e in group if isinstance(group, tuple) else (err,):
            if isinstance(e, mod.BoundViolation) and not e.recorded:
                self.add_audit(item.nodeid, e.report)
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # "incomplete" until a call report says otherwise: a test interrupted (or stopped)
        # after its setup never passed.
        entry = self.tests.setdefault(report.nodeid, {"outcome": "incomplete", "duration": 0.0})
        entry["duration"] += float(getattr(report, "duration", 0.0) or 0.0)
        xfail = hasattr(report, "wasxfail")
        if report.when == "setup" and not report.passed:
            entry["outcome"] = "error" if report.failed else ("xfailed" if xfail else "skipped")
        elif report.when == "call":
            if report.passed:
                entry["outcome"] = "xpassed" if xfail else "passed"
            elif report.failed:
                entry["outcome"] = "failed"
            else:
                entry["outcome"] = "xfailed" if xfail else "skipped"
        elif report.when == "teardown" and report.failed and entry["outcome"] != "failed":
            entry["outcome"] = "error"

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """pytest-xdist, on the controller: take the audits a worker made."""
        output = getattr(node, "workeroutput", None) or {}
        text = output.get("attnprec_audits")
        if text:
            self.audits.extend(json.loads(text))

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        config = self.config
        if _is_worker(config):
            config.workeroutput["attnprec_audits"] = json.dumps(self.audits)  # type: ignore[attr-defined]
            return
        path = self.path
        if not path:
            return
        content = self.final(exitstatus)
        content["profile"] = config.getoption("attnprec_profile")
        text = json.dumps(content, indent=1, default=str, allow_nan=False)
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError as e:
            raise pytest.UsageError(
                f"--attnprec-report: cannot write {path!r}: {e.strerror or e}"
            ) from None

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int) -> None:
        path = self.path
        if not self.audits and not path:
            return
        content = self.final(exitstatus)
        counts = ", ".join(f"{n} {cls}" for cls, n in content["counts"].items())
        tests = len({a["test"] for a in self.audits})
        line = (
            f"attnprec: {len(content['cases'])} cases audited in {tests} "
            f"test{'' if tests == 1 else 's'}, "
            f"verdict {content['verdict']}; elements: {counts}"
        )
        if not content["ok"]:
            line += f"; not ok (exit status {content['exit_status']})"
        if path:
            line += f"; report written to {path}"
        terminalreporter.write_line(line)

    def merged(self, partial: bool = False, pytest_exit_status: int = 0) -> dict[str, Any]:
        """The audits merged as :class:`AuditReport` adds them, with the test outcomes.

        ``exit_status`` is the audit verdict's (:data:`~attnprec.analysis.report.EXIT_STATUS`;
        a ``partial`` run is ``PARTIAL`` at least, 130), else pytest's own; ``ok`` is True
        only when it is 0: every audit passed, the run was whole and pytest succeeded.
        """
        from attnprec.analysis.report import CLASSES, EXIT_STATUS, VERDICTS

        cases: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        counts = dict.fromkeys(CLASSES, 0)
        worst = 0
        per_test: dict[str, list[str]] = {}
        for audit in self.audits:
            rep, test = audit["report"], audit["test"]
            cases += [{**case, "test": test} for case in rep["cases"]]
            failures += [{**failure, "test": test} for failure in rep["failures"]]
            for cls, n in rep["counts"].items():
                counts[cls] = counts.get(cls, 0) + int(n)
            worst = max(worst, VERDICTS.index(rep["verdict"]))
            partial = partial or bool(rep["partial"])
            per_test.setdefault(test, []).append(rep["verdict"])
        if partial:
            worst = max(worst, VERDICTS.index("PARTIAL"))
        verdict = VERDICTS[worst]
        exit_status = EXIT_STATUS[verdict] or pytest_exit_status
        tests = []
        for nodeid, entry in self.tests.items():
            verdicts = per_test.get(nodeid, [])
            audit_verdict = max(verdicts, key=VERDICTS.index) if verdicts else None
            tests.append(
                {"nodeid": nodeid, **entry, "audits": len(verdicts), "verdict": audit_verdict}
            )
        outcomes: dict[str, int] = {}
        for t in tests:
            outcomes[t["outcome"]] = outcomes.get(t["outcome"], 0) + 1
        return {
            "ok": exit_status == 0,
            "verdict": verdict,
            "exit_status": exit_status,
            "partial": partial,
            "counts": counts,
            "violations": counts["violated"],
            "cases": cases,
            "failures": failures,
            "tests": tests,
            "outcomes": outcomes,
            "pytest_exit_status": pytest_exit_status,
        }


_RECORDER = pytest.StashKey[_Recorder]()


def _recorder(config: pytest.Config) -> _Recorder:
    return config.stash[_RECORDER]


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


# --------------------------------------------------------------------------------------------
# The fixture


class KernelAuditor:
    """Audit a kernel on every input family; what the ``attnprec_audit`` fixture returns.

    Call it as ``attnprec_audit(fn, method, dtype=..., precision=...)`` (see
    :meth:`__call__`). Each audit is added to the session's report (``--attnprec-report``).
    Defaults come from the test's ``@pytest.mark.attnprec(...)`` marker, if any.
    """

    def __init__(self, nodeid: str, recorder: _Recorder, defaults: Mapping[str, Any]) -> None:
        self.nodeid = nodeid
        self._recorder = recorder
        self._defaults = dict(defaults)
        #: Every report this auditor made in the test (one per input set).
        self.reports: list[AuditReport] = []

    def __call__(
        self,
        fn: Callable[..., Any],
        method: str | None = None,
        *,
        dtype: Any = None,
        precision: Any = None,
        families: Sequence[str] | None = None,
        sizes: Sequence[Sequence[int]] | None = None,
        causal: bool | Sequence[bool] | None = None,
        batch: Sequence[int] | None = None,
        seed: int | None = None,
        bound_options: Mapping[str, Any] | None = None,
        allow_unbounded: bool | None = None,
        allow_atypical: bool | None = None,
        kernel: str | None = None,
        layout: str | None = None,
        kv_heads: int | None = None,
        **params: Any,
    ) -> AuditReport:
        """Audit ``fn(q, k, v, **params)`` on every family and size; fail on a bad case.

        Every keyword left at ``None`` is taken from the test's ``attnprec`` marker, else
        from the default given here.

        Parameters
        ----------
        fn : callable
            The kernel, called as ``fn(q, k, v, **params)`` on CPU tensors (move them to its
            device and the output back, or not: the output may live on any device).
        method : str
            The method whose references and bounds apply (``"softmax"``, ``"log"``, ...).
        dtype : torch.dtype or format name, optional
            The inputs' dtype (default: the storage format of ``precision``).
        precision : Precision or format-like, optional
            Where ``fn`` stores, computes and accumulates (default: storage in ``dtype``,
            fp32 compute and accumulate); see :func:`attnprec.analysis.audit.audit`.
        families : sequence of str, optional
            Input families (default every one of :data:`attnprec.testing.FAMILIES`).
        sizes : sequence of tuples, optional
            ``(n, d)`` for ``n_q = n_k = n``, ``d_k = d_v = d``, or ``(n_q, n_k, d_k, d_v)``;
            default :data:`DEFAULT_SIZES`. The ``real`` family caps them at what was
            captured (128 tokens, 32 channels).
        causal : bool or sequence of bool, optional
            Audit the causal form (``causal=True`` is passed to ``fn``), the non-causal one
            (nothing is passed), or each of several (``(False, True)``); default False.
        batch : sequence of int, optional
            Leading batch dimensions of the inputs (default none).
        seed : int, optional
            Seed of every draw (default 0): the inputs are the same on every run.
        bound_options : mapping, optional
            ``target``, ``confidence``, ``block`` for the bound only.
        allow_unbounded, allow_atypical : bool, optional
            Accept elements with no finite bound, or beyond the probabilistic bound (as
            :func:`attnprec.analysis.audit.audit`); default False.
        kernel : str, optional
            Label of ``fn`` in the report (default its ``__name__``).
        layout : str, optional
            The axes ``fn`` takes and returns: ``"...td"`` (default: ``[*batch, T, D]``),
            ``"bhtd"`` or ``"bthd"`` (flash-attention's ``[B, T, H, D]``), the last two with
            ``batch=(B, H)``; ``fn`` gets contiguous tensors in that layout.
        kv_heads : int, optional
            Grouped-query attention: ``fn`` gets K/V of ``kv_heads`` heads (a divisor of
            ``H``), each shared by ``H / kv_heads`` consecutive query heads (as
            ``repeat_interleave`` expands them); with ``layout`` ``"bhtd"`` or ``"bthd"``.
        **params
            The method's keywords, passed to ``fn``, the references and the bound alike
            (the marker's other keywords come first). A tensor parameter whose shape
            follows the sequence length (``log_g``) needs one call per size; a required
            one left out (gated's ``log_g``, the selective scan's ``delta`` and ``A``,
            SSD's ``dt`` and ``A``) is drawn for each case as ``attnprec audit`` draws it
            (:func:`attnprec.testing.params.default_params`, seeded by ``seed``).

        Returns
        -------
        AuditReport
            Every case, when all pass.

        Raises
        ------
        BoundViolation
            An ``AssertionError`` describing each failing case (where, by how much, which
            part of the bound dominates there).
        ValueError, TypeError
            A bad argument (naming it); what ``fn`` raises propagates (the session's report
            records it as a failure).
        """
        __tracebackhide__ = True
        import torch

        from attnprec._validate import check_bool, check_int
        from attnprec.analysis.audit import AuditReport, audit
        from attnprec.analysis.precision import Format, Precision
        from attnprec.methods import method as method_record
        from attnprec.testing.assertions import BoundViolation, _path_of, _save, replay_line
        from attnprec.testing.inputs import FAMILIES, as_features, make_inputs
        from attnprec.testing.params import default_params
        from attnprec.testing.real import real_metadata

        given = {
            "method": method,
            "dtype": dtype,
            "precision": precision,
            "families": families,
            "sizes": sizes,
            "causal": causal,
            "batch": batch,
            "seed": seed,
            "bound_options": bound_options,
            "allow_unbounded": allow_unbounded,
            "allow_atypical": allow_atypical,
            "kernel": kernel,
            "layout": layout,
            "kv_heads": kv_heads,
        }
        opts = {key: val for key, val in self._defaults.items() if key in _OPTIONS}
        opts |= {key: val for key, val in given.items() if val is not None}
        params = {
            **{key: val for key, val in self._defaults.items() if key not in _OPTIONS},
            **params,
        }
        if not callable(fn):
            raise TypeError(f"fn: expected a callable kernel, got {fn!r}")
        method = opts.get("method")
        if not isinstance(method, str):
            raise TypeError(
                f"method: required (as an argument or in @pytest.mark.attnprec), got {method!r}"
            )
        if "causal" in params:
            raise TypeError("causal: give it as the causal= option, not a method parameter")
        precision = opts.get("precision")
        dtype = opts.get("dtype")
        if dtype is None:
            if precision is None:
                raise TypeError("dtype: required unless precision names the storage format")
            dtype = Precision.of(precision).storage
        if not isinstance(dtype, torch.dtype):
            fmt = Format.of(dtype)
            if fmt.torch_dtype is None:
                raise ValueError(f"dtype: {fmt.name} has no torch dtype to store inputs in")
            dtype = fmt.torch_dtype
        fams = tuple(opts.get("families") or FAMILIES)
        bad = [f for f in fams if f not in FAMILIES]
        if bad:
            raise ValueError(f"families: expected a subset of {FAMILIES}, got {bad}")
        forms = opts.get("causal", False)
        forms = (forms,) if isinstance(forms, bool) else tuple(forms)
        if not forms or any(not isinstance(c, bool) for c in forms):
            raise ValueError(f"causal: expected a bool or a sequence of bools, got {forms!r}")
        shapes = _shapes(opts.get("sizes", DEFAULT_SIZES))
        if True in forms:
            rect = [s for s in shapes if s[0] != s[1]]
            if rect:
                raise ValueError(f"sizes: causal audits need n_q == n_k, got {rect}")
        run_seed = check_int("seed", opts.get("seed", 0))
        lay, kv = _layout_option(opts.get("layout", "...td"), opts.get("kv_heads"), opts)
        run = _in_layout(fn, lay, kv)
        common = {
            "precision": precision,
            "kernel": opts.get("kernel") or getattr(fn, "__name__", type(fn).__name__),
            "bound_options": opts.get("bound_options"),
            "allow_unbounded": check_bool("allow_unbounded", opts.get("allow_unbounded", False)),
            "allow_atypical": check_bool("allow_atypical", opts.get("allow_atypical", False)),
        }
        # the required keywords left out, drawn per case as the command line draws them
        missing = [
            key.name
            for key in method_record(method).keywords
            if key.required and params.get(key.name) is None
        ]
        total, saved = AuditReport(), []
        for family in fams:
            for n_q, n_k, d_k, d_v in shapes:
                if family == "real":  # at most the captured activations' size
                    t, h = real_metadata()["tokens"], real_metadata()["d_head"]
                    n_q, n_k, d_k, d_v = min(n_q, t), min(n_k, t), min(d_k, h), min(d_v, h)
                for is_causal in forms:
                    g = torch.Generator().manual_seed(run_seed)
                    q, k, v = make_inputs(
                        family,
                        n_q=n_q,
                        n_k=n_k,
                        d_k=d_k,
                        d_v=d_v,
                        batch=tuple(opts.get("batch", ())),
                        dtype=dtype,
                        generator=g,
                    )
                    kw = {**params, "causal": True} if is_causal else dict(params)
                    if missing:
                        drawn = default_params(method, d_k, n_q, run_seed)
                        kw |= {key: drawn[key] for key in missing if key in drawn}
                    q, k = as_features(method, kw, q, k)
                    if kv is not None:  # each group of query heads shares its first K/V head
                        group = q.shape[1] // kv
                        k, v = (x[:, ::group].repeat_interleave(group, 1) for x in (k, v))
                    try:
                        report = audit(run, method, q, k, v, family=family, **common, **kw)
                    except (Exception, SystemExit) as e:  # (a kernel's exit: its case failed)
                        what = {
                            "kernel": str(common["kernel"]),
                            "method": method,
                            "dtype": str(dtype).removeprefix("torch."),
                            "family": family,
                            "shape": str((n_q, n_k, d_k, d_v)),
                            "error": f"{type(e).__name__}: {e}",
                        }
                        self._recorder.add_failure(self.nodeid, what)
                        raise
                    self._recorder.add_audit(self.nodeid, report)
                    self.reports.append(report)
                    total = total + report
                    if not report.ok:  # as the assertions do: the case, for attnprec replay
                        ql, kl, vl = _kernel_inputs(q, k, v, lay, kv)
                        saved.append(_save({
                            "method": method, "q": ql, "k": kl, "v": vl, "params": kw,
                            "precision": precision, "bound_options": common["bound_options"],
                            "flags": {f: common[f] for f in ("allow_unbounded", "allow_atypical")},
                            "kernel": _path_of(fn), "layout": lay, "cu_seqlens": None,
                            "rows": None, "seed": 0,
                        }, fn))  # fmt: skip
        failing = [c for c in total.cases if c.verdict != "ok"]
        if failing:
            text = _message(str(common["kernel"]), method, total, failing, lay)
            text += "".join(f"\n  replay: {replay_line(p, _path_of(fn))}" for p in saved)
            err = BoundViolation(text, total)
            err.recorded = True  # (its audits are in the report already)
            raise err
        return total


def _layout_option(layout: object, kv_heads: object, opts: Mapping[str, Any]) -> tuple[str, Any]:
    """``layout`` and ``kv_heads`` checked against ``batch`` (the errors name them)."""
    from attnprec._validate import check_int

    if layout not in ("...td", "bhtd", "bthd"):
        raise ValueError(f"layout: expected '...td', 'bhtd' or 'bthd', got {layout!r}")
    b = tuple(opts.get("batch", ()))
    if layout != "...td" and len(b) != 2:
        raise ValueError(f"batch: layout {layout!r} needs batch=(B, H), got {b}")
    if kv_heads is None:
        return str(layout), None
    kv = check_int("kv_heads", kv_heads, 1)
    if layout == "...td" or b[1] % kv:
        raise ValueError(
            f"kv_heads: expected a divisor of the heads H of batch=(B, H) with layout 'bhtd' "
            f"or 'bthd', got {kv_heads!r} (layout {layout!r}, batch {b})"
        )
    return str(layout), kv


def _kernel_inputs(q: Any, k: Any, v: Any, layout: str, kv_heads: int | None) -> tuple:
    """``[B, H, T, D]`` inputs (K/V expanded to H heads) as ``fn`` takes them: K/V's
    ``kv_heads`` heads, in ``layout`` (views)."""
    if kv_heads is not None:
        group = q.shape[1] // kv_heads
        k, v = k[:, ::group], v[:, ::group]
    if layout == "bthd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    return q, k, v


def _in_layout(fn: Callable[..., Any], layout: str, kv_heads: int | None) -> Callable[..., Any]:
    """``fn`` as the audit calls it (``[B, H, T, D]``, K/V of H heads): its inputs in its
    layout, contiguous (what it writes into them is written back, for the audit to see),
    its output back in attnprec's order."""
    import torch

    from attnprec.analysis.audit import _bit_view

    if layout == "...td" or (layout == "bhtd" and kv_heads is None):
        return fn

    def run(q: Any, k: Any, v: Any, **kw: Any) -> Any:
        views = _kernel_inputs(q, k, v, layout, kv_heads)
        held = [x.contiguous().clone() for x in views]
        out = fn(*held, **kw)
        for view, x in zip(views, held, strict=True):
            # bitwise, as the audit compares: a -0.0 written over 0.0 is a write (a review)
            if not torch.equal(_bit_view(view), _bit_view(x)):
                view.copy_(x)
        return out.transpose(1, 2) if layout == "bthd" else out

    run.__name__ = getattr(fn, "__name__", type(fn).__name__)
    return run


def _shapes(sizes: Iterable[Sequence[int]]) -> list[tuple[int, int, int, int]]:
    shapes = []
    for size in sizes:
        s = tuple(size)
        if len(s) not in (2, 4) or any(isinstance(x, bool) or not isinstance(x, int) for x in s):
            raise ValueError(f"sizes: expected (n, d) or (n_q, n_k, d_k, d_v) tuples, got {size!r}")
        if any(x < 1 for x in s):
            raise ValueError(f"sizes: expected positive sizes, got {size!r}")
        shapes.append((s[0], s[0], s[1], s[1]) if len(s) == 2 else (s[0], s[1], s[2], s[3]))
    if not shapes:
        raise ValueError("sizes: expected at least one size")
    return shapes


def _message(kernel: str, method: str, total: AuditReport, failing: list[Any], layout: str) -> str:
    # (a review read a [B, T, H, D] kernel's failing element at the index given in
    # attnprec's order as another head's)
    order = "[..., T, D]" if layout == "...td" else "[B, H, T, D]"
    yours = "" if layout in ("...td", "bhtd") else ", the kernel's [B, T, H, D] ones beside"
    lines = [
        f"{kernel} ({method}): {len(failing)} of {len(total.cases)} audited cases not within "
        f"the bound, verdict {total.verdict} (indices in attnprec's {order} order{yours})"
    ]
    lines += [case.describe(layout) for case in failing[:_DESCRIBED]]
    for case in failing[_DESCRIBED:]:
        lines.append(
            f"{case.kernel} ({case.family}, n_q={case.shape[0]}, n_k={case.shape[1]}, "
            f"d_k={case.shape[2]}, d_v={case.shape[3]}): {case.verdict}, "
            f"{case.violations} of {case.elements} elements violated"
        )
    return "\n".join(lines)


@pytest.fixture
def attnprec_audit(request: pytest.FixtureRequest) -> KernelAuditor:
    """Audit a kernel on every input family: ``attnprec_audit(fn, method, dtype=...,
    precision=...)`` (see :class:`attnprec.testing.plugin.KernelAuditor`). Fails the test
    with the failing cases described; every audit goes into ``--attnprec-report``."""
    defaults: dict[str, Any] = {}
    # Closest marker last, so it wins (a function's marker over its class's or module's).
    for marker in reversed(list(request.node.iter_markers("attnprec"))):
        if len(marker.args) > 1:
            raise TypeError("@pytest.mark.attnprec: takes at most one positional (the method)")
        if marker.args:
            defaults["method"] = marker.args[0]
        defaults.update(marker.kwargs)
    return KernelAuditor(request.node.nodeid, _recorder(request.config), defaults)
