"""Shared fixtures: offline mode, the repo root, and the tiny model built once per test session."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Nothing in the tests may reach the network: a Hub id must fail fast, not retry for half a minute.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}
os.environ.update(OFFLINE_ENV)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random Llama with a tokenizer trained on the sample data (common/tiny_model.py)."""
    from common.tiny_model import main

    return main(["--output_dir", str(tmp_path_factory.mktemp("tiny") / "model")])


def run_script(*args, check: bool = True, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a project script as a user would (``python script.py ...``) from the repo root."""
    proc = subprocess.run(
        [sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **OFFLINE_ENV, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} exited {proc.returncode}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """A user mistake: non-zero exit, one `error:` message naming what matters, and no traceback."""
    assert proc.returncode != 0, f"expected failure, got exit 0\n{proc.stdout[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors, f"no 'error:' line in stderr:\n{proc.stderr[-3000:]}"
    message = proc.stderr[proc.stderr.index("error: "):]
    for needle in needles:
        assert needle in message, f"{needle!r} not in error message:\n{message}"
    return message
