"""The FP8 reference kernel against its bound: the table of docs/fp8.md, "Measured".

``attnprec.fp8.fp8_softmax_attention`` audited under its own declaration
(``fp8_precision(fmt, scaling, block=ONE_PASS)``: one pass, each row shifted by its largest
visible logit), causal, batch 2, n = 128, d = 16, seed 0, on every input family
(``attnprec.methods.FAMILIES + SCALED_FAMILIES``), both formats and both scale kinds (per
tensor, blocks of 64). Writes ``benchmarks/results/fp8.json`` and the table between the
GENERATED markers of ``docs/fp8.md``.

Run: ``python benchmarks/fp8_table.py`` (about 80 s on two CPU cores).
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _generated import splice  # noqa: E402
from attnprec.analysis.audit import audit
from attnprec.analysis.precision import ONE_PASS
from attnprec.fp8 import fp8_precision, fp8_softmax_attention
from attnprec.methods import FAMILIES, SCALED_FAMILIES
from attnprec.testing import make_inputs

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "fp8.json"
DOC = HERE.parent / "docs" / "fp8.md"


def measure() -> list[dict]:
    rows = []
    for fmt in ("e4m3", "e5m2"):
        for scaling in ("tensor", 64):
            for fam in FAMILIES + SCALED_FAMILIES:
                g = torch.Generator().manual_seed(0)
                q, k, v = make_inputs(fam, n_q=128, d_k=16, batch=(2,), dtype=torch.float32,
                                      generator=g)  # fmt: skip

                def fn(q, k, v, fmt=fmt, scaling=scaling, **kw):
                    return fp8_softmax_attention(q, k, v, fmt=fmt, scaling=scaling, **kw)

                prec = fp8_precision(fmt, scaling, block=ONE_PASS)
                case = audit(fn, "softmax", q, k, v, causal=True, precision=prec).cases[0]
                t, r = case.total, case.rounding
                rows.append({
                    "format": fmt, "scaling": scaling, "family": fam,
                    "max_error": t.max_error, "max_bound": t.max_bound,
                    "quantization_at_tightest": t.worst["quantization"],
                    "tightness": t.tightness, "rounding_error": r.max_error,
                    "rounding_bound": r.max_bound, "counts": case.counts,
                })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    head = [
        "| format | scales | family | max error | max bound | quantization part* | "
        "min bound/error | rounding err | rounding bound | violated |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    body = [
        f"| {r['format']} | {'tensor' if r['scaling'] == 'tensor' else 'block 64'} | "
        f"{r['family']} | {r['max_error']:.3g} | {r['max_bound']:.3g} | "
        f"{r['quantization_at_tightest']:.3g} | {r['tightness']:.3g} | "
        f"{r['rounding_error']:.3g} | {r['rounding_bound']:.3g} | {r['counts']['violated']} |"
        for r in rows
    ]
    failing = sum(
        r["counts"][c] for r in rows for c in ("violated", "unbounded", "undecided", "atypical")
    )
    tight = [r["tightness"] for r in rows]
    loose = [r["rounding_bound"] / r["rounding_error"] for r in rows]
    said = (
        "No element is violated, unbounded, undecided or atypical in any case"
        if not failing
        else f"{failing} elements are violated, unbounded, undecided or atypical"
    )
    return "\n".join([
        *head, *body, "",
        "\\* the quantization part at the element where bound/error is least.", "",
        f"{said}; the total bound is within a factor {min(tight):.2g} to {max(tight):.2g} of "
        f"the error at its tightest element, and the rounding part's largest is "
        f"{min(loose):.2g} to {max(loose):.2g} times the largest rounding error.",
    ])  # fmt: skip


def main() -> None:
    t0 = time.perf_counter()
    rows = measure()
    meta = {
        "date": _dt.date.today().isoformat(),
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "command": "python benchmarks/fp8_table.py",
    }
    OUT.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    splice(DOC, "fp8_table.py", table(rows))
    print(table(rows))
    print(f"wrote {OUT} and {DOC} ({meta['seconds']} s)")


if __name__ == "__main__":
    main()
