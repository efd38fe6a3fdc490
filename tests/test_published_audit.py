"""benchmarks/published_audit.py without the network: its loader, adapters and audit core on
local functions standing in for third-party ones."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from attnprec.analysis.precision import Precision

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "published_audit.py"
_spec = importlib.util.spec_from_file_location("published_audit", _PATH)
assert _spec is not None and _spec.loader is not None
PA = sys.modules.setdefault("published_audit", importlib.util.module_from_spec(_spec))
if not hasattr(PA, "run_case"):
    _spec.loader.exec_module(PA)


def _softmax64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, z16: bool) -> torch.Tensor:
    """Causal softmax attention in float64 on [..., n, d]; ``z16``: the normalizer rounded
    to fp16 (the defect the audit must flag in fp32 storage)."""
    s = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
    n = s.shape[-1]
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -torch.inf)
    w = torch.exp(s - s.amax(-1, keepdim=True))
    z = w.sum(-1, keepdim=True)
    if z16:
        z = z.half().double()
    return (w @ v.double() / z).to(q.dtype)


def _impl(z16: bool, layout: str = "bhtd", group: int = 1) -> PA.Impl:
    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_: object) -> torch.Tensor:
        if layout == "bthd":  # the stand-in works in [B, H, T, D]
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        o = _softmax64(q, k, v, z16)
        return o.transpose(1, 2) if layout == "bthd" else o

    return PA.Impl(
        f"local softmax (z16={z16}, {layout}, group={group})", "local", "softmax", layout,
        call, lambda i: {"causal": True}, lambda dt: Precision(dt), "stand-in", group=group,
    )  # fmt: skip


@pytest.fixture(autouse=True)
def _small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PA, "T", 16)  # positions: keeps each audit under a second or two


@pytest.mark.parametrize("layout, group", [("bhtd", 1), ("bthd", 2)])
def test_a_correct_naive_softmax_passes(layout: str, group: int) -> None:
    row = PA.run_case(_impl(False, layout, group), "typical", "fp32", fingerprint=True)
    for label in ("default", "declared"):
        assert row[label]["verdict"] == "ok", row[label]
        assert row[label]["counts"]["within"] == row[label]["elements"] == 4 * 16 * 16
    met = {(r["compute"], r["accumulate"]): r["met"] for r in row["fingerprint"]["rows"]}
    assert met[("fp64", "fp64")], row["fingerprint"]  # float64 inside, one rounding


def test_an_fp16_normalizer_is_flagged() -> None:
    row = PA.run_case(_impl(True), "typical", "fp32", fingerprint=True)
    assert row["default"]["verdict"] == "VIOLATED"
    assert row["default"]["counts"]["violated"] > 0
    assert row["default"]["tightness"] < 1
    # the fingerprint sees the normalizer's precision: fp32 compute is not met
    met = {(r["compute"], r["accumulate"]): r["met"] for r in row["fingerprint"]["rows"]}
    assert not met[("fp32", "fp32")] and not met[("fp64", "fp64")]
    line = PA.tables([row], _META).splitlines()
    assert any("VIOLATED" in s and "z16=True" in s for s in line)


_META = {"date": "-", "seconds": 0.0, "machine": "-", "torch": "-", "provenance": {}}


def test_load_runs_only_the_named_definitions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "pkg" / "mod.py"
    src.parent.mkdir()
    src.write_text(
        "import a_module_that_does_not_exist\n"
        "raise RuntimeError('top-level code ran')\n"
        "def double(x):\n    return 2 * torch.as_tensor(x)\n"
    )
    monkeypatch.setitem(PA.FILES, "local", "pkg/mod.py")
    fn = PA.load(tmp_path, "local", ("double",))["double"]
    assert fn(3).item() == 6
    with pytest.raises(SystemExit, match="no top-level"):
        PA.load(tmp_path, "local", ("triple",))
