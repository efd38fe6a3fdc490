"""Running an audit: a set of independent cases, in this process, on a process pool, or on
Dask ``distributed``.

A :class:`Job` describes one case in plain, picklable data (the kernel by its
``"module:function"`` path, the method, the storage format, the input family, the sizes, a
seed, the method's keywords, the declaration). :func:`run_job` rebuilds the inputs from
the seed (a seed per family, so no two families share a draw), runs the kernel on its
device (CUDA when present, else the Triton interpreter) and audits it; :func:`run_jobs`
runs many, with progress on stderr, and stops cleanly on Ctrl-C with the cases done so
far (the report then says it is partial). Results depend only on the jobs, not on the
number of workers or where they ran.
"""

from __future__ import annotations

import importlib
import os
import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Job", "run_job", "run_jobs", "load_function", "builtin_kernels", "family_seed"]


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
        ``compute``, ``accumulate``, ``block``, ``elementary`` of the declaration (``None``
        values: compute and accumulate as storage, any schedule, the default model);
        ``None``: the kernel module's own ``precision_for`` (for a ``"torch:..."`` kernel,
        :func:`attnprec.targets.precision_for`).
    options : dict
        Input options: ``positive_values`` (bool), ``gates`` (``"random"``, ``"zero"``,
        ``"per-channel"``), ``features`` (feed ``elu(x) + 1`` to kernels over given
        features), ``fp8_scale`` (FP8 storage: ``"tensor"`` or rows per scale).
    audit : dict
        Keywords of the audit: ``rows``, ``bound_options``, ``allow_unbounded``,
        ``allow_atypical``; ``infer_precision`` (bool) asks for a fingerprint instead.
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
    from attnprec.testing.inputs import make_inputs
    from attnprec.testing.params import default_params

    dtype = Format.of(job.dtype).torch_dtype
    if job.dtype in ("e4m3", "e5m2"):
        dtype = torch.float32  # the kernel quantizes with its scale factors
    n, d = job.n, job.d
    if job.family == "real":
        n, d = min(n, 128), min(d, 32)
    seed = family_seed(job.seed, job.family)
    g = torch.Generator().manual_seed(seed)
    q, k, v = make_inputs(job.family, n_q=n, d_k=d, dtype=torch.float64, generator=g)
    if job.options.get("positive_values"):
        v = v.abs()
    if job.options.get("features"):
        from attnprec.attention.linear import elu1

        q, k = elu1(q), elu1(k)
    params = default_params(job.method, d, n, seed)
    gates = job.options.get("gates")
    if "log_g" in params and gates is not None:
        if gates == "zero":
            params["log_g"] = torch.zeros(n, dtype=torch.float64)
        elif gates == "per-channel":
            params["log_g"] = -torch.rand(n, d, generator=g, dtype=torch.float64)
    params.update(job.params)
    params = {key: val.to(dtype) if key == "log_g" else val for key, val in params.items()}
    return q.to(dtype), k.to(dtype), v.to(dtype), params


def _precision(job: Job, fn_module: str) -> Any:
    from attnprec.analysis.precision import ELEMENTARY, Format, Precision

    if job.dtype in ("e4m3", "e5m2"):
        from attnprec.fp8 import fp8_precision

        p = job.precision or {}
        return fp8_precision(
            job.dtype,
            job.options.get("fp8_scale", "tensor"),
            compute=p.get("compute") or "fp32",
            accumulate=p.get("accumulate") or "fp32",
            block=p.get("block"),
            elementary=p.get("elementary") or "default",
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
    )


def run_job(job: Job) -> Any:
    """Audit one job: an :class:`~attnprec.analysis.report.AuditReport` (or, with
    ``audit["infer_precision"]``, a :class:`~attnprec.analysis.fingerprint.Fingerprint`).
    Whatever fails (the kernel raising included) is recorded in the report's
    ``failures``, never raised."""
    from attnprec.analysis.audit import audit
    from attnprec.analysis.report import AuditReport

    what = {"kernel": job.label, "method": job.method, "dtype": job.dtype, "family": job.family}
    try:
        device = _device()
        fn = load_function(job.kernel)
        if job.kernel == "attnprec.fp8:fp8_softmax_attention":
            import functools

            fn = functools.partial(
                fn, fmt=job.dtype, scaling=job.options.get("fp8_scale", "tensor")
            )
        q, k, v, params = _inputs(job)

        def run(q: Any, k: Any, v: Any, **kw: Any) -> Any:
            # the kernel runs on the device; the audit compares on the CPU
            moved = {key: x.to(device) if hasattr(x, "to") else x for key, x in kw.items()}
            out = fn(q.to(device), k.to(device), v.to(device), **moved)
            return out.cpu() if hasattr(out, "cpu") else out

        run.__name__ = job.label
        prec = _precision(job, job.kernel.partition(":")[0])
        opts = dict(job.audit)
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
    except Exception as e:  # noqa: BLE001 - one case must not hide the others
        return AuditReport(failures=[{**what, "error": f"{type(e).__name__}: {e}"}])


def run_jobs(
    jobs: Sequence[Job],
    *,
    workers: int = 1,
    dask: str | None = None,
    progress: bool = True,
) -> tuple[Any, list[dict[str, Any]]]:
    """Run ``jobs``; returns (the combined :class:`AuditReport`, the fingerprints).

    ``workers > 1``: a local process pool; ``dask``: the address of a Dask ``distributed``
    scheduler, or ``"local"`` for a ``LocalCluster`` of ``workers`` processes (the
    ``dask`` extra). Ctrl-C stops the run: the cases done are kept and the report is marked
    ``partial``.
    """
    from attnprec.analysis.report import AuditReport

    report, prints = AuditReport(), []
    results: dict[int, Any] = {}
    bar = _progress(len(jobs), progress)
    try:
        for i, res in _execute(jobs, workers, dask):
            results[i] = res
            bar.update(1)
            bar.set_postfix_str(f"{jobs[i].method} {jobs[i].dtype} {jobs[i].family}")
    except KeyboardInterrupt:
        report.partial = True
    finally:
        bar.close()
    for i in sorted(results):  # the order of the jobs, whatever the workers' order
        res = results[i]
        if isinstance(res, dict):
            prints.append(res)
        else:
            report = report + res
    if len(results) < len(jobs):
        report.partial = True
    return report, prints


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="case", file=sys.stderr, leave=False)


def _execute(jobs: Sequence[Job], workers: int, dask: str | None) -> Any:
    """Yield ``(index, result)`` as the jobs complete."""
    if dask is not None:
        yield from _dask(jobs, workers, dask)
        return
    if workers <= 1:
        for i, job in enumerate(jobs):
            yield i, run_job(job)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(run_job, job): i for i, job in enumerate(jobs)}
        try:
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
        except KeyboardInterrupt:
            for fut in futures:
                fut.cancel()
            raise


def _dask(jobs: Sequence[Job], workers: int, address: str) -> Any:
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ValueError("dask: needs Dask distributed (pip install 'attnprec[dask]')") from None
    cluster = None
    if address == "local":
        cluster = LocalCluster(n_workers=max(workers, 1), threads_per_worker=1, processes=True)
        client = Client(cluster)
    else:
        client = Client(address)
    try:
        futures = client.map(run_job, list(jobs), pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        try:
            for fut in as_completed(futures):
                yield index[fut.key], fut.result()
        except KeyboardInterrupt:
            client.cancel(futures)
            raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
