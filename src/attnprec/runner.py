"""Running an audit: a set of independent cases, in this process, on a process pool, or on
Dask ``distributed``.

A :class:`Job` describes one case in plain, picklable data (the kernel by its
``"module:function"`` path, the method, the storage format, the input family, the sizes, a
seed, the method's keywords, the declaration). :func:`run_job` rebuilds the inputs from
the seed (a seed per family, so no two families share a draw), runs the kernel on its
device (CUDA when present, where the float64 references and the bounds then compute too;
else the Triton interpreter) and audits it; :func:`run_jobs`
runs many, with progress on stderr (the cases done, and the rows of each running case's
current pass, ``attnprec._progress``), and stops cleanly on Ctrl-C with the cases done so
far (the report then says it is partial). Results depend only on the jobs, not on the
number of workers or where they ran.

A long case splits into row shards (:func:`shard_jobs`, ``run_jobs(..., shards=N)``,
``attnprec audit --shards N``): shard ``i`` of ``N`` judges the rows ``idx[i::N]`` of the
case's rows ``idx`` (every row, or the sample of ``audit["rows"]``), each a job of its
own (``whole_rows`` of :func:`~attnprec.analysis.audit.audit`: the references choose the
backend of the whole case, the probabilistic bound takes the shard's share of the case's
failure probability), and :func:`merge_shards` makes them one case again. The merged case
has the unsharded case's rows, elements, element classes and counts, worst element (its
index among the case's rows), figures and arrays, except that what is computed in float64
over blocks of rows depends a little on which rows share a block: the bound in its last
bits (relative 1e-11 at most in the tests; a review measured 1.2e-10 on SSD at n = 1024,
either way: each is a certified upper bound, rounded up apart; the quantization part, a
difference of two float64 outputs, by their radii: absolute 1e-12 at most in the tests, on
values of order 1), the float64 reference's
radius (its block's range of logits: max_radius 0.2% apart at n = 16,384, 4096 sampled
rows) and its value within that radius (the BLAS products of its sums round differently
for other row counts: 4e-14 apart on sums of 1100 keys with MKL on AVX-512; also where the
inputs' products are not exact in float64, fp32 storage).
That can move an element's class only where its error lies that close to its bound. Each
shard runs the kernel on the whole sequence.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from attnprec._progress import EVERY, listening

__all__ = [
    "Job",
    "run_job",
    "run_jobs",
    "shard_jobs",
    "merge_shards",
    "load_function",
    "builtin_kernels",
    "family_seed",
]


@dataclass(frozen=True)
class Job:
    """One audit case (module docstring).

    Attributes
    ----------
    kernel : str
        ``"module:function"`` of the implementation (importable in a worker), or a PyTorch
        target ``"torch:..."`` (:mod:`attnprec.targets`).
    label : str
        Its name in the report.
    method : str
        The method (:data:`attnprec.methods.NAMES`).
    dtype : str
        The storage format name (``"fp16"``, ``"bf16"``, ``"fp32"``; ``"e4m3"``, ``"e5m2"``:
        the FP8 recipe, inputs drawn in float32 and quantized by the kernel with the scale
        factors of ``options["fp8_scale"]``, :mod:`attnprec.fp8`).
    family : str
        The input family.
    n, d : int
        Sequence length and head dimension (the ``real`` family caps them at what was
        captured).
    seed : int
        The run's seed; each family draws from its own seed derived from it.
    params : dict
        The method's keywords beyond the defaults (picklable).
    precision : dict or None
        ``compute``, ``accumulate``, ``block``, ``elementary``, ``sums``, ``block_sums``,
        ``merges``, ``merge_format``, ``constants`` of the declaration (``None`` values:
        compute and accumulate as storage, any schedule, the default model, constants
        anywhere);
        ``None``: the kernel module's own ``precision_for`` (for a ``"torch:..."`` kernel,
        :func:`attnprec.targets.precision_for`).
    options : dict
        Input options: ``positive_values`` (bool), ``gates`` (``"random"``, ``"zero"``,
        ``"per-channel"``), ``features`` (feed ``elu(x) + 1`` to kernels over given
        features), ``fp8_scale`` (FP8 storage: ``"tensor"`` or rows per scale).
    audit : dict
        Keywords of the audit: ``rows``, ``bound_options``, ``allow_unbounded``,
        ``allow_atypical``; ``infer_precision`` (bool) asks for a fingerprint instead.
    shard : tuple of int
        ``(index, count)``: judge only the rows ``idx[index::count]`` of the case's rows
        ``idx`` (:func:`shard_jobs`); ``(0, 1)``, the default, is the whole case.
    """

    kernel: str
    label: str
    method: str
    dtype: str
    family: str
    n: int
    d: int
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    precision: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    audit: dict[str, Any] = field(default_factory=dict)
    shard: tuple[int, int] = (0, 1)


def shard_jobs(job: Job, count: int) -> list[Job]:
    """``job`` split into ``count`` shards: the same case, shard ``i`` judging the rows
    ``idx[i::count]`` of the case's rows ``idx`` (module docstring).

    Strided, so the causal rows (whose cost grows with the row) spread evenly; a shard
    left without rows (``count`` above the rows) reports nothing. :func:`merge_shards` of
    the shards' reports is the report of ``job``. A fingerprint job
    (``audit["infer_precision"]``) and ``count == 1`` give ``[job]``.

    Raises
    ------
    ValueError
        Naming ``count`` when it is not a positive int, ``job`` when it is a shard already.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count: expected a positive int, got {count!r}")
    if count == 1 or job.audit.get("infer_precision"):
        return [job]
    if tuple(job.shard) != (0, 1):
        raise ValueError(f"job: already shard {job.shard[0]} of {job.shard[1]}")
    return [replace(job, shard=(i, count)) for i in range(count)]


