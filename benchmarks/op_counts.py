"""The softmax bound's work per (row, key) pair, counted rather than timed.

A count does not depend on the machine's load, so two versions of the code compare on a
shared machine: the elements written by every torch operation of at least 10,000 elements
(a ``TorchDispatchMode``; views and allocations left out) and the flops of every matrix
product, each divided by the causal pairs. Run the code of another commit with
``git archive REV src | tar -x -C DIR`` and ``PYTHONPATH=DIR/src``.

    python benchmarks/op_counts.py                    # n = 4096, prints the count
    python benchmarks/op_counts.py --label HEAD --out results/op_counts.json   # appends
"""

from __future__ import annotations

import argparse
import collections
import json
import math
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: operations that write no elements of their own (views) or only allocate
_NO_PASS = {
    "view", "as_strided", "select", "slice", "unsqueeze", "expand", "t", "transpose",
    "squeeze", "_unsafe_view", "alias", "detach", "permute", "lift_fresh", "new_empty",
    "empty", "empty_like",
}  # fmt: skip


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.elements: collections.Counter[str] = collections.Counter()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket.__name__)
        if name in ("bmm", "mm"):
            a, b = args[0], args[1]
            self.flops += 2 * math.prod(a.shape) * b.shape[-1]
        outs = out if isinstance(out, (tuple, list)) else [out]
        n = sum(o.numel() for o in outs if isinstance(o, torch.Tensor))
        if name not in _NO_PASS and n >= 10_000:
            self.elements[name] += n
        return out


def count(n: int, d: int = 16) -> dict:
    """Elements and flops per pair of ``attention_error_bound`` (softmax, bf16, causal)."""
    from attnprec.analysis.bounds import attention_error_bound
    from attnprec.analysis.precision import Precision

    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(n, d, generator=g).to(torch.bfloat16) for _ in range(3))
    c = _Count()
    with c:
        attention_error_bound("softmax", q, k, v, Precision("bf16"), causal=True)
    pairs = n * (n + 1) / 2
    top = {op: round(x / pairs, 2) for op, x in c.elements.most_common(8)}
    return {
        "n": n,
        "d": d,
        "elements_per_pair": round(sum(c.elements.values()) / pairs, 1),
        "flops_per_pair": round(c.flops / pairs, 1),
        "largest": top,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--label", default="working tree", help="the code's name in the JSON")
    ap.add_argument("--out", type=Path, default=None, help="append the count to this JSON")
    a = ap.parse_args()
    row = {"label": a.label, **count(a.n)}
    print(json.dumps(row))
    if a.out is not None:
        rows = json.loads(a.out.read_text()) if a.out.exists() else []
        a.out.write_text(json.dumps([*rows, row], indent=1) + "\n")


if __name__ == "__main__":
    main()
