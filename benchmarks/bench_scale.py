"""Time and peak memory of the certified reference, the bound and the audit against n.

Each measurement runs in its own process (peak RSS is per process), side by side in one run:

- ``reference``: :func:`attnprec.analysis.reference.reference` (backend ``auto``);
- ``bound``: :func:`attnprec.analysis.bounds.attention_error_bound` (both levels);
- ``audit``: :func:`attnprec.analysis.audit.audit` of the method's PyTorch implementation
  (fp32 work on the stored inputs, one rounding to storage): the kernel's own time is
  reported apart (``kernel_s``) and left out of ``audit_s``.

Every row is certified up to ``--full-max`` tokens; above, ``--rows`` sampled rows (always the
first and last). ``peak_mb`` is the process's peak RSS minus its RSS once the inputs exist.

A second table, ``--long``: the full audit (every row) of PyTorch's own softmax kernel
(``torch:sdpa``, fp16, d = 64, causal, one head) through the command line, its rows split
in ``--shards`` jobs on as many worker processes; wall time and the largest worker's peak
RSS.

    python benchmarks/bench_scale.py                 # writes results/scale.json, docs table
    python benchmarks/bench_scale.py --quick         # small sizes, a smoke run
    python benchmarks/bench_scale.py --long 65536    # the full audit at n = 65,536 only
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "scale.json"
DOC = HERE.parent / "docs" / "scale.md"

#: (method, d) audited at every size; causal, as the long-context kernels are.
CASES = (("softmax", 16), ("log", 16), ("taylor", 16), ("gated", 16))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _one(
    method: str, n: int, d: int, part: str, rows: int | None, dtype: str, shard=(0, 1)
) -> dict:
    """One measurement in this process (which keeps freed memory, as the command's do);
    ``shard`` ``(i, S)``: the audit of the rows ``idx[i::S]`` of the sample only."""
    import torch

    from attnprec._alloc import keep_freed_memory

    keep_freed_memory()

    from attnprec.analysis.audit import audit
    from attnprec.analysis.bounds import attention_error_bound
    from attnprec.analysis.precision import Elementary, Format, Precision
    from attnprec.analysis.reference import reference
    from attnprec.attention._common import DEFAULT_CHUNK
    from attnprec.methods import method as record

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(n)
    dt = Format.of(dtype).torch_dtype
    q, k, v = (torch.randn(n, d, generator=g).to(dt) for _ in range(3))
    params: dict = {"causal": True}
    if method == "taylor":
        params["degree"] = 2
    if method == "gated":
        params["log_g"] = (-0.05 * torch.rand(n, d, generator=g, dtype=torch.float64)).to(dt)
    fn = record(method).resolve("function")
    # attention.log_attention rounds each float64 log-sum once to compute (Precision docs)
    # and carries its state from chunk to chunk of DEFAULT_CHUNK keys, the state one term
    # of the chunk's log-sum: a term is rounded once per chunk it passes, not once per key
    # (block=None, or block_sums="any", counts n - 1 log-adds)
    el = Elementary(logsum=1) if method == "log" else Elementary()
    blocked = {"block": DEFAULT_CHUNK, "block_sums": "separate"} if method == "log" else {}
    prec = Precision(dtype, elementary=el, **blocked)
    if method == "softmax":  # PyTorch's own fused kernel: the dense form holds n x n
        fn = functools.partial(_sdpa, torch)
    sel, whole = rows, {}
    if shard[1] > 1:  # as the runner's shards: the whole case's backend and probability
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // shard[1]))  # share the cores
        from attnprec.analysis.bounds.attention import sample_rows

        idx = sample_rows(n, rows, 0)
        sel = (torch.arange(n) if idx is None else idx)[shard[0] :: shard[1]]
        whole = {"whole_rows": n if idx is None else int(idx.numel())}
    base = _rss_mb()
    out: dict = {"method": method, "n": n, "d": d, "part": part, "rows": rows, "dtype": dtype}
    t0 = time.perf_counter()
    if part == "reference":
        r = reference(method, *(x.double() for x in (q, k, v)), rows=rows, **params)
        out["backend"] = r.backend
    elif part == "bound":
        eb = attention_error_bound(method, q, k, v, prec, rows=rows, **params)
        out["bound_median"] = float(eb.total.median())
    else:
        kernel_s = [0.0]

        def kernel(q, k, v, **kw):
            t = time.perf_counter()
            y = fn(q.float(), k.float(), v.float(), **kw).to(q.dtype)
            kernel_s[0] += time.perf_counter() - t
            return y

        rep = audit(kernel, method, q, k, v, precision=prec, rows=sel, **whole, **params)
        case = rep.cases[0]
        out["verdict"] = case.verdict
        out["elements"] = case.elements
        out["kernel_s"] = kernel_s[0]
    out["seconds"] = time.perf_counter() - t0
    if part == "audit":
        out["audit_s"] = out["seconds"] - out["kernel_s"]
    out["peak_mb"] = _rss_mb() - base
    out["base_mb"] = base
    return out


def _sdpa(torch, q, k, v, causal=False):
    """Softmax attention by ``scaled_dot_product_attention`` (its CPU kernel streams keys)."""
    f = torch.nn.functional.scaled_dot_product_attention
    return f(q[None, None], k[None, None], v[None, None], is_causal=causal)[0, 0]  # 4-D: flash


def _long(n: int, shards: int, timeout: float) -> dict:
    """The command line's full audit of torch:sdpa (module docstring), in a child process."""
    cmd = [sys.executable, "-m", "attnprec", "audit", "--kernel", "torch:sdpa",
           "--method", "softmax", "--dtype", "fp16", "--family", "typical", "--n", str(n),
           "--d", "64", "--causal", "--shards", str(shards), "--workers", str(shards),
           "--quiet"]  # fmt: skip
    out: dict = {"n": n, "d": 64, "shards": shards, "kernel": "torch:sdpa", "dtype": "fp16"}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**out, "error": f"over {timeout:.0f} s"}
    out["seconds"] = time.perf_counter() - t0
    # the largest finished child's peak (the workers; the command's own process included)
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out["exit_status"] = p.returncode
    out["summary"] = (p.stdout.strip().splitlines() or [""])[-1][:300]
    return out


