import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_readme_demo_runs_end_to_end(tmp_path):
    """The README's demo entry point (demo.py), shortened to 2 epochs."""
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "demo.py"),
            "--out",
            str(tmp_path / "demo"),
            "--epochs",
            "2",
            "--phantoms",
            "8",
            "--samples",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "demo" / "eval" / "summary.json").read_text())
    assert s["n"] == 20 and 0.0 <= s["dice_mean"] <= 1.0
    assert (tmp_path / "demo" / "run" / "training_curve.png").exists()
    assert "test Dice" in r.stdout
