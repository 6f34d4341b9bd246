"""kaggle.ipynb runs end to end (tiny model, demo data, CPU), resumes a run of an earlier session, and is
committed without outputs."""
import json
import os
import sys
import zipfile

import nbformat
import pytest
from nbclient import NotebookClient

import infer
from conftest import ROOT, TINY, tiny_args
from dataset import read_test_table
from utils import load_checkpoint

NOTEBOOK = ROOT / "kaggle.ipynb"
TRAIN_ARGS = tiny_args(BATCH_SIZE=2, LR=1e-3, WARMUP_ITERS=2, VAL_FRACTION=0.34, NUM_WORKERS=0,
                       VAL_DETECTIONS_PER_IMAGE=50)
INFER_ARGS = ["--num-workers", "0", "--detections-per-image", "50"]


def run_notebook(kernel, start=ROOT, **params):
    """Execute kaggle.ipynb in folder `start` (the repo: a clone) with `params` set in a cell right after its
    parameters cell (as papermill injects them); returns the executed notebook and all its text output."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items())))
    NotebookClient(nb, kernel_name=kernel, timeout=300, resources={"metadata": {"path": str(start)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    return nb, text


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernelspec that runs this interpreter (whatever 'python3' means on the machine); HF_HUB_OFFLINE
    and the rest of the environment pass to the kernel and the scripts it starts."""
    from ipykernel.kernelspec import install
    prefix = tmp_path_factory.mktemp("kernel")
    install(kernel_name="cellseg-test", prefix=str(prefix))
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    yield "cellseg-test"
    mp.undo()


@pytest.fixture(scope="module")
def first_session(kernel, demo_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("kaggle-working")
    nb, text = run_notebook(kernel, DATA_DIR=str(demo_dir), WORK_DIR=str(work), RUN_NAME="nb", EPOCHS=1,
                            DEMO=True, TTA="flips", OVERLAYS=2, INSTALL=False, TRAIN_ARGS=TRAIN_ARGS,
                            INFER_ARGS=INFER_ARGS)
    return work, nb, text


def test_notebook_trains_predicts_checks_and_zips(first_session, demo_dir):
    work, nb, text = first_session
    run = work / "runs" / "nb"
    assert "to install: nothing (all requirements present)" in text  # no pip call with everything present
    assert "AMP auto: off (fp32)" in text  # engine.amp_dtype's answer on the CPU
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["epoch"] == 1 and ckpt["config"]["BACKBONE"] == TINY["BACKBONE"]
    assert ckpt["config"]["DEMO"] and ckpt["config"]["DATA_DIR"] == str(demo_dir)
    table = read_test_table(demo_dir)
    results = json.loads((work / "test-results.json").read_text())
    assert infer.check_submission(results, table)
    with zipfile.ZipFile(work / "submission.zip") as z:
        assert z.namelist() == ["test-results.json"]
        assert json.loads(z.read("test-results.json")) == results
    assert "val images 2, detections" in text and "TTA flips" in text  # --eval with the chosen TTA
    val_ids = json.loads((run / "split.json").read_text())["val"]
    assert sorted(p.name for p in (run / "overlays").glob("*.png")) == sorted(f"{i}.png" for i in val_ids[:2])
    test_pngs = sorted(p.name for p in (work / "test-results-overlays").glob("*.png"))
    assert test_pngs == sorted(r["file_name"].replace(".tif", ".png") for r in table[:2])
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1 + 2 + 2  # learning curve, 2 val overlays, 2 test overlays shown inline


def test_notebook_resumes_an_earlier_sessions_run(first_session, kernel, demo_dir, tmp_path):
    work, _, _ = first_session
    earlier = work / "runs" / "nb"
    start = tmp_path / "start"  # as on Kaggle: the notebook starts outside the repo, which is a (read-only) input
    start.mkdir()
    _, text = run_notebook(kernel, start, DATA_DIR=str(demo_dir), CODE_DIR=str(ROOT), WORK_DIR=str(tmp_path),
                           RUN_NAME="nb", RESUME_FROM=os.path.relpath(earlier, start), EPOCHS=2, DEMO=True,
                           TTA="none", OVERLAYS=1, INSTALL=False, TRAIN_ARGS=TRAIN_ARGS, INFER_ARGS=INFER_ARGS)
    copy = tmp_path / "cellseg"  # the code was copied and run there, without the clone's .git, data and runs
    assert (copy / "train.py").is_file() and f"code {copy}" in text
    assert not any((copy / name).exists() for name in (".git", "data", "runs"))
    assert "holds 1 finished epoch(s): training resumes" in text and f"resumed {tmp_path / 'runs' / 'nb'}" in text
    before = load_checkpoint(earlier / "last.pt")["state"]["history"]
    after = load_checkpoint(tmp_path / "runs" / "nb" / "last.pt")["state"]["history"]
    assert len(after) == 2 and after[0] == before[0]
    assert (tmp_path / "submission.zip").is_file()


def test_committed_notebook_is_stripped_and_parameters_come_first():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "clear the notebook's outputs"
    assert code[0].metadata.get("tags") == ["parameters"]  # papermill injects after it
    for i, c in enumerate(nb.cells):  # every code cell says above it what it does
        if c.cell_type == "code":
            assert i > 0 and nb.cells[i - 1].cell_type == "markdown", f"cell {i} has no markdown above it"
    assert nb.metadata["kernelspec"]["name"] == "python3"



def run_install_cell(tmp_path, monkeypatch, requirements):
    """Execute the notebook's install cell on a made-up requirements.txt with INSTALL False, so pip is never
    reached: returns the error it stops with."""
    import pathlib
    nb = nbformat.read(NOTEBOOK, as_version=4)
    [cell] = [c for c in nb.cells if c.cell_type == "code" and "pip" in c.source and "Requirement" in c.source]
    (tmp_path / "requirements.txt").write_text(requirements)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError) as error:
        exec(cell.source, {"Path": pathlib.Path, "sys": sys, "INSTALL": False})
    return str(error.value)


def test_install_step_asks_only_for_what_is_missing_and_never_reinstalls_torch(tmp_path, monkeypatch, capsys):
    present = "torch>=2.4\ntorchvision>=0.19\nopencv-python-headless>=4.8  # any OpenCV build counts\n"
    error = run_install_cell(tmp_path, monkeypatch, present + "timm>=999\nno-such-package-x>=1\n# tests\npytest>=999\n")
    assert "INSTALL is False" in error
    assert capsys.readouterr().out == "to install: timm>=999, no-such-package-x>=1\n"  # not the tests' pytest
    error = run_install_cell(tmp_path, monkeypatch, "torch>=999\ntimm>=999\n")
    assert "torch/torchvision is older" in error  # refused before any pip call: the image's torch stays
