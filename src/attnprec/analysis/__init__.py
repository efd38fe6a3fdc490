"""attnprec.analysis: formats and precisions, certified references, error bounds, the audit."""

from attnprec.analysis.precision import FORMATS, Format, Precision, round_to
from attnprec.analysis.reference import Reference, reference

__all__ = [
    "FORMATS",
    "Format",
    "Precision",
    "round_to",
    "Reference",
    "reference",
]