def _shard_rows(job: Job, n_q: int, params: dict[str, Any], prec: Any) -> tuple[Any, int]:
    """The rows of ``job``'s shard (among the case's rows as ``audit`` draws them, with the
    method's keywords ``params`` and the declaration ``prec``) and the case's row count."""
    import torch

    from attnprec.analysis.audit import judged_rows

    index, count = job.shard
    if not 0 <= index < count:
        raise ValueError(f"shard: expected (index, count), 0 <= index < count, got {job.shard}")
    idx = judged_rows(n_q, job.audit.get("rows"), job.audit.get("seed", 0), job.method, params,
                      prec)  # fmt: skip
    idx = torch.arange(n_q) if idx is None else idx
    return idx[index::count], int(idx.numel())


def _what(job: Job) -> dict[str, str]:
    """The job's case as the report's failures and ``not_run`` name it."""
    return {"kernel": job.label, "method": job.method, "dtype": job.dtype, "family": job.family}


def family_seed(seed: int, family: str) -> int:
    """The seed of ``family``'s draw in a run seeded ``seed`` (stable across processes)."""
    return zlib.crc32(f"{int(seed)}:{family}".encode())


def load_function(spec: str) -> Callable[..., Any]:
    """The callable at ``"package.module:function"`` (attributes may be dotted), with the
    working directory on the import path as ``python`` puts it there; or the PyTorch kernel
    named ``"torch:..."`` (:func:`attnprec.targets.target`).

    Raises
    ------
    ValueError
        Naming ``kernel`` when the spec is malformed, cannot be imported or is not callable
        (or names no PyTorch target).
    RuntimeError
        When a PyTorch target's backend cannot run here (naming the backend and why).
    """
    if spec.startswith("torch:"):
        from attnprec import targets

        try:
            return targets.target(spec)
        except ValueError as e:
            raise ValueError(f"kernel: {str(e).removeprefix('name: ')}") from None
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"kernel: expected package.module:function, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"kernel: cannot import {module!r}: {e}") from None
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"kernel: {module!r} has no attribute {name!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"kernel: {spec!r} is not callable")
    return obj  # type: ignore[no-any-return]


def builtin_kernels(method: str | None = None) -> list[tuple[str, str, str]]:
    """``(label, "module:function", method)`` of the library's kernels (from the method
    table), optionally of one method."""
    from attnprec.methods import METHODS

    out = []
    for rec in METHODS.values():
        if rec.kernel is None or (method is not None and rec.name != method):
            continue
        module, _, fn = rec.kernel.partition(":")
        out.append((f"{module.rsplit('.', 1)[-1]}.{fn}", rec.kernel, rec.name))
    return out


