"""The floating-point formats' parameters, torch-free (the command line reads them at once;
:mod:`attnprec.analysis.precision` builds its :class:`~attnprec.analysis.precision.Format`
objects from them)."""

from __future__ import annotations

__all__ = ["FORMAT_SPECS", "format_row"]

#: name -> (significand bits p with the implicit one, emin, emax, max (None: the largest
#: normal), has inf, torch dtype attribute or None)
FORMAT_SPECS: dict[str, tuple[int, int, int, float | None, bool, str | None]] = {
    "fp64": (53, -1022, 1023, None, True, "float64"),
    "fp32": (24, -126, 127, None, True, "float32"),
    "tf32": (11, -126, 127, None, True, None),
    "fp16": (11, -14, 15, None, True, "float16"),
    "bf16": (8, -126, 127, None, True, "bfloat16"),
    "e4m3": (4, -6, 8, 448.0, False, "float8_e4m3fn"),
    "e5m2": (3, -14, 15, None, True, "float8_e5m2"),
}


def format_row(name: str) -> tuple[int, float, float, float, float]:
    """(p, u = 2^-p, max, min normal, min subnormal) of format ``name``."""
    p, emin, emax, mx, _, _ = FORMAT_SPECS[name]
    top = (2.0 - 2.0 ** (1 - p)) * 2.0**emax if mx is None else mx
    return p, 2.0**-p, top, 2.0**emin, 2.0 ** (emin - p + 1)
