"""The complete example of docs/testing_guide.md runs, as shown, and passes."""

import os
import re
import subprocess
import sys
from pathlib import Path

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "testing_guide.md"


def example_source() -> str:
    text = GUIDE.read_text(encoding="utf-8")
    m = re.search(r"```\{code-block\} python\n:name: guide-example\n\n(.*?)```", text, re.S)
    assert m, "docs/testing_guide.md: the guide-example block is missing"
    return m.group(1)


def test_guide_example_passes(tmp_path):
    path = tmp_path / "test_user_attention.py"
    path.write_text(example_source(), encoding="utf-8")
    # Run as a user would: pytest on their own file, outside this project's conftest.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "3 passed" in r.stdout
