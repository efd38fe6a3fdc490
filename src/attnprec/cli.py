"""The ``attnprec`` command: audit kernels against their bounds, evaluate bounds, list
formats and methods, replay a saved failing case.

``attnprec audit`` audits every built-in kernel on every input family (or ``--kernel
module:function`` of yours); its exit status says what it found
(:data:`attnprec.analysis.report.EXIT_STATUS`: 0 ok, 1 violated, a case that could not be
audited or a fingerprint meeting no declaration, 3 unbounded, 4 undecided, 5 atypical; 2 bad
arguments; 130 interrupted, verdict PARTIAL when nothing worse was found).
``attnprec bound taylor|favor|rounding`` evaluates the a-priori bounds; ``attnprec formats``
prints the unit roundoff table and ``attnprec methods`` the method table. The parser is
built without importing torch, so ``--help``, ``formats`` and ``methods`` answer at once.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from attnprec._formats import FORMAT_SPECS, format_row
from attnprec.methods import FAMILIES, METHODS, NAMES, SCALED_FAMILIES
from attnprec.targets import NAMES as TORCH_TARGETS

__all__ = ["main", "build_parser", "UsageError"]

_DTYPES = ("fp16", "bf16", "fp32", "e4m3", "e5m2")
_FP8 = ("e4m3", "e5m2")
#: The built-in kernel of FP8 storage (softmax by the FP8 recipe, :mod:`attnprec.fp8`).
_FP8_KERNEL = ("fp8.fp8_softmax_attention", "attnprec.fp8:fp8_softmax_attention", "softmax")


class UsageError(ValueError):
    """A bad command-line argument: reported by argparse (exit status 2), naming the option."""


# --------------------------------------------------------------------------------------------
# attnprec audit


def _given_only_where_read(args: argparse.Namespace) -> None:
    """Refuse an option the run would not read (a review: --compute, --block, --sums, ...
    without --kernel, --fp8-scale without FP8 storage, --gates on another method, each
    accepted and silently ignored)."""
    declared = {
        "--compute": args.compute != "fp32",
        "--accumulate": args.accumulate != "fp32",
        "--block": args.block is not None,
        "--constants": args.constants != "any",
        "--block-sums": args.block_sums != "any",
        "--elementary": args.elementary != "default",
        "--sums": args.sums is not None,
        "--merges": args.merges is not None,
        "--merge-format": args.merge_format is not None,
        "--passes": args.passes != 1,
    }
    given = [flag for flag, g in declared.items() if g]
    if given and (args.kernel is None or args.kernel.startswith("torch:")):
        who = "the built-in kernels" if args.kernel is None else args.kernel
        raise UsageError(
            f"{given[0]}: declares a kernel of yours (--kernel MODULE:FUNCTION); {who} "
            "audit under their own declaration"
        )
    fp8 = any(dt in _FP8 for dt in args.dtype or [])
    if not fp8:
        for flag, g in (
            ("--fp8-scale", args.fp8_scale != "tensor"),
            ("--fp8-block", args.fp8_block is not None),
            ("--family", "overrange" in (args.family or [])),
        ):
            if g:
                raise UsageError(f"{flag}: for FP8 storage (--dtype e4m3 or e5m2)")
    elif args.fp8_block is not None and args.fp8_scale == "tensor":  # (it was ignored)
        raise UsageError("--fp8-block: the rows per scale of --fp8-scale block")
    if args.gates is not None and args.method not in (None, "gated"):
        raise UsageError(f"--gates: the log-gates of gated attention, not {args.method}")


def _jobs(args: argparse.Namespace) -> list[Any]:
    """The audit's cases: kernels x storage formats x families (kernel selection)."""
    from attnprec.runner import Job, _device, builtin_kernels, load_function

    _given_only_where_read(args)
    if args.kernel is not None:
        if args.method is None:
            raise UsageError("--method: required with --kernel")
        _device()  # (Triton's interpreter chosen before the user's module imports triton)
        try:
            load_function(args.kernel)
        except (ValueError, RuntimeError) as e:  # RuntimeError: a torch backend not here
            raise UsageError(f"--kernel: {str(e).removeprefix('kernel: ')}") from None
        kernels = [(args.kernel, args.kernel, args.method)]
        precision: dict[str, Any] | None = {
            "compute": None if args.compute == "storage" else args.compute,
            "accumulate": None if args.accumulate == "storage" else args.accumulate,
            "block": args.block,
            "elementary": args.elementary,
            "sums": args.sums,
            "block_sums": args.block_sums,
            "merges": args.merges,
            "merge_format": args.merge_format,
            "constants": args.constants,
            "passes": args.passes,
        }
        if args.block_sums == "separate" and (args.block is None or args.block >= 2**62):
            raise UsageError("--block-sums: separate needs --block N (keys per block)")
        if args.merges is not None and METHODS[args.method].rounding != "softmax":
            raise UsageError(
                f"--merges: split states merge in softmax and the semirings, not {args.method}"
            )
        if args.passes == 2 and METHODS[args.method].rounding != "softmax":
            raise UsageError(
                f"--passes: two-pass normalization is softmax's and the semirings', not "
                f"{args.method}"
            )
        if args.passes == 2 and args.merges is not None:
            raise UsageError("--passes: 2 normalizes once; --merges describes split-KV")
        if args.merge_format is not None and args.merges is None:
            raise UsageError("--merge-format: the format of merged split states needs --merges")
        if args.merges is not None and args.sums == "linear":
            raise UsageError(
                "--merges: split states merge through their lse; not with --sums linear"
            )
        if args.evaluation == "state" and args.sums != "linear":
            raise UsageError(
                "--evaluation: state needs partial sums held as values (add --sums linear)"
            )
        if args.kernel.startswith("torch:"):
            if args.method != "softmax":
                raise UsageError(f"--method: {args.kernel} computes softmax, not {args.method}")
            precision = None  # a PyTorch target audits under its own declaration
    else:
        kernels = builtin_kernels(args.method)
        dtypes = args.dtype or []
        if any(dt in _FP8 for dt in dtypes) and args.method not in (None, "softmax"):
            raise UsageError(f"--dtype: FP8 storage is modelled for softmax, not {args.method}")
        if not kernels and not any(dt in _FP8 for dt in dtypes):
            raise UsageError(
                f"--method: no built-in kernel computes {args.method!r} (audit your own with "
                "--kernel MODULE:FUNCTION)"
            )
        precision = None
    params = _user_params(args)
    audit_kw: dict[str, Any] = {
        "allow_unbounded": args.allow_unbounded,
        "allow_atypical": args.allow_atypical,
        "infer_precision": args.infer_precision,
    }
    if args.infer_precision:  # (the fingerprint runs every row, in one job: say so)
        for flag, given in (("--rows", args.rows is not None), ("--shards", args.shards > 1)):
            if given:
                raise UsageError(f"{flag}: not with --infer-precision (it judges every row)")
    if args.rows is not None:  # (drawn with the run's seed)
        audit_kw["rows"], audit_kw["seed"] = args.rows, args.seed
    bound_options: dict[str, Any] = {}
    if args.confidence is not None:
        bound_options["confidence"] = args.confidence
    if args.stabilizer != "exponent":
        if args.method not in ("favor", "semiring"):
            raise UsageError("--stabilizer: a shift of FAVOR+'s random features (favor, semiring)")
        bound_options["stabilizer"] = args.stabilizer
    if args.evaluation != "pairs":
        for _, _, name in kernels:
            if args.evaluation not in METHODS[name].evaluations:
                raise UsageError(f"--evaluation: {name} has no {args.evaluation} evaluation")
        bound_options["evaluation"] = args.evaluation
    if bound_options:
        audit_kw["bound_options"] = bound_options
    options: dict[str, Any] = {"positive_values": args.positive_values, "gates": args.gates}
    if any(dt in _FP8 for dt in args.dtype or []):
        if args.kernel is not None and args.kernel.startswith("torch:"):
            raise UsageError(f"--dtype: {args.kernel} takes fp16, bf16 or fp32")
        options["fp8_scale"] = "tensor" if args.fp8_scale == "tensor" else args.fp8_block or 64
    jobs = []
    if args.kernel is None and any(dt in _FP8 for dt in args.dtype or []):
        kernels = [*kernels, _FP8_KERNEL]
    for label, path, method in kernels:
        rec = METHODS[method]
        for dt in args.dtype or ["fp16", "bf16"]:
            fp8 = dt in _FP8
            if args.kernel is None and fp8 != (path == _FP8_KERNEL[1]):
                continue  # FP8 storage runs the FP8 kernel, the others the Triton kernels
            families = args.family or [*rec.families, *(SCALED_FAMILIES if fp8 else ())]
            for fam in families:
                jobs.append(
                    Job(path, label, method, dt, fam, args.n, args.d, args.seed, params,
                        precision, options, audit_kw)
                )  # fmt: skip
    return jobs