def _sharded(args: list[str], shards: int, timeout: float) -> dict:
    """The audit ``args`` in ``shards`` processes started together, each the rows
    ``idx[i::shards]``: the slowest shard's audit time (its own clock from its inputs on,
    its kernel's time left out, as for one process), the largest shard's peak, the sum of
    the elements, the worst verdict."""
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen([sys.executable, __file__, "--one", *args, "--shard", str(i), str(shards)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(shards)
    ]  # fmt: skip
    parts = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            return {"error": f"over {timeout:.0f} s"}
        if p.returncode != 0:
            said = (err.strip() or out.strip()).splitlines()
            return {"error": (said[-1] if said else f"exit status {p.returncode}")[:200]}
        parts.append(json.loads(out.strip().splitlines()[-1]))
    bad = sorted({r["verdict"] for r in parts} - {"ok"})
    return {
        **parts[0],
        "shards": shards,
        "seconds": max(r["seconds"] for r in parts),
        "kernel_s": max(r["kernel_s"] for r in parts),
        "audit_s": max(r["audit_s"] for r in parts),
        "peak_mb": max(r["peak_mb"] for r in parts),
        "elements": sum(r["elements"] for r in parts),
        "verdict": ",".join(bad) or "ok",
    }


def _spawn(args: list[str], timeout: float, shards: int = 1) -> dict:
    if shards > 1:
        return _sharded(args, shards, timeout)
    try:
        p = subprocess.run(
            [sys.executable, __file__, "--one", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if p.returncode != 0:
        # FLINT prints its allocation failures to stdout before aborting; a kill says nothing
        said = (p.stderr.strip() or p.stdout.strip()).splitlines()
        return {"error": (said[-1] if said else f"exit status {p.returncode}")[:200]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--one", nargs=6, metavar=("METHOD", "N", "D", "PART", "ROWS", "DTYPE"))
    ap.add_argument("--shard", nargs=2, type=int, default=(0, 1), metavar=("I", "S"))
    ap.add_argument(
        "--audit-shards",
        type=int,
        default=2,
        help="sampled audits: also in this many processes at once (2 cores)",
    )
    ap.add_argument("--quick", action="store_true", help="n = 2^9..2^11 (smoke run)")
    ap.add_argument("--sizes", type=int, nargs="*", default=None, help="log2 of n")
    ap.add_argument("--full-max", type=int, default=4096, help="certify every row up to here")
    ap.add_argument("--rows", type=int, default=256, help="sampled rows above --full-max")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per measurement (s)")
    ap.add_argument(
        "--long",
        type=int,
        nargs="*",
        default=None,
        metavar="N",
        help="only the full torch:sdpa audit at these n (default 16384 65536)",
    )
    ap.add_argument("--shards", type=int, default=2, help="row shards (and workers), --long")
    ap.add_argument("--methods", nargs="*", default=None, help="only these methods")
    ap.add_argument("--redoc", action="store_true", help="only rewrite --doc from --out")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="replace these measurements in the existing --out, keep the others",
    )
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--doc", type=Path, default=DOC)
    a = ap.parse_args()
    if a.one:
        m, n, d, part, rows, dtype = a.one
        r = None if rows == "all" else int(rows)
        print(json.dumps(_one(m, int(n), int(d), part, r, dtype, tuple(a.shard))))
        return
    if a.redoc:
        saved = json.loads(a.out.read_text())
        long_path = a.out.with_name("scale_long.json")
        a.doc.write_text(_doc(saved["meta"], saved["results"], _longs(long_path)))
        print(f"wrote {a.doc}")
        return
    if a.long is not None:
        longs = []
        for n in a.long or [16384, 65536]:
            r = _long(n, a.shards, a.timeout)
            print(json.dumps(r), flush=True)
            longs.append(r)
        path = a.out.with_name("scale_long.json")
        meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, "
                f"{os.cpu_count()} cores", "python": platform.python_version()}  # fmt: skip
        path.write_text(json.dumps({"meta": meta, "results": longs}, indent=1) + "\n")
        print(f"wrote {path}")
        return
    sizes = a.sizes or ([9, 10, 11] if a.quick else [11, 12, 14, 16, 18, 20])
    results = []
    t_all = time.perf_counter()
    for lg in sizes:
        n = 2**lg
        rows = None if n <= a.full_max else a.rows
        for method, d in CASES:
            if a.methods is not None and method not in a.methods:
                continue
            if method == "softmax" and n > 2**16:
                continue  # the kernel itself is quadratic (the PyTorch form holds n x n)
            parts = ["reference", "bound", "audit"]
            if a.audit_shards > 1 and rows is not None:
                parts.append("sharded")
            for part in parts:
                kind = "audit" if part == "sharded" else part
                args = [method, str(n), str(d), kind, "all" if rows is None else str(rows)]
                r = _spawn([*args, a.dtype], a.timeout, a.audit_shards if part == "sharded" else 1)
                r.update(method=method, n=n, d=d, part=part, rows=rows)
                results.append(r)
                msg = r.get("error") or f"{r['seconds']:.2f} s, {r['peak_mb']:.0f} MB"
                print(f"[{time.perf_counter() - t_all:7.0f}s] {method:8s} n=2^{lg:<2d} "
                      f"{part:9s} {msg}", flush=True)  # fmt: skip
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "dtype": a.dtype,
        "full_max": a.full_max,
        "rows": a.rows,
        "wall_s": time.perf_counter() - t_all,
    }
    if a.merge and a.out.exists():
        old = json.loads(a.out.read_text())
        new = {(r["method"], r["n"], r["part"]) for r in results}
        kept = [r for r in old["results"] if (r["method"], r["n"], r["part"]) not in new]
        results = kept + results
        meta = {**old["meta"], "merged": {**meta, "methods": sorted(set(a.methods or []))}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    long_path = a.out.with_name("scale_long.json")
    a.doc.write_text(_doc(meta, results, _longs(long_path)))
    print(f"wrote {a.out} and {a.doc}")


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return f"({r['error']})"
    s = r["audit_s"] if r["part"] in ("audit", "sharded") else r["seconds"]
    return f"{s:.3g} s / {r['peak_mb']:.0f} MB"


def _longs(path: Path) -> list[dict]:
    """The full audits of ``--long`` (its own run), each with the date it was measured."""
    if not path.exists():
        return []
    saved = json.loads(path.read_text())
    return [{**r, "date": saved["meta"].get("date", "")} for r in saved["results"]]


def _doc(meta: dict, results: list[dict], longs: list[dict] = ()) -> str:
    by = {(r["method"], r["n"], r["part"]): r for r in results}
    ns = sorted({r["n"] for r in results})
    lines = [
        "# Audit at scale: time and memory against n",
        "",
        "`benchmarks/bench_scale.py` measures, each in its own process, the certified reference,",
        "the bound (both levels) and the audit of the method's PyTorch implementation (the",
        "kernel's own time left out; softmax: `scaled_dot_product_attention`, whose CPU "
        "kernel streams the keys), causal, on N(0, 1) inputs stored in "
        f"{meta['dtype']}. Every row is certified up to n = {meta['full_max']}; above, "
        f"{meta['rows']} sampled rows (the first and last always).",
        "Memory is the peak RSS of the process above its RSS once the inputs exist. "
        '"2 processes": the sampled rows split in two shards run at once (rows '
        "`idx[i::2]`, as `attnprec audit --shards 2 --workers 2`), the slower one's time. "
        'The reading of these figures is in {doc}`benchmarks` ("Audit at scale").',
        "",
        f"Run on {meta['date']} ({meta['machine']}, Python {meta['python']}), "
        f"{meta['wall_s']:.0f} s in all. GPU rows: unmeasured (no GPU lent).",
        *(
            [
                f"Re-measured on {m['date']} (`--merge`, {m['wall_s']:.0f} s): "
                f"{', '.join(m.get('methods') or ['every method'])}.",
                "",
            ]  # fmt: skip
            if (m := meta.get("merged"))
            else [""]
        ),
        "Regenerate with `python benchmarks/bench_scale.py`.",
        "",
    ]
    for method in dict.fromkeys(m for m, _ in CASES if any(r["method"] == m for r in results)):
        lines += [f"## {method}", "", "| n | rows | reference | bound | audit (no kernel) | "
                  "audit, 2 processes (no kernel) | kernel | verdict |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for n in ns:
            ref, bnd, aud, shd = (
                by.get((method, n, p)) for p in ("reference", "bound", "audit", "sharded")
            )
            if ref is None and bnd is None and aud is None:
                continue
            rows = "all" if (aud or bnd or ref or {}).get("rows") is None else aud["rows"]
            kern = "-" if not aud or "kernel_s" not in aud else f"{aud['kernel_s']:.3g} s"
            verdict = "-" if not aud or "verdict" not in aud else aud["verdict"]
            lines.append(
                f"| {n} | {rows} | {_cell(ref)} | {_cell(bnd)} | {_cell(aud)} | {_cell(shd)} | "
                f"{kern} | {verdict} |"
            )
        lines.append("")
    if longs:
        lines += [
            "## Full audit of torch:sdpa (every row)",
            "",
            "`python benchmarks/bench_scale.py --long N`: `attnprec audit --kernel "
            "torch:sdpa --method softmax --dtype fp16 --n N --d 64 --causal --shards S "
            "--workers S` (results/scale_long.json); wall time from the command's start, "
            "kernel included (each shard runs it), and the largest process's peak RSS.",
            "",
            "| n | measured | shards (workers) | wall | peak RSS | summary |",
            "|---|---|---|---|---|---|",
        ]
        for r in longs:
            cell = r.get("error") or f"{r['seconds']:.0f} s | {r['peak_mb']:.0f} MB"
            cell = cell if "error" not in r else f"({cell}) | -"
            lines.append(
                f"| {r['n']} | {r['date']} | {r['shards']} | {cell} | {r.get('summary', '')} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
