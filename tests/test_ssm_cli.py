"""The attnprec command on the state-space methods: the method table lists them, and the
built-in kernels' audit runs from the table's records and exits 0."""

import pytest

from attnprec.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_methods_lists_the_state_space_methods(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    for name in ("selective_scan", "ssd", "ssm"):
        assert name in rows and "only" in rows[name]
    assert "delta" in rows["selective_scan"] and "dt" in rows["ssd"]


@pytest.mark.parametrize("method", ["selective_scan", "ssd"])
def test_audit_of_the_builtin_kernel_exits_0(capsys, method):
    argv = ["audit", "--method", method, "--n", "20", "--d", "5", "--dtype", "bf16"]
    code, out, _ = run(capsys, *argv, "--family", "typical", "--family", "outliers", "--quiet")
    assert code == 0, out
    assert "2 cases audited, 0 not ok" in out and "0 violated" in out


def test_a_user_function_of_a_state_space_method(capsys):
    argv = ["audit", "--kernel", "attnprec.attention:selective_scan_attention", "--method"]
    argv += ["selective_scan", "--dtype", "fp16", "--family", "cancel", "--n", "12", "--d", "3"]
    argv += ["--block", "64"]  # its chunks: span sums of up to 64 log-gates
    code, out, _ = run(capsys, *argv, "--quiet")
    assert code == 0, out


def test_ssm_has_no_builtin_kernel(capsys):
    with pytest.raises(SystemExit) as e:
        main(["audit", "--method", "ssm"])
    assert e.value.code == 2
    assert "--method: no built-in kernel computes 'ssm'" in capsys.readouterr().err
