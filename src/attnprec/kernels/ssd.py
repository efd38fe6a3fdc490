"""The SSD chunk kernel's entry for the method table: :func:`attnprec.kernels.ssm.ssd` and
its declaration ``precision_for`` (the audit reads a kernel's declaration from its
module; SSD's schedule block, :data:`~attnprec.kernels.ssm.SSD_T`, differs from the
selective scan's)."""

from __future__ import annotations

from attnprec.kernels.ssm import SSD_T, ssd
from attnprec.kernels.ssm import ssd_precision_for as precision_for

__all__ = ["ssd", "precision_for", "SSD_T"]
