"""Roofline model of attnprec.kernels: bytes, FLOPs and exps per call, counted from the code.

Importable: ``log_cost``, ``taylor_cost``, ``polynomial_cost``, ``linear_cost`` (the featured
kernels), ``recurrence_cost`` return a :class:`Cost` for one call of a phase
(``"prefill"``: causal, ``n`` tokens per row; ``"noncausal"``: ``n`` queries and ``n`` keys;
``"decode"``: one token per row, :func:`attnprec.kernels.decode_step`) over ``batch`` rows
(batch x heads; for the recurrence every channel is a row). :func:`roofline` turns a cost into
the lower-bound time on a :class:`Peak` and names the bounding resource; :func:`fraction` is
``roofline time / measured time`` (1 = at the roofline). ``state_bytes`` is what one row's
:class:`attnprec.kernels.KernelState` holds.

Counting rules (docs/kernels.md, "Roofline"): every operation the kernel executes, on its
padded tiles (``next_pow2(d, 16)`` channels, features in blocks of 64, ``BLOCK`` = 32 rows of a
chunk, decode programs of ``BR`` rows); an add, multiply, compare or max is one FLOP (a fused
multiply-add two); ``tl.exp`` and ``tl.log`` are one SFU op each (``ex2.approx`` /
``lg2.approx``; their scaling multiply is a FLOP). HBM bytes count each tensor once per launch
that touches it (inputs, outputs, the float32 state read and written once per program,
segment buffers and the PyTorch passes between launches); reloads inside a launch (the
featured kernels' state once per chunk, a state re-read by each query
block) are ``reload_bytes``, charged to HBM only when the live state (``working_set``) exceeds
the L2. ``python benchmarks/roofline.py`` prints the tables of docs/kernels.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: Tokens per chunk and features per block of the kernels (attnprec.kernels._common.BLOCK,
#: _featured.BLOCK_F), the log kernel's segment cap (log.MAX_SEGMENTS), the recurrence's
#: chunk (recurrence.BLOCK_T); tests/kernels/test_roofline.py checks they match the code.
BLOCK = 32
BLOCK_F = 64
LOG_MAX_SEGMENTS = 64
BLOCK_T = 32
#: Decode tiles (log.DECODE_TILE, _featured.DECODE_TILE) and the recurrence step's rows.
DECODE_TILE = 8192
BLOCK_STEP = 256
#: Segmented prefill (attnprec.kernels._common): below TARGET_PROGRAMS rows, segments of at
#: least SEG_MIN_CHUNKS chunks, their float32 buffers within SEG_BYTES.
TARGET_PROGRAMS = 256
SEG_MIN_CHUNKS = 8
SEG_BYTES = 2**30

PHASES = ("prefill", "noncausal", "decode")


@dataclass(frozen=True)
class Peak:
    """A device's peaks. Defaults: one NVIDIA H200 SXM.

    ``hbm``: 4.8 TB/s. ``fp32``: ~60 TFLOP/s on the FMA pipes (every ``tl.dot`` here is
    ``input_precision="ieee"``: no tensor cores). ``tensor16``: ~990 TFLOP/s dense bf16/fp16
    (unused by these kernels; for comparison). ``sfu``: 3.9e12 exp/log per second, assumed
    16 MUFU ops per clock per SM x 132 SMs x ~1.83 GHz (the figure FlashAttention-3 gives for
    the H100 SXM5, the same GH100 die). ``l2``: 50 MB.
    """

    name: str = "NVIDIA H200 SXM"
    hbm: float = 4.8e12
    fp32: float = 60e12
    tensor16: float = 990e12
    sfu: float = 3.9e12
    l2: float = 50e6


H200 = Peak()


@dataclass(frozen=True)
class Cost:
    """Work of one call. ``hbm_bytes`` includes ``io_bytes`` (the tokens' inputs and outputs
    in the storage dtype) and ``state_bytes`` (float32 state read + written from HBM);
    ``reload_bytes`` are re-reads within a launch (L2 while ``working_set`` fits it)."""

    hbm_bytes: float = 0.0
    io_bytes: float = 0.0
    state_bytes: float = 0.0
    reload_bytes: float = 0.0
    working_set: float = 0.0
    flops: float = 0.0
    sfu: float = 0.0
    launches: int = 0
    parts: dict = field(default_factory=dict, compare=False)

    def __add__(self, o: Cost) -> Cost:
        return Cost(
            self.hbm_bytes + o.hbm_bytes, self.io_bytes + o.io_bytes,
            self.state_bytes + o.state_bytes, self.reload_bytes + o.reload_bytes,
            max(self.working_set, o.working_set), self.flops + o.flops, self.sfu + o.sfu,
            self.launches + o.launches, {**self.parts, **o.parts},
        )  # fmt: skip


def next_pow2(n: int, minimum: int = 16) -> int:
    """As attnprec.kernels._common.next_pow2 (tile widths)."""
    p = minimum
    while p < n:
        p *= 2
    return p


def _pad(n: int, block: int) -> int:
    return block * math.ceil(n / block)


def segments(nb: int, n: int, block: int, elems: int, most: int = TARGET_PROGRAMS) -> int:
    """As attnprec.kernels._common.segments: parallel segments per sequence."""
    if nb >= TARGET_PROGRAMS:
        return 1
    by_len = n // (block * SEG_MIN_CHUNKS)
    by_mem = SEG_BYTES // (4 * nb * max(elems, 1))
    return max(1, min(TARGET_PROGRAMS // nb, most, by_len, by_mem))


def _split(nb: int, n: int, seg: int) -> tuple[int, int]:
    """(head, tail) tokens: the segmented head and the rest, as the wrappers cut them."""
    head = seg * (n // (seg * BLOCK)) * BLOCK if seg > 1 else 0
    return head, n - head


def _wrapper_copies(nb: int, head: int, tail: int, widths: int, dv: int, s: int) -> float:
    """Bytes of the wrappers' copies around a segmented prefill: the head split and the
    tail made contiguous (copies when nb > 1), the segment outputs and the tail's copied
    into y."""
    if not head:
        return 0.0
    b = 2 * head * dv * s * nb  # y[:, :head] = ys
    if tail:
        b += 2 * tail * dv * s * nb  # y[:, head:] = yt
    if nb > 1:
        b += 2 * (head if tail else 0) * widths * s * nb  # x[:, :head].reshape(...).contiguous()
        b += 2 * tail * widths * s * nb  # x[:, head:].contiguous()
    return b


# ----------------------------------------------------------------------------- log


def log_state_elems(d_k: int, d_v: int) -> int:
    """float32 elements of one row's log state: m [d_k], S [d_k, d_v], z [d_k]."""
    return d_k * d_v + 2 * d_k


