"""Packaging: the type stub matches the extension, the sdist builds a working wheel, --version."""

import ast
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import cecollm
from cecollm import _core, cli

ROOT = Path(__file__).resolve().parent.parent


def stub_names() -> tuple[set, dict]:
    tree = ast.parse((ROOT / "cecollm" / "_core.pyi").read_text())
    names, members = set(), {}
    for node in tree.body:
        if isinstance(node, ast.AnnAssign):
            names.add(node.target.id)
        elif isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
            members[node.name] = {n.name for n in node.body if isinstance(n, ast.FunctionDef) and n.name != "__init__"}
    return names - {"F32"}, members


def test_stub_matches_the_extension():
    names, members = stub_names()
    assert names == {n for n in dir(_core) if not n.startswith("_")}
    for cls, attrs in members.items():
        if cls != "CoreError":
            assert attrs == {n for n in dir(getattr(_core, cls)) if not n.startswith("_")}, cls
    assert (ROOT / "cecollm" / "py.typed").exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"cecollm {cecollm.__version__}"


@pytest.mark.slow
def test_sdist_builds_a_working_wheel(tmp_path):
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True)  # fmt: skip
    [sdist] = tmp_path.glob("cecollm-*.tar.gz")
    with tarfile.open(sdist) as tar:
        members = tar.getnames()
    for needed in ("csrc/core/quant.h", "csrc/include/cecollm/wire.h", "cecollm/data/summaries.jsonl",
                   "cecollm/models/smollm2-135m-ee.safetensors", "cecollm/_core.pyi"):  # fmt: skip
        assert any(m.endswith(needed) for m in members), needed
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(sdist)], check=True, capture_output=True)  # fmt: skip
    [wheel] = tmp_path.glob("cecollm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("cecollm/_core") and n.endswith(".so") for n in names)
    assert {"cecollm/py.typed", "cecollm/_core.pyi", "cecollm/data/instructions_eval.jsonl"} <= set(names)
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    probe = "import cecollm._core as c, cecollm.datasets as d; print(c.WIRE_VERSION, len(d.summaries('all')))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert out.split() == [str(_core.WIRE_VERSION), "250"]
