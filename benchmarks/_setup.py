"""What every benchmark script does before anything else: each starts with `from _setup import ROOT`, which works
because a script run as `python benchmarks/NAME.py` has benchmarks/ on sys.path (tests loading one by its path put it
there too).

- the repository root (ROOT) on sys.path, so `common` and the training scripts import;
- offline: no Hub or datasets download (the models and data are local), no tokenizer thread pool;
- OMP_WAIT_POLICY=PASSIVE: OpenMP threads that spin while they wait for each other are several times slower on a CPU
  shared with other jobs (benchmarks/README.md); passive waiting keeps the figures stable. It has to be set before
  torch loads (the scripts import it inside their functions); both sides of a comparison run under it.

Every variable is a default: one exported beforehand is kept (`OMP_WAIT_POLICY=ACTIVE` measures torch's default).
Standard library only: benchmarks/trl_ppo_baseline.py imports it in the TRL 1.12 venv too.

`patched` is here too: the timing scripts wrap library methods with it and get the originals back afterwards.
"""

from __future__ import annotations

import contextlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_ABSENT = object()


@contextlib.contextmanager
def patched(*patches: tuple[object, str, object]):
    """Sets each ``(owner, name, value)`` (a class, module or object attribute) for the block, then puts back what
    the owner itself held, also when the block raises: an attribute it only inherited is deleted again, so the
    inherited one shows through as before."""
    saved = []
    try:
        for owner, name, value in patches:
            saved.append((owner, name, vars(owner).get(name, _ABSENT)))
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, old in reversed(saved):
            if old is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, old)
