"""The install shadows nothing: outside the checkout, the only top-level name it gives the environment is minbert,
and an unrelated top-level `evaluate` (Hugging Face's, say), `data`, `train` ... does not break the console scripts
or the Python API."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERIC = ("evaluate", "train", "data", "optim", "heads", "training")


def python(code: str, cwd: Path, path: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_only_minbert_is_installed_at_the_top_level(tmp_path):
    found = python(f"import importlib.util, json; print(json.dumps({{n: getattr(importlib.util.find_spec(n), "
                   f"'origin', None) for n in {GENERIC!r} + ('minbert',)}}))", tmp_path)
    origins = json.loads(found.stdout)
    if origins["minbert"] is None or not Path(origins["minbert"]).is_relative_to(ROOT):
        pytest.skip("this checkout is not the installed minbert (pip install -e . installs it)")
    assert [n for n in GENERIC if origins[n] and Path(origins[n]).is_relative_to(ROOT)] == []


def test_an_unrelated_top_level_evaluate_breaks_neither_the_scripts_nor_the_api(tmp_path):
    if shutil.which("minbert-evaluate") is None:
        pytest.skip("the console scripts are not installed (pip install -e . installs them)")
    fake = tmp_path / "site"
    for name in GENERIC:  # what other distributions put at the top level
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text(f"FAKE = {name!r}\n")
    api = python("import evaluate, data; assert evaluate.FAKE == 'evaluate' and data.FAKE == 'data'\n"
                 "from minbert.heads import MultitaskBert\nfrom minbert.training.train import main, train\n"
                 "from minbert.training.config import TrainConfig\nfrom minbert.optim import aggregator\n"
                 "print(TrainConfig.from_flags(aggregator='cagrad').methods.aggregator)", tmp_path, str(fake))
    assert api.returncode == 0 and api.stdout.strip() == "cagrad", api.stderr[-2000:]
    for script in ("minbert-train", "minbert-evaluate"):
        run = subprocess.run([script, "--help"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(fake)},
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and run.stdout.startswith("usage:"), run.stderr[-2000:]