def _user_params(args: argparse.Namespace) -> dict[str, Any]:
    """The method keywords given on the command line (each checked against the method)."""
    given = {
        "degree": args.degree,
        "coeffs": args.coeffs,
        "semiring": args.semiring,
        "scale": args.scale,
    }
    params = {key: val for key, val in given.items() if val is not None}
    if args.num_features is not None:
        params["num_features"] = args.num_features
    if args.causal:
        params["causal"] = True
    if args.method is None:
        extra = sorted(set(params) - {"causal"})
        if extra:
            raise UsageError(f"--{extra[0].replace('_', '-')}: needs --method")
        return params
    rec = METHODS[args.method]
    for key in params:
        if key not in rec.keyword_names:
            raise UsageError(
                f"--{key.replace('_', '-')}: not a keyword of --method {args.method} "
                f"(its keywords: {', '.join(k.name for k in rec.keywords) or 'none'})"
            )
    if "num_features" in params:
        import torch

        from attnprec.attention.favor import favor_projection

        g = torch.Generator().manual_seed(args.seed)
        params["projection"] = favor_projection(params.pop("num_features"), args.d, generator=g)
    return params


def _cmd_audit(args: argparse.Namespace) -> int:
    import signal

    main = _on_main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    early: list[int] = []  # a Ctrl-C at start-up, kept for after the imports
    if main:  # (raised inside an import it left torch half-loaded, or a library's bare
        # except swallowed it and the run went on to "ok": a review)
        signal.signal(signal.SIGINT, lambda signum, frame: early.append(signum))
    ctrl_c = False  # a Ctrl-C came: SIGINT stays ignored until the command ends
    try:
        import torch  # noqa: F401

        import attnprec.analysis.report  # noqa: F401
        from attnprec.runner import nothing_ran, run_jobs

        jobs = _jobs(args)
        if main:
            signal.signal(signal.SIGINT, signal.SIG_IGN if early else _interrupt_once)
        try:
            if early:
                raise KeyboardInterrupt
            report, _ = run_jobs(
                jobs, workers=args.workers, dask=args.dask, progress=not args.quiet,
                shards=args.shards,
            )  # fmt: skip
        except KeyboardInterrupt:  # before its run loop (start-up): no case ran
            report = nothing_ran(jobs, args.shards)
        except ValueError as e:
            if str(e).startswith("dask: "):
                raise UsageError(f"--dask: {str(e).removeprefix('dask: ')}") from None
            raise
        if main:  # the report is written whole: a Ctrl-C now traced back from the plot
            ctrl_c = bool(early) or signal.getsignal(signal.SIGINT) is not _interrupt_once
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            # a Ctrl-C that a library swallowed (an import inside a case) still stopped
            # what it hit: the run is partial, never ok (a review: rc 0 and "ok")
            report.partial = report.partial or ctrl_c
        return _audit_output(args, report)
    finally:
        if main and not ctrl_c:
            signal.signal(signal.SIGINT, previous)