def _device() -> Any:
    """CUDA when present; else the CPU, with Triton's interpreter chosen before triton is
    imported (an explicit ``TRITON_INTERPRET`` is respected)."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return torch.device("cpu")


def _inputs(job: Job) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The job's inputs in its storage dtype and its keywords."""
    import torch

    from attnprec.analysis.precision import Format
    from attnprec.testing.inputs import as_features, make_inputs
    from attnprec.testing.params import default_params

    dtype = Format.of(job.dtype).torch_dtype
    if job.dtype in ("e4m3", "e5m2"):
        dtype = torch.float32  # the kernel quantizes with its scale factors
    n, d = job.n, job.d
    if job.family == "real":  # at most the captured activations' size (the CLI notes it)
        from attnprec.testing.real import real_metadata

        meta = real_metadata()
        n, d = min(n, meta["tokens"]), min(d, meta["d_head"])
    seed = family_seed(job.seed, job.family)
    g = torch.Generator().manual_seed(seed)
    q, k, v = make_inputs(job.family, n_q=n, d_k=d, dtype=torch.float64, generator=g)
    if job.options.get("positive_values"):
        v = v.abs()
    params = default_params(job.method, d, n, seed)
    gates = job.options.get("gates")
    if "log_g" in params and gates is not None:
        if gates == "zero":
            params["log_g"] = torch.zeros(n, dtype=torch.float64)
        elif gates == "per-channel":
            params["log_g"] = -torch.rand(n, d, generator=g, dtype=torch.float64)
    params.update(job.params)
    params = {key: val.to(dtype) if key == "log_g" else val for key, val in params.items()}
    q, k = as_features(job.method, params, q.to(dtype), k.to(dtype))
    return q, k, v.to(dtype), params


def _precision(job: Job, fn_module: str) -> Any:
    from attnprec.analysis.precision import ELEMENTARY, Format, Precision

    if job.dtype in ("e4m3", "e5m2"):
        from attnprec.analysis.precision import ONE_PASS
        from attnprec.fp8 import fp8_precision

        p = job.precision or {}
        own = job.kernel == "attnprec.fp8:fp8_softmax_attention"  # one pass (its docstring)
        fp8 = fp8_precision(
            job.dtype,
            job.options.get("fp8_scale", "tensor"),
            compute=p.get("compute") or "fp32",
            accumulate=p.get("accumulate") or "fp32",
            block=ONE_PASS if own and p.get("block") is None else p.get("block"),
            elementary=p.get("elementary") or "default",
        )
        return replace(
            fp8,
            block_sums=p.get("block_sums") or "any",
            merges=p.get("merges"),
            merge_format=p.get("merge_format"),
            constants=p.get("constants") or "any",
            passes=p.get("passes") or 1,
        )
    if job.precision is None and job.kernel.startswith("torch:"):
        from attnprec.targets import precision_for  # a PyTorch target's own declaration

        return precision_for(job.kernel, job.dtype)
    if job.precision is None:
        from attnprec.kernels import interpreted

        mod = importlib.import_module(fn_module)
        return mod.precision_for(Precision.of(job.dtype).storage.torch_dtype, interpreted())
    p = job.precision
    return Precision(
        Format.of(job.dtype),
        compute=Format.of(p.get("compute") or job.dtype),
        accumulate=Format.of(p.get("accumulate") or job.dtype),
        block=p.get("block"),
        elementary=ELEMENTARY[p.get("elementary") or "default"],
        sums=p.get("sums"),
        block_sums=p.get("block_sums") or "any",
        merges=p.get("merges"),
        merge_format=p.get("merge_format"),
        constants=p.get("constants") or "any",
        passes=p.get("passes") or 1,
    )