def log_cost(
    phase: str, *, n: int = 1, d_k: int, d_v: int, batch: int = 1, itemsize: int = 2
) -> Cost:
    """One call of the log kernel (``log_attention`` / ``decode_step("log", ...)``)."""
    _phase(phase)
    s, B = itemsize, BLOCK
    dk, dv = next_pow2(d_k), next_pow2(d_v)
    st = 4 * log_state_elems(d_k, d_v)  # bytes of one row's state
    nb = batch
    if phase == "decode":
        br = 1
        while br < 16 and 2 * br * dk * dv <= DECODE_TILE:
            br *= 2
        rows = _pad(nb, br)  # padded rows of the last program execute too
        io = nb * (2 * d_k + 2 * d_v) * s
        return Cost(
            hbm_bytes=io + 2 * nb * st, io_bytes=io, state_bytes=2 * nb * st,
            working_set=nb * st,
            flops=rows * (5 * dk * dv + 16 * dk + 3 * dv), sfu=rows * 4 * dk, launches=1,
            parts={"rows_per_program": br},
        )  # fmt: skip
    # absorbing one key into the state (``_absorb``), per key
    absorb_f = 2 * dk * dv + 4 * dk + (dk * dv + 4 * dk) / B
    absorb_e = dk + dk / B
    if phase == "noncausal":
        io = nb * n * (2 * d_k + 2 * d_v) * s
        query_f = 2 * dk * dv + 6 * dk + dv
        return Cost(
            hbm_bytes=io + 2 * nb * st, io_bytes=io, state_bytes=2 * nb * st,
            reload_bytes=nb * math.ceil(n / B) * st, working_set=nb * st,
            flops=nb * n * (absorb_f + query_f), sfu=nb * n * (absorb_e + dk), launches=2,
        )  # fmt: skip
    # causal: one program per (row, segment) walks its chunks; per token:
    tok_f = (4 * dk * dv + 3 * B * d_k + 4 * B * dv + 14 * dk + 2 * d_k + 6 * dv + B
             + (dk * dv + 4 * dk) / B)  # fmt: skip
    tok_e = B * d_k + 2 * dk + dk / B
    io = nb * n * (2 * d_k + 2 * d_v) * s
    seg = segments(nb, n, B, LOG_MAX_SEGMENTS * d_k * (d_v + 2), LOG_MAX_SEGMENTS)
    head, tail = _split(nb, n, seg)
    programs = nb * seg if head else nb
    c = Cost(
        hbm_bytes=io + 2 * programs * st + nb * st, io_bytes=io, state_bytes=2 * programs * st,
        working_set=programs * st, flops=nb * n * tok_f, sfu=nb * n * tok_e,
        launches=1 + (1 if head and tail else 0),
        parts={"segments": seg, "head": head},
    )  # fmt: skip
    if head:
        # _log_state over the head (k, v read again), the segment states written, and the
        # PyTorch combination: [nb, seg, seg + 1, d_k, d_v] float32 products written, read
        # and written (where), read (sum); exps of the [nb, seg, seg + 1, d_k] weights.
        big = nb * seg * (seg + 1) * d_k * (d_v + 1) * 4
        extra = nb * head * (d_k + d_v) * s + nb * seg * st + 4 * big
        extra += _wrapper_copies(nb, head, tail, 2 * d_k + d_v, d_v, s)
        c = c + Cost(
            hbm_bytes=extra, flops=nb * head * absorb_f + 2 * big / 4,
            sfu=nb * head * absorb_e + nb * seg * (seg + 1) * d_k, launches=1,
        )  # fmt: skip
    return c