def _interrupt_once(signum: int, frame: Any) -> None:
    """Ctrl-C: stop the run; a second Ctrl-C must not cut short stopping the workers and
    writing the partial report, nor turn the exit status 130 into a death by SIGINT, so
    it is ignored from now on (the command ends)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _audit_output(args: argparse.Namespace, report: Any) -> int:
    """Print and write what ``attnprec audit`` found; its exit status."""
    from attnprec.analysis.report import CLASSES

    # the files first: a reader that closes stdout early (``| head``) stops the prints with
    # BrokenPipeError, and an earlier run's report must not survive that (a review: a
    # passing JSON left in place after a run of 12 violated cases); a file that cannot be
    # written is reported after the verdict is printed, not instead of it
    unwritten: list[str] = []
    if args.json:
        try:
            report.to_json(args.json)
        except (OSError, ValueError) as e:
            unwritten.append(f"--json: {str(e).removeprefix('path: ')}")
    if args.plot:
        try:
            report.plot(args.plot)
        except (ImportError, OSError, ValueError) as e:
            unwritten.append(f"--plot: {str(e).removeprefix('path: ')}")
    for p in report.fingerprints:
        print(f"{p['kernel']} ({p['method']}, {p['dtype']}, {p['family']}):")
        print(p["fingerprint"].table())
    if report.cases:
        print(report.table())
    for case in report.cases:
        if case.verdict != "ok" or case.unbounded:  # (accepted: what was not checked, why)
            print(case.describe())
    for f in report.failures:
        print(f"ERROR {f['kernel']} ({f['method']}, {f['dtype']}, {f['family']}): {f['error']}")
    for m in report.not_run:
        shards = "" if m["shards"] == 1 else f": shards {m['missing_shards']} of {m['shards']}"
        print(f"NOT RUN {m['kernel']} ({m['method']}, {m['dtype']}, {m['family']}){shards}")
    for m in report.retried:
        print(
            f"RERUN {m['kernel']} ({m['method']}, {m['dtype']}, {m['family']}): a worker "
            "process died while it ran (a crash, or the out-of-memory killer); rerun alone"
        )
    import torch

    where = "cuda" if torch.cuda.is_available() else "cpu"
    if where == "cpu" and args.kernel is None:
        where += " (Triton interpreter)"  # the built-in kernels; a user's runs as written
    counts = ", ".join(f"{report.count(c)} {c}" for c in CLASSES)
    bad = sum(c.verdict != "ok" for c in report.cases)
    notes = []
    sampled = [c for c in report.cases if c.rows is not None and not c.partial]
    if sampled:
        which = ", ".join(dict.fromkeys(f"{c.sampled} rows" for c in sampled))
        notes.append(f"{len(sampled)} judged on sampled rows only ({which})")
    empty = sum(not c.elements for c in report.cases)
    if empty:
        notes.append(f"{empty} with no output element (nothing to judge)")
    real = sum(c.family == "real" for c in report.cases)
    if real:  # the runner's jobs take at most the captured activations' size
        from attnprec.testing.real import real_metadata

        meta = real_metadata()
        n, d = min(args.n, meta["tokens"]), min(args.d, meta["d_head"])
        if (n, d) != (args.n, args.d):
            notes.append(f"{real} of family real at its captured size n {n}, d {d}")
    if report.retried:
        notes.append(f"{len(report.retried)} rerun after a worker process died")
    if report.fingerprints:
        unmet = sum(p["fingerprint"].best is None for p in report.fingerprints)
        notes.append(
            f"{len(report.fingerprints)} fingerprinted (declarations inferred from two calls "
            f"on one input, not audited), {unmet} meeting no declaration"
        )
    if report.partial:
        notes.append(f"INTERRUPTED (partial): {len(report.not_run)} cases not run or not whole")
    print(
        f"{len(report.cases)} cases audited, {bad} not ok, {len(report.failures)} could not "
        f"be audited; elements: {counts}; verdict {report.verdict}"
        + "".join(f"; {n}" for n in notes)
        + f"; device {where}"
    )
    if unwritten:
        raise UsageError("; ".join(unwritten))
    return int(report.exit_status)


class _KernelRaised(Exception):
    """The audited function raised (not the command's arguments)."""


def _cmd_replay(args: argparse.Namespace) -> int:
    import functools

    from attnprec.runner import load_function
    from attnprec.testing.assertions import replay

    kernel = None
    if args.kernel is not None:
        try:
            fn = load_function(args.kernel)
        except (ValueError, RuntimeError) as e:
            raise UsageError(f"--kernel: {str(e).removeprefix('kernel: ')}") from None

        @functools.wraps(fn)
        def kernel(*a: Any, **kw: Any) -> Any:
            try:
                return fn(*a, **kw)
            except Exception as e:
                raise _KernelRaised(f"{type(e).__name__}: {e}") from e

    try:
        report = replay(args.file, kernel=kernel)
    except _KernelRaised as e:  # a failed case, as `attnprec audit` records one
        print(f"ERROR {args.kernel}: {e}")
        return 1
    except (OSError, ValueError) as e:
        raise UsageError(f"file: {str(e).removeprefix('path: ')}") from None
    print(report.table())
    for case in report.cases:
        if case.verdict != "ok" or case.unbounded:  # (accepted: what was not checked, why)
            print(case.describe())
    return report.exit_status


# --------------------------------------------------------------------------------------------
# attnprec bound ...


def _cmd_bound_taylor(args: argparse.Namespace) -> int:
    from attnprec.analysis.bounds import taylor as tb

    try:
        needed = tb.taylor_degree_needed(args.radius, args.tol, args.max_degree)
    except ValueError as e:  # no degree reaches the tolerance
        raise UsageError(str(e)) from None
    print(f"radius R = {args.radius:g} (|scale q.k| <= R), tol = {args.tol:g}")
    print(f"degree needed: {needed}")
    print(f"{'degree':>6}  {'weight error':>14}  {'output error':>14}")
    for p in range(needed + 1):
        w = tb.taylor_weight_bound(args.radius, p)
        o = tb.taylor_output_bound(args.radius, p)
        print(f"{p:>6}  {w:>14.6g}  {o:>14.6g}")
    print("weight error: sup |T_P(x) - e^x| / e^x over |x| <= R; output error: relative to")
    print("max_j |v_j - y_i| (taylor_output_bound), certified with interval arithmetic.")
    return 0


def _cmd_bound_favor(args: argparse.Namespace) -> int:
    from attnprec.analysis.bounds import favor as fb

    try:
        m = fb.favor_features_needed(args.radius, args.tol, args.delta, block=args.block)
    except (ValueError, OverflowError) as e:
        raise UsageError(f"--radius: no feature count reaches the tolerance ({e})") from None
    print(
        f"radius R = {args.radius:g} (sqrt(scale) |q_i|, sqrt(scale) |k_j| <= R), "
        f"tol = {args.tol:g}, failure probability delta = {args.delta:g}, "
        f"features independent in blocks of {args.block}"
    )
    print(f"random features needed: {m}")
    print("for |favor - softmax| <= tol max_j |v_j - y_i| per output entry with probability")
    print(">= 1 - delta (Chebyshev on the exact variance; favor_features_needed).")
    return 0


#: The most logits ``bound rounding --op lse/softmax`` draws (float64, with a few
#: temporaries of that size: about 1 GB at the cap).
MAX_DRAWN_LOGITS = 10**7


def _cmd_bound_rounding(args: argparse.Namespace) -> int:
    import torch

    from attnprec.analysis.bounds import rounding as rb
    from attnprec.analysis.precision import Format

    fmt = Format.of(args.precision)
    acc = Format.of(args.accumulate) if args.accumulate else fmt
    n, u, ua = args.n, fmt.u, acc.u
    block = args.block
    if args.order == "blocked" and block is None:
        raise UsageError("--block: needed with --order blocked (the block size)")
    if args.op in ("lse", "softmax") and n > MAX_DRAWN_LOGITS:
        raise UsageError(
            f"--n: at most {MAX_DRAWN_LOGITS} for --op {args.op} (the logits are drawn in "
            f"memory), got {n}"
        )
    print(f"n = {n}, precision {fmt.name} (u = {u:.6g}), accumulate {acc.name} (u = {ua:.6g})")
    if args.op == "sum":
        value = rb.sum_gamma(n, ua, args.order, block)
        print(f"sum ({args.order}): |fl(sum x) - sum x| <= {value:.6g} * sum |x|")
    elif args.op == "dot":
        value = rb.dot_gamma(n, ua, args.order, block)
        print(f"dot ({args.order}, FMA or not): |fl(a.b) - a.b| <= {value:.6g} * |a|.|b|")
    elif args.op == "probabilistic":
        lam = rb.hm_lambda(n, ua, args.delta)
        value = rb.probabilistic_gamma(n, ua, lam)
        print(
            f"dot, Higham-Mary: |fl(a.b) - a.b| <= {value:.6g} * |a|.|b| with probability "
            f">= {1 - args.delta:g} (lambda = {lam:.4g}); worst case {rb.gamma(n, ua):.6g}"
        )
    else:
        # lse and softmax bounds are a posteriori: they depend on the logits.
        g = torch.Generator().manual_seed(args.seed)
        x = args.sigma * torch.randn(n, generator=g, dtype=torch.float64)
        f = rb.lse_bound if args.op == "lse" else rb.softmax_bound
        value = float(f(x, u, u_acc=ua, order=args.order, block=block).max())
        print(
            f"{args.op} (shifted, Blanchard-Higham-Higham): max abs error bound {value:.6g} on "
            f"{n} logits drawn from N(0, {args.sigma:g}^2) with seed {args.seed}"
        )
    return 0


# --------------------------------------------------------------------------------------------
# attnprec formats | methods


def _table(cols: Sequence[str], rows: Sequence[Sequence[str]], right: bool = True) -> None:
    widths = [max(len(r[i]) for r in [cols, *rows]) for i in range(len(cols))]
    fmt = "  ".join(f"{{:{'>' if right else '<'}{w}}}" for w in widths)
    print(fmt.format(*cols))
    for r in rows:
        print(fmt.format(*r))


def _cmd_formats(args: argparse.Namespace) -> int:
    cols = ("format", "p", "u = 2^-p", "max", "min normal", "min subnormal", "torch dtype")
    rows = []
    for name, spec in FORMAT_SPECS.items():
        p, u, mx, mn, ms = format_row(name)
        rows.append(
            (name, str(p), f"{u:.6g}", f"{mx:.6g}", f"{mn:.6g}", f"{ms:.6g}", spec[5] or "-")
        )
    _table(cols, rows)
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    rows = []
    for m in METHODS.values():
        kw = ", ".join(k.name + ("" if k.required else f"={k.default!r}") for k in m.keywords)
        rows.append((m.name, m.target, m.causal, "yes" if m.kernel else "-", kw or "-", m.summary))
    _table(("method", "target", "causal", "kernel", "keywords", "weights"), rows, right=False)
    return 0


# --------------------------------------------------------------------------------------------
# Parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2^63), got {text}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
    return value


def _nonnegative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def _coeffs(text: str) -> tuple[float, ...]:
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected numbers c0,c1,... separated by commas")
    return tuple(_finite(p) for p in parts)


def _semiring(text: str) -> Any:
    from attnprec.attention import semiring as sr

    name, _, arg = text.partition(":")
    kinds = {"logexpmean": sr.LogExpMean, "softmaxplus": sr.SoftMaxPlus}
    if name == "tropical" and not arg:
        return sr.Tropical()
    if name in kinds and arg:
        try:
            return kinds[name](float(arg))
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    raise argparse.ArgumentTypeError(
        f"expected logexpmean:P, softmaxplus:TAU or tropical, got {text!r}"
    )


def _block(text: str) -> int:
    if text in ("one-pass", "one_pass"):
        return 2**62  # attnprec.analysis.precision.ONE_PASS, without importing torch
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer (keys per block) or one-pass, got {text!r}"
        ) from None