def run_job(job: Job) -> Any:
    """Audit one job: an :class:`~attnprec.analysis.report.AuditReport` (or, with
    ``audit["infer_precision"]``, a :class:`~attnprec.analysis.fingerprint.Fingerprint`).
    Whatever fails (the kernel raising included) is recorded in the report's
    ``failures``, never raised. The process keeps freed memory for reuse
    (:func:`attnprec._alloc.keep_freed_memory`): a job runs in an audit's own process."""
    import torch

    from attnprec._alloc import keep_freed_memory
    from attnprec.analysis.audit import audit
    from attnprec.analysis.report import AuditReport

    keep_freed_memory()

    what = _what(job)
    try:
        device = _device()
        fn = load_function(job.kernel)
        if job.kernel == "attnprec.fp8:fp8_softmax_attention":
            import functools

            fn = functools.partial(
                fn, fmt=job.dtype, scaling=job.options.get("fp8_scale", "tensor")
            )
        q, k, v, params = _inputs(job)
        if device.type == "cuda":  # the references and bounds then compute there too
            q, k, v = (x.to(device) for x in (q, k, v))
            params = {key: x.to(device) if torch.is_tensor(x) else x for key, x in params.items()}

        def run(q: Any, k: Any, v: Any, **kw: Any) -> Any:
            # the kernel runs on the device; the audit compares its output on the CPU
            given = {"q": q, "k": k, "v": v, **kw}
            moved = {key: x.to(device) if torch.is_tensor(x) else x for key, x in given.items()}
            out = fn(moved["q"], moved["k"], moved["v"], **{key: moved[key] for key in kw})
            for key, x in given.items():  # what it wrote into its (device) inputs, seen here
                if torch.is_tensor(x) and moved[key] is not x:
                    x.copy_(moved[key])
            return out.cpu() if hasattr(out, "cpu") else out

        run.__name__ = job.label
        prec = _precision(job, job.kernel.partition(":")[0])
        opts = dict(job.audit)
        if job.shard[1] != 1 and not opts.get("infer_precision"):
            opts["rows"], opts["whole_rows"] = _shard_rows(job, q.shape[-2], params, prec)
            if not opts["rows"].numel():
                return AuditReport()  # more shards than rows
        if opts.pop("infer_precision", False):
            from attnprec.analysis.fingerprint import infer_precision
            from attnprec.analysis.precision import ONE_PASS

            # any schedule, and one pass (the tighter declaration a plain kernel meets)
            fp = infer_precision(
                run, job.method, q, k, v, kernel=job.label, blocks=(None, ONE_PASS), **params
            )
            return {**what, "fingerprint": fp}
        return audit(run, job.method, q, k, v, precision=prec, family=job.family,
                     kernel=job.label, **opts, **params)  # fmt: skip
    except KeyboardInterrupt:
        raise  # Ctrl-C stops the run (run_jobs keeps what is done)
    except BaseException as e:  # noqa: BLE001 - one case (SystemExit too) must not end the run
        return _failed(job, e)


def _failed(job: Job, e: BaseException) -> Any:
    """The report of ``job`` that could not be audited because of ``e``."""
    from attnprec.analysis.report import AuditReport

    return AuditReport(failures=[{**_what(job), "error": f"{type(e).__name__}: {e}"}])


def run_jobs(
    jobs: Sequence[Job],
    *,
    workers: int = 1,
    dask: str | None = None,
    progress: bool = True,
    shards: int = 1,
) -> tuple[Any, list[dict[str, Any]]]:
    """Run ``jobs``; returns (the combined :class:`AuditReport`, the fingerprints; the
    report holds them too, in ``fingerprints``).

    ``workers > 1``: a local process pool; ``dask``: the address of a Dask ``distributed``
    scheduler, or ``"local"`` for a ``LocalCluster`` of ``workers`` processes (the
    ``dask`` extra). ``shards > 1``: each case's rows in that many shards, each a job
    (:func:`shard_jobs`; the progress counts shards), merged back into one case
    (:func:`merge_shards`). Ctrl-C stops the run: the workers are stopped, the cases done
    are kept, the report is marked ``partial`` and lists in ``not_run`` what did not run; a
    case with some of its shards done is kept, as the case of the rows they judged, marked
    partial (its findings count).

    Raises
    ------
    ValueError
        Naming ``shards`` when it is not a positive int.
    """
    from attnprec.analysis.report import AuditReport

    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards: expected a positive int, got {shards!r}")
    parts = [shard_jobs(job, shards) for job in jobs]
    units = [part for group in parts for part in group]
    report, prints = AuditReport(), []
    results: dict[int, Any] = {}
    bar = _bar(len(units), progress, "case" if len(units) == len(jobs) else "shard")
    rows = _RowsBar(units, progress)
    done = _execute(units, workers, dask, rows if progress else None)
    try:
        for u, res in done:
            results[u] = res
            rows.finished(u)
            bar.update(1)
            bar.set_postfix_str(f"{units[u].method} {units[u].dtype} {units[u].family}")
    except KeyboardInterrupt:
        report.partial = True
    finally:
        done.close()  # stops the pool's workers now (a Ctrl-C may reach us outside it)
        rows.close()
        bar.close()
    first = 0
    for job, group in zip(jobs, parts, strict=True):  # the jobs' order, whatever the workers'
        got: list[Any] = [results.get(u) for u in range(first, first + len(group))]
        first += len(group)
        missing = [i for i, res in enumerate(got) if res is None]
        if missing:
            report.partial = True
            report.not_run.append({**_what(job), "missing_shards": missing, "shards": len(got)})
            if len(missing) == len(got):
                continue
        if isinstance(got[0], dict):
            prints.append(got[0])
            report.fingerprints.append(got[0])
        else:
            report = report + (got[0] if len(got) == 1 else merge_shards(job, got))
    return report, prints