# ------------------------------------------------------------------------ featured


def featured_state_elems(m: int, d_v: int) -> int:
    """float32 elements of one row's featured state: S [m, d_v], z [m]."""
    return m * d_v + m


def featured_cost(
    phase: str, *, n: int = 1, m: int, d_v: int, width: int, pmax: int, batch: int = 1,
    itemsize: int = 2,
) -> Cost:  # fmt: skip
    """One call of the featured kernels: ``m`` features of inputs ``width`` wide
    (``pmax`` = 0: given features, ``width = m``; else monomials of degree <= ``pmax``
    built from ``width = d_k`` inputs)."""
    _phase(phase)
    s, B = itemsize, BLOCK
    dv = next_pow2(d_v)
    st = 4 * featured_state_elems(m, d_v)
    nb = batch
    feat_q = (pmax + 1) if pmax else 0  # multiplies per query feature (the weight too)
    feat_k = pmax
    # idx loaded for q and k, w for q: read from HBM once, then L2-resident (every program
    # reads them), so their re-reads are not counted
    tables = (2 * pmax + 1) * m * 4 if pmax else 0
    if phase == "decode":
        bf = max(16, min(BLOCK_F, DECODE_TILE // dv))
        br = 1
        while br < 16 and 2 * br * bf * dv <= DECODE_TILE:
            br *= 2
        mp, rows = _pad(m, bf), _pad(nb, br)
        io = nb * (2 * width + 2 * d_v) * s
        return Cost(
            hbm_bytes=io + 2 * nb * st + tables, io_bytes=io, state_bytes=2 * nb * st,
            working_set=nb * st,
            flops=rows * (4 * mp * dv + (feat_q + feat_k + 5) * mp + 3 * dv), sfu=0,
            launches=1, parts={"rows_per_program": br, "feature_block": bf},
        )  # fmt: skip
    mp = _pad(m, BLOCK_F)
    nfb = mp // BLOCK_F
    keys_f = feat_k * mp + 2 * mp * dv + mp  # _featured_state, per key
    if phase == "noncausal":
        io = nb * n * (2 * width + 2 * d_v) * s
        query_f = feat_q * mp + 2 * mp * dv + 2 * mp + dv
        return Cost(
            hbm_bytes=io + 2 * nb * st + tables, io_bytes=io, state_bytes=2 * nb * st,
            reload_bytes=nb * n * (nfb - 1) * (width + d_v) * s + nb * math.ceil(n / B) * st,
            working_set=nb * st, flops=nb * n * (keys_f + query_f), launches=2,
        )  # fmt: skip
    tok_f = ((feat_q + feat_k) * mp + 2 * B * mp + 4 * mp * dv + 3 * mp + 2 * B * dv + 2 * B
             + 2 * dv + (mp * dv + mp) / B)  # fmt: skip
    io = nb * n * (2 * width + 2 * d_v) * s
    seg = segments(nb, n, B, 2 * (m + 1) * max(d_v, 1))
    head, tail = _split(nb, n, seg)
    programs = nb * seg if head else nb
    chunks = nb * math.ceil(head / (seg * B)) * seg + nb * math.ceil(tail / B)
    c = Cost(
        hbm_bytes=io + 2 * programs * st + nb * st + tables, io_bytes=io,
        state_bytes=2 * programs * st,
        reload_bytes=chunks * 2 * st, working_set=programs * st,
        flops=nb * n * tok_f, launches=1 + (1 if head and tail else 0),
        parts={"segments": seg, "head": head},
    )  # fmt: skip
    if head:
        # _featured_state over the head (k, v read once from HBM, once more per feature
        # block from L2), the totals written, then cat + cumsum in PyTorch (5 passes).
        extra = nb * head * (width + d_v) * s + 5 * nb * seg * st
        extra += _wrapper_copies(nb, head, tail, 2 * width + d_v, d_v, s)
        c = c + Cost(
            hbm_bytes=extra, reload_bytes=nb * head * (nfb - 1) * (width + d_v) * s,
            flops=nb * head * keys_f + nb * seg * st / 4, launches=1,
        )  # fmt: skip
    return c


def taylor_features(d_k: int, degree: int) -> int:
    """m = C(d_k + P, P): the packed monomials of degree <= P."""
    return math.comb(d_k + degree, degree)


def polynomial_cost(
    phase: str, *, n: int = 1, d_k: int, d_v: int, coeffs: Sequence[float], batch: int = 1,
    itemsize: int = 2,
) -> Cost:  # fmt: skip
    """``polynomial_attention``: the powers with ``c_p != 0``."""
    powers = [p for p, c in enumerate(coeffs) if c != 0]
    m = sum(math.comb(d_k + p - 1, p) for p in powers)
    return featured_cost(phase, n=n, m=m, d_v=d_v, width=d_k, pmax=max(max(powers), 1),
                         batch=batch, itemsize=itemsize)  # fmt: skip


def taylor_cost(
    phase: str, *, n: int = 1, d_k: int, d_v: int, degree: int, batch: int = 1,
    itemsize: int = 2,
) -> Cost:  # fmt: skip
    """``taylor_attention(degree=P)``: every power 0..P."""
    return polynomial_cost(phase, n=n, d_k=d_k, d_v=d_v, coeffs=[1.0] * (degree + 1),
                           batch=batch, itemsize=itemsize)  # fmt: skip


def linear_cost(
    phase: str, *, n: int = 1, m: int, d_v: int, batch: int = 1, itemsize: int = 2
) -> Cost:
    """``linear_attention`` over ``m`` given features."""
    return featured_cost(phase, n=n, m=m, d_v=d_v, width=m, pmax=0, batch=batch,
                         itemsize=itemsize)  # fmt: skip


# ---------------------------------------------------------------------- recurrence

#: FLOPs and SFU ops of one signed log-add-exp combine (``_combine``), and of turning a
#: value into (log, sign) (``_log_sign``).
COMBINE_FLOPS, COMBINE_SFU = 18, 2
LOGSIGN_FLOPS, LOGSIGN_SFU = 4, 1


def recurrence_state_elems() -> int:
    """float32 elements of one row's recurrence state: log|x| and sign x."""
    return 2


def recurrence_cost(phase: str, *, n: int = 1, rows: int, itemsize: int = 2) -> Cost:
    """``linear_recurrence`` (``"prefill"``: ``rows`` sequences of ``n`` steps) or one
    ``decode_step("recurrence", ...)`` over ``rows`` sequences."""
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase: the recurrence has 'prefill' and 'decode', got {phase!r}")
    s = itemsize
    st = 4 * recurrence_state_elems()
    if phase == "decode":
        io = rows * 3 * s
        per = 2 * LOGSIGN_FLOPS + COMBINE_FLOPS + 6  # nan checks, exp, product, where
        return Cost(
            hbm_bytes=io + 2 * rows * st, io_bytes=io, state_bytes=2 * rows * st,
            working_set=rows * st, flops=_pad(rows, BLOCK_STEP) * per,
            sfu=_pad(rows, BLOCK_STEP) * (2 * LOGSIGN_SFU + COMBINE_SFU + 1), launches=1,
        )  # fmt: skip
    lv = BLOCK_T.bit_length() - 1
    steps = _pad(rows, 16) * _pad(n, BLOCK_T)  # BLOCK_R rows x BLOCK_T steps per tile
    per = 2 * LOGSIGN_FLOPS + lv * (COMBINE_FLOPS + 4) + COMBINE_FLOPS + 14
    io = rows * n * 3 * s
    return Cost(
        hbm_bytes=io, io_bytes=io, flops=steps * per,
        sfu=steps * (2 * LOGSIGN_SFU + (lv + 1) * COMBINE_SFU + 1), launches=1,
    )  # fmt: skip


def state_bytes(kind: str, *, d_k: int = 0, d_v: int = 0, m: int = 0) -> int:
    """Bytes one row's KernelState holds (``kind``: log, polynomial/taylor, linear,
    recurrence; ``m`` the features)."""
    if kind == "log":
        return 4 * log_state_elems(d_k, d_v)
    if kind in ("taylor", "polynomial", "linear"):
        return 4 * featured_state_elems(m, d_v)
    if kind == "recurrence":
        return 4 * recurrence_state_elems()
    raise ValueError(f"kind: unknown {kind!r}")


def _phase(phase: str) -> None:
    if phase not in PHASES:
        raise ValueError(f"phase: expected one of {PHASES}, got {phase!r}")


# ------------------------------------------------------------------------ roofline


def roofline(cost: Cost, peak: Peak = H200) -> dict:
    """Lower-bound seconds per resource and overall: ``{"hbm_s", "fp32_s", "sfu_s",
    "time_s", "bound"}`` (``bound``: the resource that sets ``time_s``). Reloads count
    toward HBM only when the working set exceeds the L2. Launch overhead is not modelled."""
    mem = cost.hbm_bytes + (cost.reload_bytes if cost.working_set > peak.l2 else 0.0)
    t = {"hbm": mem / peak.hbm, "fp32": cost.flops / peak.fp32, "sfu": cost.sfu / peak.sfu}
    bound = max(t, key=lambda r: t[r])
    return {"hbm_s": t["hbm"], "fp32_s": t["fp32"], "sfu_s": t["sfu"], "time_s": t[bound],
            "bound": bound, "reloads_in_hbm": cost.working_set > peak.l2}  # fmt: skip


def fraction(measured_s: float, cost: Cost, peak: Peak = H200) -> float:
    """Roofline time / measured time: 1 at the roofline, 0.1 ten times slower."""
    return roofline(cost, peak)["time_s"] / measured_s


# ---------------------------------------------------------------------- the tables


def issue_cases() -> list[tuple[str, str, dict, Cost]]:
    """(phase, label, sizes, cost) at the sizes of the GPU-speed issue: decode of
    B x H = 1024 rows at d = 16 and 64 (the state does not depend on n = 64K), causal and
    non-causal prefill of n = 64K tokens for 1 and 32 heads; fp16/bf16 storage."""
    out = []
    n = 65536
    for d in (16, 64):
        kinds: list[tuple[str, object]] = [
            ("log", lambda ph, nb, d=d: log_cost(ph, n=n, d_k=d, d_v=d, batch=nb)),
            ("taylor P=2", lambda ph, nb, d=d: taylor_cost(ph, n=n, d_k=d, d_v=d, degree=2,
                                                          batch=nb)),
            ("taylor P=3", lambda ph, nb, d=d: taylor_cost(ph, n=n, d_k=d, d_v=d, degree=3,
                                                          batch=nb)),
            ("linear m=d", lambda ph, nb, d=d: linear_cost(ph, n=n, m=d, d_v=d, batch=nb)),
            ("recurrence", lambda ph, nb, d=d: recurrence_cost(
                ph if ph == "decode" else "prefill", n=n, rows=nb * d)),
        ]  # fmt: skip
        for label, fn in kinds:
            out.append(("decode", label, {"rows": 1024, "d": d}, fn("decode", 1024)))  # type: ignore[operator]
            for heads in (1, 32):
                out.append(("prefill", label, {"heads": heads, "d": d, "n": n},
                            fn("prefill", heads)))  # type: ignore[operator]  # fmt: skip
                if label != "recurrence":
                    out.append(("noncausal", label, {"heads": heads, "d": d, "n": n},
                                fn("noncausal", heads)))  # type: ignore[operator]  # fmt: skip
    return out


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _us(x: float) -> str:
    return f"{x * 1e6:.3g}"


def markdown(peak: Peak = H200) -> str:
    """The roofline tables of docs/kernels.md."""
    lines = []
    for phase, title in (("decode", "Decode step, B x H = 1024 rows (any n)"),
                         ("prefill", "Causal prefill, n = 65,536"),
                         ("noncausal", "Non-causal, n = 65,536 queries and keys")):  # fmt: skip
        lines += [f"**{title}** (fp16/bf16 storage, d_k = d_v = d):", ""]
        head = "| kernel | d | " + ("" if phase == "decode" else "heads | ")
        head += "HBM bytes | state bytes (r+w) | FLOPs | exp/log | HBM µs | fp32 µs | SFU µs | "
        head += "bound µs | bound by |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for ph, label, sz, c in issue_cases():
            if ph != phase:
                continue
            r = roofline(c, peak)
            spill = r["reloads_in_hbm"] and c.reload_bytes > 0
            mem = c.hbm_bytes + (c.reload_bytes if spill else 0)
            cells = [label, str(sz["d"])] + ([] if phase == "decode" else [str(sz["heads"])])
            limiter = {"hbm": "memory", "fp32": "fp32 FLOPs", "sfu": "SFU (exp)"}[r["bound"]]
            cells += [_fmt(mem) + (" (reloads)" if spill else ""),
                      _fmt(c.state_bytes), _fmt(c.flops), _fmt(c.sfu), _us(r["hbm_s"]),
                      _us(r["fp32_s"]), _us(r["sfu_s"]), _us(r["time_s"]), limiter]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results"
                    / "roofline_h200.json")  # fmt: skip
    args = ap.parse_args()
    rows = [{"phase": ph, "kernel": label, **sz, **{k: v for k, v in asdict(c).items()
             if k != "parts"}, "parts": c.parts, **roofline(c)}
            for ph, label, sz, c in issue_cases()]  # fmt: skip
    args.json.parent.mkdir(exist_ok=True)
    args.json.write_text(json.dumps({"peak": asdict(H200), "rows": rows}, indent=2))
    print(markdown())


__all__ = [
    "Peak", "H200", "Cost", "log_cost", "featured_cost", "taylor_cost", "polynomial_cost",
    "linear_cost", "recurrence_cost", "state_bytes", "roofline", "fraction", "issue_cases",
    "markdown",
]  # fmt: skip

if __name__ == "__main__":
    main()
