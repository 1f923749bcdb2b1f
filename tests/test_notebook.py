"""notebooks/analysis.ipynb runs top to bottom on the tiny sweep, in a kernel of this interpreter."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO
from test_sweeps import tiny_sweep_dir

NOTEBOOK = REPO / "notebooks" / "analysis.ipynb"
KERNEL = "ibq-test-python"


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> Path:
    return tiny_sweep_dir(tmp_path_factory.getbasetemp())


@pytest.fixture
def this_interpreter_kernel(tmp_path, monkeypatch) -> str:
    """A kernel spec for sys.executable, so the notebook imports the ibq of this environment."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": KERNEL, "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL


def executed(kernel: str, cwd: Path) -> tuple[str, list[dict]]:
    """The notebook run top to bottom in `cwd`: its text and markdown outputs, and all of its outputs."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, kernel_name=kernel, timeout=300, resources={"metadata": {"path": str(cwd)}}).execute()  # raises on a failing cell
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    return "\n".join(str(output.get("text", "")) + str(output.get("data", {}).get("text/markdown", "")) for output in outputs), outputs


@pytest.mark.slow
def test_analysis_notebook_runs_on_a_sweep_from_another_directory(tiny_sweep, this_interpreter_kernel, monkeypatch, tmp_path):
    monkeypatch.setenv("IBQ_SWEEP_DIR", str(tiny_sweep))
    text, outputs = executed(this_interpreter_kernel, tmp_path)
    assert f"{tiny_sweep}: 4 jobs, 4 done" in text
    assert "| quantizer | codebook_size |" in text and "| vq | 1024 |" in text
    assert any("image/png" in output.get("data", {}) for output in outputs)
    assert (tiny_sweep / "plots" / "codebook_utilization_vs_codebook_size.png").exists()

    # A second folder beside it (one run of another quantizer): one table, its plots in an analysis folder of both.
    other = tmp_path / "other_sweep"
    shutil.copytree(next(tiny_sweep.glob("*quantizer=ibq*")), other / "fsq_run")
    record = json.loads((other / "fsq_run" / "run.json").read_text())
    (other / "fsq_run" / "run.json").write_text(json.dumps({**record, "signature": "f" * 12, "choices": {**record["choices"], "quantizer": "fsq"}}))
    monkeypatch.setenv("IBQ_SWEEP_DIR", f"{tiny_sweep}{os.pathsep}{other}")
    text, outputs = executed(this_interpreter_kernel, tmp_path)
    assert f"{tiny_sweep}: 4 jobs, 4 done" in text and f"{other}: 1 jobs, 1 done" in text
    assert f"**{other}**" in text and "| fsq |" in text and "| vq | 1024 |" in text
    plots = list((tmp_path / "outputs" / "analysis").glob("compare-2-sweeps-*/plots/codebook_utilization_vs_codebook_size.png"))
    assert len(plots) == 1