def nothing_ran(jobs: Sequence[Job], shards: int = 1) -> Any:
    """The report of a run stopped before any job ran (Ctrl-C at start-up): partial, every
    case in ``not_run``."""
    from attnprec.analysis.report import AuditReport

    missing = list(range(shards))
    return AuditReport(
        partial=True,
        not_run=[{**_what(job), "missing_shards": missing, "shards": shards} for job in jobs],
    )


def merge_shards(job: Job, reports: Sequence[Any]) -> Any:
    """The report of ``job`` from its shards' reports (``reports[i]`` that of shard ``i`` of
    ``len(reports)``, :func:`shard_jobs`; None for a shard that did not run).

    A shard that failed makes the case a failure (the first shard's failure, as the
    unsharded job records it). Else one case: counts, elements, ``outside_hull`` and
    ``unbounded_by`` add up; the largest error, bound, typical bound and radius are the
    largest over the shards (finite values, with :class:`~attnprec.analysis.report.Check`'s
    conventions for none); the tightness figures the least; ``mutated`` and ``hints`` the
    union; ``unjudged_nonfinite`` the rows no shard judged; ``rows`` and ``arrays`` in the
    case's row order; ``worst`` the element the whole check would name (the first of the most
    severe class in (batch, row, column) order, else the least bound/error), its index
    among the case's rows. With shards missing, the case is that of the rows the others
    judged (``rows`` lists them), marked ``partial``.

    Raises
    ------
    ValueError
        Naming ``reports`` when it is empty, or its cases are not shards of one case.
    """
    from attnprec.analysis.bounds.attention import sample_rows
    from attnprec.analysis.report import AuditReport

    if not reports:
        raise ValueError("reports: expected the reports of the shards, got none")
    if len(reports) == 1 and reports[0] is not None:
        return reports[0]
    failures = [f for r in reports if r is not None for f in r.failures]
    retried = [x for r in reports if r is not None for x in r.retried]
    if failures:
        return AuditReport(failures=failures[:1], retried=retried)
    count = len(reports)
    partial = any(r is None for r in reports)
    parts = [(i, r.cases[0]) for i, r in enumerate(reports) if r is not None and r.cases]
    if any(len(r.cases) > 1 for r in reports if r is not None):
        raise ValueError("reports: expected one case per shard")
    if not parts:
        if partial:
            return AuditReport(partial=True, retried=retried)
        raise ValueError("reports: expected one case per shard (at least one)")
    first = parts[0][1]
    same = ("method", "kernel", "dtype", "family", "target", "shape", "backend", "accepted")
    for _, c in parts:
        if any(getattr(c, a) != getattr(first, a) for a in same) or c.rows is None:
            raise ValueError("reports: not the shards of one case")
    # Shard i judged the case's rows at positions i, i + count, ...: their rank among the
    # positions present is their place in the merged case (the position itself when whole).
    positions = {i: [i + count * j for j in range(len(c.rows))] for i, c in parts}
    rank = {p: r for r, p in enumerate(sorted(p for ps in positions.values() for p in ps))}
    places = {i: [rank[p] for p in ps] for i, ps in positions.items()}
    rows: list[int] = [0] * len(rank)
    for i, c in parts:
        for at, row in zip(places[i], c.rows, strict=True):
            rows[at] = row
    hull = [c.outside_hull for _, c in parts]
    unjudged = set.intersection(*(set(c.unjudged_nonfinite) for _, c in parts))
    # whether the case is sampled does not depend on the segment boundaries sample_rows adds
    whole = sample_rows(first.shape[0], job.audit.get("rows"), 0) is None
    merged = replace(
        first,
        elements=sum(c.elements for _, c in parts),
        counts={cls: sum(c.counts[cls] for _, c in parts) for cls in first.counts},
        total=_merge_checks([(places[i], c.total) for i, c in parts]),
        rounding=None
        if first.rounding is None
        else _merge_checks([(places[i], c.rounding) for i, c in parts if c.rounding]),
        outside_hull=None if any(h is None for h in hull) else sum(hull),
        mutated=list(dict.fromkeys(m for _, c in parts for m in c.mutated)),
        hints=list(dict.fromkeys(h for _, c in parts for h in c.hints)),
        rows=None if whole and not partial else rows,
        unjudged_nonfinite=sorted(unjudged),
        unbounded_nonfinite=sum(c.unbounded_nonfinite for _, c in parts),
        partial=partial,
        arrays={key: _merge_arrays(parts, key, places, len(rank)) for key in first.arrays},
    )
    return AuditReport([merged], partial=partial, retried=retried)


