"""The examples run (tiny settings, a subprocess each) and leave a run folder ``ts.load_run``
reads."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tinysubspace as ts

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CASES = {
    "own_loop.py": ([], ["--steps", "12", "--k", "2"]),
    "lightning_callback.py": (["lightning"], ["--steps", "8"]),
    "hf_trainer.py": (["transformers", "accelerate"], ["--steps", "6"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs_and_writes_a_run_folder(name, tmp_path):
    needs, args = CASES[name]
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)} (pip install tinysubspace[{needs[0]}])")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run = ts.load_run(out)
    assert len(run.metrics) >= 2 and run.metrics["step"].iloc[0] == 0
    assert run.status["state"] == "finished"
    assert run.metrics["hessian/f_top"].between(0, 1).all()


def test_the_readme_shows_the_tracker_and_names_its_docs():
    import re

    root = EXAMPLES.parent
    readme = (root / "README.md").read_text()
    assert "ts.SubspaceTracker(" in readme and "tracker.on_step(step)" in readme
    named = set(re.findall(r"docs/[\w-]+\.md", readme))
    assert {"docs/own-loop.md", "docs/beyond-the-hessian.md"} <= named
    assert all((root / path).exists() for path in named), sorted(named)
    own_loop = (root / "docs" / "own-loop.md").read_text()
    assert set(re.findall(r"examples/\w+\.py", own_loop)) == {f"examples/{n}" for n in CASES}