def _writable(text: str) -> str:
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r} (no writable folder {folder})")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``attnprec`` command (builds without importing torch)."""
    formats = tuple(FORMAT_SPECS)
    parser = argparse.ArgumentParser(
        prog="attnprec", description="Precision analysis for log-space and linearized attention."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    a = sub.add_parser(
        "audit",
        help="audit kernels against their certified bounds",
        description="Audit every built-in kernel (or --kernel) against the certified reference "
        "and bounds of its method, on every input family. Exit status: 0 ok, 1 a bound "
        "violated (or a case could not be audited), 2 bad arguments, 3 elements with no "
        "finite bound (not checked), 4 undecided, 5 atypical (beyond the probabilistic "
        "bound), 130 interrupted (the JSON says partial, lists what did not run; its verdict "
        "is PARTIAL when nothing worse was found).",
    )
    a.add_argument(
        "--kernel",
        metavar="MODULE:FUNCTION",
        help="a function of yours to audit, or a PyTorch kernel (under its own declaration): "
        + ", ".join(TORCH_TARGETS),
    )
    a.add_argument("--method", choices=NAMES, help="method (required with --kernel)")
    a.add_argument(
        "--dtype",
        action="append",
        choices=_DTYPES,
        help="storage; repeatable (e4m3, e5m2: the FP8 recipe with scale factors, softmax)",
    )
    a.add_argument(
        "--fp8-scale",
        choices=("tensor", "block"),
        default="tensor",
        help="FP8 storage: one scale per tensor, or per block of --fp8-block rows of each head",
    )
    a.add_argument(
        "--fp8-block",
        type=_positive_int,
        default=None,
        help="rows per scale with --fp8-scale block (default 64)",
    )
    a.add_argument(
        "--family",
        action="append",
        choices=FAMILIES + SCALED_FAMILIES,
        help="repeatable (overrange: FP8 storage only, the default there)",
    )
    a.add_argument("--n", "--size", type=_positive_int, default=32, help="sequence length")
    a.add_argument("--d", type=_positive_int, default=16, help="head dimension")
    a.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help=(
            "each family draws its inputs from its own seed, made from this one; --rows "
            "draws the same rows for every family, from this seed"
        ),
    )
    a.add_argument("--degree", type=_positive_int, help="taylor degree")
    a.add_argument("--coeffs", type=_coeffs, help="polynomial coefficients c0,c1,...")
    a.add_argument("--num-features", type=_positive_int, help="favor random features")
    a.add_argument("--semiring", type=_semiring, help="logexpmean:P, softmaxplus:TAU, tropical")
    a.add_argument("--scale", type=_finite, help="a fixed scale (default: the method's)")
    a.add_argument("--causal", action="store_true")
    a.add_argument("--positive-values", action="store_true", help="draw v >= 0")
    a.add_argument("--gates", choices=("random", "zero", "per-channel"), help="gated: log-gates")
    a.add_argument("--compute", default="fp32", choices=("storage", *formats), help="with --kernel")
    a.add_argument(
        "--accumulate", default="fp32", choices=("storage", *formats), help="with --kernel"
    )
    a.add_argument(
        "--block",
        type=_block,
        help="with --kernel: keys per block of its schedule, or one-pass (default: any)",
    )
    a.add_argument(
        "--constants",
        choices=("any", "folded"),
        default="any",
        help="with --kernel: where it multiplies by the scale and a feature map's "
        "coefficients: once, on one side or the product (folded, a tighter bound), or "
        "anywhere, roots split over both sides included (any, the default)",
    )
    a.add_argument(
        "--block-sums",
        choices=("any", "separate"),
        default="any",
        help="with --block: each block summed on its own and then added (separate), or the "
        "running sum possibly fused into a block's sum (any, the default)",
    )
    a.add_argument(
        "--elementary", choices=("default", "libm"), default="default", help="with --kernel"
    )
    a.add_argument(
        "--sums",
        choices=("linear", "log"),
        help="with --kernel: partial sums held as values or as logs (default: either)",
    )
    a.add_argument(
        "--merges",
        type=_positive_int,
        help="with --kernel (softmax): split states merged two at a time, at most N merges "
        "per split (a chain of S splits: S - 1; a tree: ceil(log2 S)); default: one combine",
    )
    a.add_argument(
        "--passes",
        type=int,
        choices=(1, 2),
        default=1,
        help="with --kernel (softmax): 2, a first pass forms the normalizer and a second "
        "recomputes the exps against it (default: 1, each exp computed once for both sums)",
    )
    a.add_argument(
        "--merge-format",
        choices=formats,
        help="with --merges: the format merged states are held in (default: the output's)",
    )
    a.add_argument("--confidence", type=_probability, help="of the probabilistic bound")
    a.add_argument(
        "--stabilizer",
        choices=("exponent", "data_dash"),
        default="exponent",
        help="FAVOR+: the features' exps shifted by the largest exponent (default) or by the "
        "largest linear part, amax(data_dash), as Performer's code",
    )
    a.add_argument("--rows", type=_positive_int, help="audit a sample of this many query rows")
    a.add_argument(
        "--evaluation",
        choices=("pairs", "state"),
        default="pairs",
        help="the bound over every (row, key) pair, or from key states (linear time: log, taylor, "
        "polynomial, linear, favor, gated and the state-space methods)",
    )
    a.add_argument("--infer-precision", action="store_true", help="the tightest declaration met")
    a.add_argument("--workers", type=_positive_int, default=1, help="local worker processes")
    a.add_argument("--dask", metavar="ADDRESS", help="a Dask scheduler, or 'local'")
    a.add_argument(
        "--shards",
        type=_positive_int,
        default=1,
        metavar="N",
        help="split the rows of each case into N jobs for --workers or --dask (merged back "
        "into one case; each runs the kernel on the whole sequence)",
    )
    a.add_argument(
        "--allow-unbounded",
        action="store_true",
        help="accept elements with no finite bound (they are not checked; still counted)",
    )
    a.add_argument(
        "--allow-atypical",
        action="store_true",
        help="accept elements beyond the probabilistic bound but within the sound one",
    )
    a.add_argument("--json", metavar="PATH", type=_writable, help="write every figure as JSON")
    a.add_argument("--plot", metavar="PATH", type=_writable, help="error/bound histograms (PNG)")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=_cmd_audit)

    rp = sub.add_parser("replay", help="replay a failing case saved by assert_within_bound")
    rp.add_argument("file", help="the .pt file named in the failure's message")
    rp.add_argument("--kernel", metavar="MODULE:FUNCTION", help="another function to audit")
    rp.set_defaults(func=_cmd_replay)

    b = sub.add_parser("bound", help="evaluate a priori bounds")
    bsub = b.add_subparsers(dest="bound", required=True)
    t = bsub.add_parser("taylor", help="Taylor degree needed for a tolerance, and bound per degree")
    t.add_argument("--radius", type=_nonnegative, required=True, help="R >= |scale q.k|")
    t.add_argument("--tol", type=_probability, required=True, help="relative output tolerance")
    t.add_argument("--max-degree", type=_positive_int, default=256)
    t.set_defaults(func=_cmd_bound_taylor)
    f = bsub.add_parser("favor", help="FAVOR+ random features needed for a tolerance")
    f.add_argument("--radius", type=_nonnegative, required=True, help="R >= sqrt(scale) |q|, |k|")
    f.add_argument("--tol", type=_probability, required=True)
    f.add_argument("--delta", type=_probability, default=1e-3, help="failure probability")
    f.add_argument(
        "--block", type=_positive_int, default=1,
        help="features independent in blocks of this many (orthogonal features: d_k)",
    )  # fmt: skip
    f.set_defaults(func=_cmd_bound_favor)
    r = bsub.add_parser("rounding", help="rounding-error constants of sums, dots, lse, softmax")
    r.add_argument("--op", choices=("sum", "dot", "probabilistic", "lse", "softmax"), required=True)
    r.add_argument(
        "--n", type=_positive_int, required=True, help="number of terms (lse/softmax: <= 10^7)"
    )
    r.add_argument("--precision", default="fp32", choices=formats, help="computation format")
    r.add_argument(
        "--accumulate", choices=formats, help="format of the sums (default: --precision)"
    )
    r.add_argument("--order", choices=("recursive", "pairwise", "blocked"), default="recursive")
    r.add_argument("--block", type=_positive_int, help="block size (--order blocked)")
    r.add_argument("--delta", type=_probability, default=1e-6, help="probabilistic: failure")
    r.add_argument("--sigma", type=_nonnegative, default=1.0, help="lse/softmax: logit spread")
    r.add_argument("--seed", type=int, default=0, help="lse/softmax: seed of the logits")
    r.set_defaults(func=_cmd_bound_rounding)

    fm = sub.add_parser("formats", help="the unit roundoff table")
    fm.set_defaults(func=_cmd_formats)
    me = sub.add_parser("methods", help="the method table")
    me.set_defaults(func=_cmd_methods)
    return parser