def _merge_checks(checks: list[tuple[list[int], Any]]) -> Any:
    """One :class:`~attnprec.analysis.report.Check` from the shards' (places of their rows
    in the merged case, check)."""
    from attnprec.analysis.audit import NO_FINITE_BOUND
    from attnprec.analysis.report import CLASSES, Check

    first = checks[0][1]
    cs = [c for _, c in checks]
    # what every shard accepts (a shard with an inf or NaN on an unbounded element does not
    # accept unbounded ones)
    accepted = tuple(a for a in first.accepted if all(a in c.accepted for c in cs))

    def finite_max(xs: list[float]) -> float:  # inf when none is finite
        fin = [x for x in xs if math.isfinite(x)]
        return max(fin) if fin else math.inf

    def case_index(places: list[int], index: list[int]) -> list[int]:  # among the case's rows
        return [*index[:-2], places[index[-2]], index[-1]]

    worst: dict[str, Any] = {}
    hit = [(case_index(p, c.worst["index"]), c.worst, c.tightness) for p, c in checks if c.worst]
    for cls in CLASSES[:0:-1]:  # the first element of the most severe class not accepted
        if cls not in accepted and any(w["class"] == cls for _, w, _ in hit):
            hit = [h for h in hit if h[1]["class"] == cls]
            break
    else:  # every element within: the first attaining the least bound/error
        least = min((t for _, _, t in hit), default=math.inf)
        hit = [h for h in hit if h[2] == least]
    if hit:
        at, w, _ = min(hit, key=lambda h: h[0])
        worst = {**w, "index": at}
    errors = [c.max_error for c in cs]
    unbounded: dict[str, int] = {}
    for c in cs:
        for key, n in c.unbounded_by.items():
            unbounded[key] = unbounded.get(key, 0) + n
    if NO_FINITE_BOUND in unbounded:
        unbounded[NO_FINITE_BOUND] = unbounded.pop(NO_FINITE_BOUND)
    radii = [c.max_radius for c in cs]
    typical = [c.typical_bound for c in cs]
    typical_t = [c.typical_tightness for c in cs]
    return Check(
        against=first.against,
        counts={cls: sum(c.counts[cls] for c in cs) for cls in CLASSES},
        max_error=math.inf
        if math.inf in errors
        else max((e for e in errors if not math.isnan(e)), default=math.nan),
        max_bound=finite_max([c.max_bound for c in cs]),
        tightness=min(c.tightness for c in cs),
        typical_bound=None if None in typical else finite_max(typical),
        typical_tightness=None if None in typical_t else min(typical_t),
        confidence=first.confidence,
        max_radius=math.nan if any(math.isnan(r) for r in radii) else max(radii),
        unbounded_by=unbounded,
        worst=worst,
        accepted=accepted,
        max_checked_error=max(
            (c.max_checked_error for c in cs if not math.isnan(c.max_checked_error)),
            default=math.nan,
        ),
    )


def _merge_arrays(
    parts: list[tuple[int, Any]], key: str, places: dict[int, list[int]], n_rows: int
) -> Any:
    """The elementwise (errors, bounds) of ``key`` over the case's rows, in its order."""
    import numpy as np

    d_v = parts[0][1].shape[3]
    out = []
    for j in range(2):
        flat = [(i, c.arrays[key][j], len(c.rows)) for i, c in parts]
        if not d_v or not flat[0][1].size:
            out.append(np.concatenate([a for _, a, _ in flat]))
            continue
        batch = flat[0][1].size // (flat[0][2] * d_v)
        whole = np.empty((batch, n_rows, d_v), dtype=flat[0][1].dtype)
        for i, a, r in flat:
            whole[:, places[i]] = a.reshape(batch, r, d_v)
        out.append(whole.reshape(-1))
    return tuple(out)


