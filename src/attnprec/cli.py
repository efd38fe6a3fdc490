"""The ``attnprec`` command: audit kernels against their bounds, evaluate bounds, list formats.

``attnprec audit`` audits every built-in kernel, method and dtype on every input family
(exit status 1 if any bound is violated); ``attnprec audit --kernel mod:fn --method M``
audits a function of yours. ``attnprec bound taylor|favor|rounding`` evaluates the a priori
bounds; ``attnprec formats`` prints the unit roundoff table.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import math
import os
import pkgutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["main", "build_parser", "builtin_kernels", "default_params", "KernelSpec", "UsageError"]

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class UsageError(ValueError):
    """A bad command-line argument: reported by argparse (exit status 2), naming the option."""


def _use_interpreter() -> bool:
    """Without CUDA, Triton must run its interpreter; it is chosen before triton is imported."""
    if torch.cuda.is_available():
        return False
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return os.environ["TRITON_INTERPRET"] not in ("", "0")


def _device() -> torch.device:
    return torch.device("cpu" if _use_interpreter() else "cuda")


# --------------------------------------------------------------------------------------------
# Kernels and method parameters


@dataclass(frozen=True)
class KernelSpec:
    """A kernel to audit: its label, the method it computes, the function and its precision.

    ``precision_for(dtype)`` returns the declared :class:`~attnprec.analysis.Precision`;
    ``block`` is the key block size of its sums (``None``: unblocked).
    """

    name: str
    method: str
    fn: Callable[..., torch.Tensor]
    precision_for: Callable[[torch.dtype], Any]
    block: int | None = None


def builtin_kernels() -> list[KernelSpec]:
    """Every ``<method>_attention`` function of the modules of :mod:`attnprec.kernels`.

    A module qualifies when it defines ``precision_for(dtype, interpreted)``. The bound is
    taken unblocked (``block=None``), valid for any summation order, as the kernels document.
    """
    from attnprec.analysis.reference import METHODS

    interp = _use_interpreter()
    import attnprec.kernels as pkg

    specs = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"attnprec.kernels.{info.name}")
        prec = getattr(mod, "precision_for", None)
        if prec is None:
            continue
        for method in METHODS:
            fn = getattr(mod, f"{method}_attention", None)
            if fn is not None and getattr(fn, "__module__", None) == mod.__name__:
                specs.append(
                    KernelSpec(
                        name=f"{info.name}.{method}_attention",
                        method=method,
                        fn=fn,
                        precision_for=functools.partial(_declared, prec, interpreted=interp),
                    )
                )
    return specs


def _declared(precision_for: Callable[..., Any], dtype: torch.dtype, interpreted: bool) -> Any:
    return precision_for(dtype, interpreted)


def default_params(method: str, d_k: int, n: int, seed: int = 0) -> dict[str, Any]:
    """The method keywords the default audit uses (one fixed, documented choice per method)."""
    g = torch.Generator().manual_seed(seed)
    if method == "taylor":
        return {"degree": 2}
    if method == "polynomial":
        return {"coeffs": (1.0, 0.5, 0.5)}  # positive definite: 0.5^2 < 4 * 1 * 0.5
    if method == "favor":
        from attnprec.attention.favor import favor_projection

        return {"projection": favor_projection(32, d_k, generator=g)}
    if method == "semiring":
        from attnprec.attention.semiring import SoftMaxPlus

        return {"semiring": SoftMaxPlus(0.5)}
    if method == "linear":
        return {"feature_map": None}  # q and k are the features (the kernel's convention)
    if method == "gated":
        return {"log_g": -torch.rand(n, generator=g, dtype=torch.float64), "causal": True}
    return {}


def _load_function(spec: str) -> Callable[..., torch.Tensor]:
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise UsageError(f"--kernel: expected package.module:function, got {spec!r}")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise UsageError(f"--kernel: cannot import {module!r}: {e}") from None
    for part in name.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"--kernel: {module!r} has no attribute {name!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"--kernel: {spec!r} is not callable")
    return obj  # type: ignore[no-any-return]


def _parse_semiring(text: str) -> Any:
    from attnprec.attention import semiring as sr

    name, _, arg = text.partition(":")
    kinds = {"logexpmean": sr.LogExpMean, "softmaxplus": sr.SoftMaxPlus}
    if name == "tropical" and not arg:
        return sr.Tropical()
    if name in kinds and arg:
        return kinds[name](float(arg))
    raise UsageError(
        f"--semiring: expected logexpmean:P, softmaxplus:TAU or tropical, got {text!r}"
    )


def _user_params(args: argparse.Namespace, d_k: int, n: int) -> dict[str, Any]:
    params = default_params(args.method, d_k, n, args.seed)
    if args.degree is not None:
        if args.method != "taylor":
            raise UsageError("--degree: applies to --method taylor only")
        params["degree"] = args.degree
    if args.coeffs is not None:
        if args.method != "polynomial":
            raise UsageError("--coeffs: applies to --method polynomial only")
        params["coeffs"] = tuple(float(c) for c in args.coeffs.split(","))
    if args.num_features is not None:
        if args.method != "favor":
            raise UsageError("--num-features: applies to --method favor only")
        from attnprec.attention.favor import favor_projection

        g = torch.Generator().manual_seed(args.seed)
        params["projection"] = favor_projection(args.num_features, d_k, generator=g)
    if args.semiring is not None:
        if args.method != "semiring":
            raise UsageError("--semiring: applies to --method semiring only")
        params["semiring"] = _parse_semiring(args.semiring)
    if args.causal:
        params["causal"] = True
    return params


# --------------------------------------------------------------------------------------------
# attnprec audit


class _Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.done, self.quiet = total, 0, quiet

    def step(self, label: str) -> None:
        self.done += 1
        if self.quiet:
            return
        width = 24
        filled = width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (width - filled)
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} {label:<48.48}")
        sys.stderr.flush()

    def close(self) -> None:
        if not self.quiet:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _cmd_audit(args: argparse.Namespace) -> int:
    from attnprec.analysis.audit import AuditReport, audit
    from attnprec.analysis.precision import Format, Precision
    from attnprec.analysis.report import CLASSES
    from attnprec.testing.inputs import FAMILIES, make_inputs

    device = _device()
    families = args.family or list(FAMILIES)
    for f in families:
        if f not in FAMILIES:
            raise UsageError(f"--family: expected one of {FAMILIES}, got {f!r}")
    dtypes = args.dtype or ["fp16", "bf16"]
    n, d = args.n, args.d
    if args.kernel is not None:
        if args.method is None:
            raise UsageError("--method: required with --kernel")
        user_fn = _load_function(args.kernel)

        def user_precision(dt: torch.dtype) -> Any:
            compute, accumulate = Format.of(args.compute), Format.of(args.accumulate)
            return Precision(Format.of(dt), compute=compute, accumulate=accumulate)

        kernels = [KernelSpec(args.kernel, args.method, user_fn, user_precision, args.block)]
    else:
        kernels = builtin_kernels()
        if args.method is not None:
            kernels = [k for k in kernels if k.method == args.method]
        if not kernels:
            raise UsageError("no built-in kernel found to audit (attnprec.kernels has none)")

    jobs = [(k, dt, fam) for k in kernels for dt in dtypes for fam in families]
    progress = _Progress(len(jobs), args.quiet)
    report = AuditReport()
    for spec, dt_name, family in jobs:
        dtype = _DTYPES[dt_name]
        g = torch.Generator().manual_seed(args.seed)
        n_eff = min(n, 128) if family == "real" else n
        d_eff = min(d, 32) if family == "real" else d
        q, k, v = make_inputs(family, n_q=n_eff, d_k=d_eff, dtype=dtype, generator=g)
        if spec.method == "linear" and args.kernel is None:
            # The built-in linear kernel takes features: feed it elu1(q), elu1(k) as stored.
            from attnprec.attention.linear import elu1

            q, k = (elu1(x.double()).to(dtype) for x in (q, k))
        if args.kernel is not None:
            params = _user_params(args, d_eff, n_eff)
        else:
            params = default_params(spec.method, d_eff, n_eff, args.seed)
        params = {key: val.to(dtype) if key == "log_g" else val for key, val in params.items()}
        progress.step(f"{spec.method} {dt_name} {family}")

        def run(
            q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fn: Any = spec.fn, **kw: Any
        ) -> torch.Tensor:
            # The kernel runs on the device; the audit compares on the CPU.
            moved = {
                key: x.to(device) if isinstance(x, torch.Tensor) else x for key, x in kw.items()
            }
            return fn(q.to(device), k.to(device), v.to(device), **moved).cpu()  # type: ignore[no-any-return]

        opts: dict[str, Any] = {"block": spec.block} if spec.block is not None else {}
        if args.confidence is not None:
            opts["confidence"] = args.confidence
        try:
            report = report + audit(
                run,
                spec.method,
                q,
                k,
                v,
                precision=spec.precision_for(dtype),
                family=family,
                kernel=spec.name,
                bound_options=opts,
                allow_unbounded=args.allow_unbounded,
                allow_atypical=args.allow_atypical,
                **params,
            )
        except Exception as e:  # noqa: BLE001 - the kernel's own errors included
            # One case that cannot be audited must not hide the others: it is reported
            # (and fails the run) with its message.
            what = {"kernel": spec.name, "method": spec.method, "dtype": dt_name}
            report.failures.append({**what, "family": family, "error": f"{type(e).__name__}: {e}"})
    progress.close()
    print(report.table())
    for case in report.cases:
        if case.verdict != "ok":
            print(case.describe())
    for f in report.failures:
        print(f"ERROR {f['kernel']} ({f['method']}, {f['dtype']}, {f['family']}): {f['error']}")
    if args.json:
        report.to_json(args.json)
    if args.plot:
        report.plot(args.plot)
    bad = sum(c.verdict != "ok" for c in report.cases)
    where = f"device {device.type}" + (" (Triton interpreter)" if device.type == "cpu" else "")
    counts = ", ".join(f"{report.count(c)} {c}" for c in CLASSES)
    print(
        f"{len(report.cases)} cases audited, {bad} not ok, {len(report.failures)} could not "
        f"be audited; elements: {counts}; verdict {report.verdict}; {where}"
    )
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
    print("max_j |v_j - y_i| (taylor_output_bound), certified with arb ball arithmetic.")
    return 0


def _cmd_bound_favor(args: argparse.Namespace) -> int:
    from attnprec.analysis.bounds import favor as fb

    try:
        m = fb.favor_features_needed(args.radius, args.tol, args.delta)
    except (ValueError, OverflowError) as e:
        raise UsageError(f"--radius: no feature count reaches the tolerance ({e})") from None
    print(
        f"radius R = {args.radius:g} (sqrt(scale) |q_i|, sqrt(scale) |k_j| <= R), "
        f"tol = {args.tol:g}, failure probability delta = {args.delta:g}"
    )
    print(f"random features needed: {m}")
    print("for |favor - softmax| <= tol max_j |v_j - y_i| per output entry with probability")
    print(">= 1 - delta (Chebyshev on the exact variance; favor_features_needed).")
    return 0


def _cmd_bound_rounding(args: argparse.Namespace) -> int:
    from attnprec.analysis.bounds import rounding as rb
    from attnprec.analysis.precision import Format

    fmt = Format.of(args.precision)
    acc = Format.of(args.accumulate) if args.accumulate else fmt
    n, u, ua = args.n, fmt.u, acc.u
    block = args.block
    print(f"n = {n}, precision {fmt.name} (u = {u:.6g}), accumulate {acc.name} (u = {ua:.6g})")
    if args.op == "sum":
        value = rb.sum_gamma(n, ua, args.order, block)
        print(f"sum ({args.order}): |fl(sum x) - sum x| <= {value:.6g} * sum |x|")
    elif args.op == "dot":
        value = rb.dot_gamma(n, ua, args.order, block, args.fma)
        print(f"dot ({args.order}, fma={args.fma}): |fl(a.b) - a.b| <= {value:.6g} * |a|.|b|")
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
# attnprec formats


def _cmd_formats(args: argparse.Namespace) -> int:
    from attnprec.analysis.precision import FORMATS

    cols = ("format", "p", "u = 2^-p", "max", "min normal", "min subnormal", "torch dtype")
    rows = [
        (
            f.name,
            str(f.precision),
            f"{f.u:.6g}",
            f"{f.max:.6g}",
            f"{f.min_normal:.6g}",
            f"{f.min_subnormal:.6g}",
            str(f.torch_dtype).replace("torch.", "") if f.torch_dtype is not None else "-",
        )
        for f in FORMATS.values()
    ]
    widths = [max(len(r[i]) for r in [cols, *rows]) for i in range(len(cols))]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    print(fmt.format(*cols))
    for r in rows:
        print(fmt.format(*r))
    return 0


# --------------------------------------------------------------------------------------------
# Parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
    return value


def _nonnegative(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``attnprec`` command."""
    from attnprec.analysis.precision import FORMATS
    from attnprec.analysis.reference import METHODS
    from attnprec.testing.inputs import FAMILIES

    formats = tuple(FORMATS)
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
        "bound).",
    )
    a.add_argument("--kernel", metavar="MODULE:FUNCTION", help="a function of yours to audit")
    a.add_argument("--method", choices=METHODS, help="method (required with --kernel)")
    a.add_argument("--dtype", action="append", choices=sorted(_DTYPES), help="repeatable")
    a.add_argument("--family", action="append", choices=FAMILIES, help="repeatable")
    a.add_argument("--n", "--size", type=_positive_int, default=32, help="sequence length")
    a.add_argument("--d", type=_positive_int, default=16, help="head dimension")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--degree", type=int, help="taylor degree")
    a.add_argument("--coeffs", help="polynomial coefficients c0,c1,...")
    a.add_argument("--num-features", type=_positive_int, help="favor random features")
    a.add_argument("--semiring", help="logexpmean:P, softmaxplus:TAU or tropical")
    a.add_argument("--causal", action="store_true")
    a.add_argument("--compute", default="fp32", choices=formats, help="with --kernel")
    a.add_argument("--accumulate", default="fp32", choices=formats, help="with --kernel")
    a.add_argument("--block", type=_positive_int, help="with --kernel: key block of its sums")
    a.add_argument(
        "--confidence",
        type=_probability,
        help="a probabilistic bound holding with this probability (required for favor)",
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
    a.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    a.add_argument("--plot", metavar="PATH", help="write the error/bound histograms (PNG)")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=_cmd_audit)

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
    f.set_defaults(func=_cmd_bound_favor)
    r = bsub.add_parser("rounding", help="rounding-error constants of sums, dots, lse, softmax")
    r.add_argument("--op", choices=("sum", "dot", "probabilistic", "lse", "softmax"), required=True)
    r.add_argument("--n", type=_positive_int, required=True, help="number of terms")
    r.add_argument("--precision", default="fp32", choices=formats, help="computation format")
    r.add_argument(
        "--accumulate", choices=formats, help="format of the sums (default: --precision)"
    )
    r.add_argument("--order", choices=("recursive", "pairwise", "blocked"), default="recursive")
    r.add_argument("--block", type=_positive_int, help="block size (--order blocked)")
    r.add_argument("--fma", action="store_true", help="dot: products fused into the sums")
    r.add_argument("--delta", type=_probability, default=1e-6, help="probabilistic: failure")
    r.add_argument("--sigma", type=_nonnegative, default=1.0, help="lse/softmax: logit spread")
    r.add_argument("--seed", type=int, default=0, help="lse/softmax: seed of the logits")
    r.set_defaults(func=_cmd_bound_rounding)

    fm = sub.add_parser("formats", help="the unit roundoff table")
    fm.set_defaults(func=_cmd_formats)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``attnprec`` command; returns the exit status.

    0 on success; for ``audit`` 1 when a bound is violated (or a case could not be
    audited), 3 unbounded elements, 4 undecided, 5 atypical
    (:data:`attnprec.analysis.report.EXIT_STATUS`); 2 on bad arguments (the message names
    the option).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as e:
        parser.error(str(e))
    return 2  # not reached: parser.error exits