def _interrupted_report(args: argparse.Namespace) -> None:
    """An audit stopped before its cases were set up (imports, building the jobs): its
    ``--json`` says so (partial, nothing run) rather than leave an earlier run's file
    looking current. A second Ctrl-C is ignored while it is written."""
    path = getattr(args, "json", None)
    if getattr(args, "func", None) is not _cmd_audit or not path:
        return
    import signal

    main = _on_main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        from attnprec.analysis.report import AuditReport

        AuditReport(partial=True).to_json(path)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def _on_main_thread() -> bool:
    """Whether this is the main thread (the only one that may set signal handlers)."""
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``attnprec`` command; returns the exit status.

    0 on success; for ``audit`` 1 when a bound is violated (or a case could not be
    audited), 3 unbounded elements, 4 undecided, 5 atypical
    (:data:`attnprec.analysis.report.EXIT_STATUS`), 130 when interrupted; 2 on bad
    arguments (the message names the option).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as e:
        parser.error(str(e))
    except KeyboardInterrupt:  # Ctrl-C before the audit's own handler (imports)
        print("attnprec: interrupted", file=sys.stderr)
        _interrupted_report(args)
        return 130
    except BrokenPipeError:  # the reader stopped (``| head``): quiet, 128 + SIGPIPE as a shell
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 2  # not reached: parser.error exits
