"""A short coverage-guided fuzzing run of each target (tests/fuzz.py), from the committed seed corpus.
The long run is documented in tests/fuzz.py and docs/collaboration.md."""

import os
import shutil
import subprocess
import sys

import atheris  # noqa: F401  (installed by make test: a missing fuzzer fails here, it is not skipped)
import pytest

pytestmark = pytest.mark.slow
HERE = os.path.dirname(__file__)
RUNS = {"wire": 1_000_000, "gguf": 20_000, "handler": 300_000}


@pytest.mark.parametrize("target", sorted(RUNS))
def test_fuzz_target_finds_nothing(target, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(os.path.join(HERE, "fuzz_corpus", target), corpus)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "fuzz.py"), target, f"-runs={RUNS[target]}",
                           "-max_len=8192", "-seed=1", f"-artifact_prefix={tmp_path}/", str(corpus)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done" in proc.stderr and not list(tmp_path.glob("crash-*"))