def _bar(total: int, enabled: bool, unit: str = "case", **kw: Any) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit=unit, file=sys.stderr, leave=False, **kw)


class _RowsBar:
    """The second progress line: the rows through of the passes running now (a reference's,
    a bound's) in the cases in flight, and the cases and their stages."""

    def __init__(self, jobs: Sequence[Job], enabled: bool) -> None:
        import threading

        self.jobs = jobs
        self.live: dict[int, tuple[str, int, int]] = {}  # index -> (stage, done, total)
        self.ended: set[int] = set()
        self.lock = threading.Lock()  # Dask's events arrive on the client's thread
        # no rate: a pass's rows restart from 0, and the stages' passes differ in speed
        fmt = "{percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} rows{postfix}"
        self.bar = _bar(0, enabled, "row", position=1, bar_format=fmt)

    def __call__(self, i: int, stage: str, done: int, total: int) -> None:
        with self.lock:
            if i not in self.ended:  # (Dask's events may arrive after the result)
                self.live[i] = (stage, done, total)
                self._show()

    def finished(self, i: int) -> None:
        with self.lock:
            self.ended.add(i)
            if self.live.pop(i, None) is not None:
                self._show()

    def _show(self) -> None:
        live = self.live.values()
        self.bar.total = sum(t for _, _, t in live)
        self.bar.n = sum(d for _, d, _ in live)
        self.bar.set_postfix_str(
            "; ".join(self._name(i, st) for i, (st, _, _) in self.live.items())
        )

    def _name(self, i: int, stage: str) -> str:
        job = self.jobs[i]
        shard = f" shard {job.shard[0] + 1}/{job.shard[1]}" if job.shard[1] > 1 else ""
        return f"{job.label} {job.family}{shard}: {stage}"

    def close(self) -> None:
        self.bar.close()


def _execute(
    jobs: Sequence[Job], workers: int, dask: str | None, on_rows: Callable[..., None] | None
) -> Any:
    """Yield ``(index, result)`` as the jobs complete; ``on_rows(index, stage, done, total)``
    as their passes advance (``attnprec._progress``; from another thread under Dask)."""
    if dask is not None:
        yield from _dask(jobs, workers, dask, on_rows)
        return
    if workers <= 1:
        put = None if on_rows is None else (lambda m: on_rows(*m))
        for i, job in enumerate(jobs):
            yield i, _reported_job(i, job, put)
        return
    from concurrent.futures.process import BrokenProcessPool

    from attnprec.analysis.report import AuditReport

    manager = None if on_rows is None else _manager()
    queue = None if manager is None else manager.Queue()
    lost: list[int] = []
    try:
        for group, alone in ((range(len(jobs)), False), (lost, True)):
            # A dead worker breaks the pool and every job in flight with it: those again,
            # each alone in a fresh process, so that only a job that kills its own process
            # fails.
            batches = [[i] for i in sorted(group)] if alone else [list(group)]
            for batch in batches:
                for i, res in _pooled(jobs, batch, 1 if alone else workers, queue, on_rows):
                    if isinstance(res, BrokenProcessPool) and not alone:
                        lost.append(i)
                        continue
                    if isinstance(res, BaseException):
                        res = _failed(jobs[i], res)
                    if alone and not isinstance(res, dict):  # said, whatever the rerun found
                        res = res + AuditReport(retried=[_what(jobs[i])])
                    yield i, res
    finally:
        if manager is not None:
            manager.shutdown()


def _pooled(
    jobs: Sequence[Job],
    batch: Sequence[int],
    workers: int,
    queue: Any,
    on_rows: Callable[..., None] | None,
) -> Any:
    """Yield ``(index, result or the exception)`` of the jobs ``batch`` on a pool of
    ``workers``, passing on their rows' progress from ``queue`` as they run."""
    from concurrent.futures import FIRST_COMPLETED, wait

    pool = _pool(workers)
    try:
        futures = {pool.submit(_pool_job, i, jobs[i], queue): i for i in batch}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=EVERY, return_when=FIRST_COMPLETED)
            _drain(queue, on_rows)
            for fut in done:
                try:
                    res = fut.result()
                except Exception as e:  # a dead worker, or a result that does not pickle back
                    res = e
                yield futures[fut], res
    except BaseException:  # Ctrl-C, or the consumer closing us: stop the workers now
        _stop(pool)
        raise
    pool.shutdown()


