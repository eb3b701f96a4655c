"""Shared fixtures: offline mode, the repo root, and the tiny model built once per test session."""

import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Nothing in the tests may reach the network: a Hub id must fail fast, not retry for half a minute.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}
os.environ.update(OFFLINE_ENV)
# Under pytest-xdist (`-n 2`, the README's test command) every worker runs its tests and their scripts on its share
# of the cores: two workers with a thread per core each would put twice as many busy threads as cores on the CPU,
# and OpenMP threads that spin while they wait make that several times slower (benchmarks/README.md), so idle
# threads sleep. The scripts launched by a test inherit both settings; a user's own values are kept.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _threads = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, _threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch  # noqa: E402

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# transformers and datasets create their stderr log handler on first use, holding whatever sys.stderr is then. If
# that happens inside a test that uses capsys, the handler keeps that test's stream, which pytest closes after it,
# and every later log line fails with "--- Logging error ---" (a traceback in the next capsys test's stderr). Made
# here, they hold pytest's session-wide capture stream.
import datasets.utils.logging  # noqa: E402
import transformers.utils.logging  # noqa: E402

transformers.utils.logging.get_logger("transformers")
datasets.utils.logging.get_logger("datasets")


# Under xdist the test files go to the workers in collection order (pytest.ini: --dist loadfile
# --no-loadscope-reorder). The longest files are collected first, so that none of them starts late and runs on alone
# while the other worker idles; the pipeline file alone is about a third of the suite.
LONGEST_FIRST = ("test_pipeline.py", "test_deepspeed.py", "test_interrupts.py", "test_ppo.py", "test_benchmarks.py",
                 "test_reward_model.py", "test_sft.py", "test_reliability.py", "test_layouts.py")


def pytest_collection_modifyitems(config, items):
    if _WORKERS > 1:
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order stays


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random Llama with a tokenizer trained on the sample data (common/tiny_model.py)."""
    from common.tiny_model import main

    return main(["--output_dir", str(tmp_path_factory.mktemp("tiny") / "model")])


TORCHRUN = ["-m", "torch.distributed.run", "--nproc_per_node", "2"]  # run_script(*TORCHRUN, "--master_port", ...)


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


def kill_after_checkpoint(cmd: list[str], checkpoint: str, timeout: float = 300) -> None:
    """Start ``cmd``, SIGKILL it as soon as ``checkpoint`` is complete."""
    proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env={**os.environ, **OFFLINE_ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(os.path.join(checkpoint, "trainer_state.json")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def mark_checkpoint(checkpoint: str) -> str:
    """Put a file into ``checkpoint`` that no run writes, before resuming from it. A resume only saves later steps;
    a run that ignored the checkpoint and started over saves this step again (``replace_folder``), and the file is
    gone. The weights and the metrics' step list cannot tell the two apart: every run here is deterministic."""
    path = os.path.join(checkpoint, "resumed_from.marker")
    with open(path, "w", encoding="utf-8"):
        pass
    return path


def max_weight_diff(a_dir: str, b_dir: str, name: str) -> float:
    from safetensors.torch import load_file

    a, b = load_file(os.path.join(a_dir, name)), load_file(os.path.join(b_dir, name))
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)
