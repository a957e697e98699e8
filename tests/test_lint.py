"""The tree passes ruff's pyflakes checks (configured in pyproject.toml): no unused or undefined names."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from optional import needs

REPO = Path(__file__).resolve().parents[1]


def test_ruff_finds_no_unused_or_undefined_names():
    needs("ruff", "the dev extra: pip install -e '.[dev]'")
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    done = subprocess.run([ruff, "check", "--output-format", "concise", str(REPO)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