def _pool_job(i: int, job: Job, put: Any) -> Any:
    """:func:`_reported_job` in a pool worker. The workers ignore SIGINT (Ctrl-C stops the
    pool from the parent), so a ``KeyboardInterrupt`` here is the kernel's own: that case's
    failure (it came back as a Ctrl-C of the whole run, stopping the cases in flight)."""
    try:
        return _reported_job(i, job, put)
    except KeyboardInterrupt as e:
        return _failed(job, e)


def _reported_job(i: int, job: Job, put: Any) -> Any:
    """:func:`run_job`, its rows' progress passed to ``put`` as ``(i, stage, done, total)``
    (a callable, or a pool's queue; None: not reported)."""
    if put is None:
        return run_job(job)
    send = put if callable(put) else put.put_nowait

    def sink(stage: str, done: int, total: int) -> None:
        try:
            send((i, stage, done, total))
        except (OSError, EOFError):  # the listener is gone (the run stopping): no job fails
            pass

    with listening(sink):
        return run_job(job)


def _drain(queue: Any, on_rows: Callable[..., None] | None) -> None:
    """Pass on every progress message waiting in ``queue``."""
    import queue as queues

    while queue is not None and on_rows is not None:
        try:
            on_rows(*queue.get_nowait())
        except (queues.Empty, OSError, EOFError):
            return


def _manager() -> Any:
    """A started manager whose queues the pool's workers report their rows to (a plain
    multiprocessing queue's lock can die with a worker the OOM killer ends)."""
    import multiprocessing

    return multiprocessing.get_context("spawn").Manager()


def _pool(workers: int) -> Any:
    """A process pool of ``workers`` spawned workers sharing the cores' torch threads."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // workers)  # the workers' torch threads share the cores
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_worker_init, initargs=(threads,)
    )


def _stop(pool: Any) -> None:
    """Stop ``pool``'s workers now: waiting for the running jobs (whose results nobody
    takes) made a second Ctrl-C hang the pool's shutdown forever."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def _worker_init(n: int) -> None:
    """A pool worker: SIGINT ignored (:func:`_pool_job`), and its torch threads: more than
    its share of the cores oversubscribes them (two workers of two threads on two cores:
    1.9x the time, benchmarks in the commit)."""
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(n)


#: Seconds to wait for a Dask scheduler before ``--dask`` is reported unreachable.
DASK_TIMEOUT = 10


def _dask(
    jobs: Sequence[Job], workers: int, address: str, on_rows: Callable[..., None] | None
) -> Any:
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ValueError("dask: needs Dask distributed (pip install 'attnprec[dask]')") from None
    cluster = None
    if address == "local":
        cluster = LocalCluster(n_workers=max(workers, 1), threads_per_worker=1, processes=True)
        client = Client(cluster)
    else:
        try:
            client = Client(address, timeout=DASK_TIMEOUT)
        except (OSError, ValueError, TimeoutError) as e:
            raise ValueError(f"dask: cannot connect to {address!r} ({e})") from None
    # the workers' rows as events of a topic of this run (handled on the client's thread)
    topic = None if on_rows is None else f"attnprec-rows-{os.getpid()}-{id(jobs)}"
    try:
        if topic is not None:
            assert on_rows is not None
            client.subscribe_topic(topic, lambda event: on_rows(*event[1]))
        futures = client.map(
            _dask_job, range(len(jobs)), list(jobs), topic=topic, pure=False
        )  # fmt: skip
        index = {f.key: i for i, f in enumerate(futures)}
        try:
            for fut in as_completed(futures):
                i = index[fut.key]
                try:
                    res = fut.result()
                except Exception as e:  # its worker was lost (KilledWorker)
                    res = _failed(jobs[i], e)
                yield i, res
        except BaseException:  # Ctrl-C, or the consumer closing us
            client.cancel(futures)
            raise
    finally:
        if topic is not None:
            client.unsubscribe_topic(topic)
        client.close()
        if cluster is not None:
            cluster.close()


def _dask_job(i: int, job: Job, topic: str | None) -> Any:
    """:func:`run_job` on a Dask worker, its rows' progress logged as events of ``topic``."""
    if topic is None:
        return run_job(job)
    from distributed import get_worker

    worker = get_worker()
    return _reported_job(i, job, lambda message: worker.log_event(topic, message))
