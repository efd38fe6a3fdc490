"""H3 through the command and the testing layer: the method table lists it, the built-in
audit (its PyTorch implementation under its declaration) runs and exits 0, and the
Hypothesis strategy draws valid cases."""

import pytest
import torch
from hypothesis import given

from attnprec.analysis.bounds import attention_error_bound
from attnprec.analysis.reference import reference
from attnprec.cli import main
from attnprec.kernels.h3 import CHUNK, h3_attention, precision_for
from attnprec.testing import attention_inputs


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_methods_lists_h3(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert "h3" in rows and "only" in rows["h3"] and "shift" in rows["h3"]


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_builtin_audit_exits_0(capsys, dtype):
    argv = ["audit", "--method", "h3", "--n", "40", "--d", "5", "--dtype", dtype, "--quiet"]
    code, out, _ = run(capsys, *argv, "--family", "typical", "--family", "cancel")
    assert code == 0, out
    assert "2 cases audited, 0 not ok" in out and "0 violated" in out


def test_declaration_of_the_builtin_implementation():
    p = precision_for(torch.bfloat16)
    assert p.storage.name == "bf16" and p.compute.name == "fp32" and p.block == CHUNK
    with pytest.raises(TypeError, match="dtype"):
        precision_for(torch.float64)
    x = torch.ones(3, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="q"):
        h3_attention(x, x, x, shift=torch.ones(1), log_decay=torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@given(case=attention_inputs("h3", max_n=40, max_d=4, batches=((), (2,))))
def test_drawn_cases_within_the_declared_bound(dtype, case):
    # the strategy's draws, in each storage dtype, through the built-in implementation
    q, k, v = (x.to(dtype) for x in (case.q, case.k, case.v))
    y = h3_attention(q, k, v, **case.params)
    eb = attention_error_bound("h3", q, k, v, precision_for(dtype), **case.params)
    assert bool(reference("h3", q, k, v, **case.params).contains(y, eb.total).all())
