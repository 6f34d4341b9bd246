"""kaggle.ipynb runs end to end (tiny model, demo data, CPU), resumes a run of an earlier session inside a session
budget, plans that budget, and is committed without outputs."""
import json
import os
import re
import sys
import time
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


def train_command(text):
    """The train.py command line the notebook ran (its '$ ...' line)."""
    return next(line for line in text.splitlines() if line.startswith("$ ") and "train.py" in line).split()


def test_notebook_trains_predicts_checks_and_zips(first_session, demo_dir):
    work, nb, text = first_session
    run = work / "runs" / "nb"
    cmd = train_command(text)  # the session's budget: 11.5 h less what was spent and LOAD_MINUTES
    assert 11.5 * 60 - 5 - 2 < float(cmd[cmd.index("--run-minutes") + 1]) <= 11.5 * 60 - 5
    assert cmd[cmd.index("--reserve-passes") + 1] == "15"  # (3 test + 2 val images) x 3 passes of TTA flips
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


SESSION = dict(SESSION_HOURS=2 / 60, LOAD_MINUTES=0.6)  # a 2-minute session: about a minute for train.py


def test_notebook_resumes_an_earlier_sessions_run_within_the_session(first_session, kernel, demo_dir, tmp_path):
    """A second session: the run copied from the first one's output, trained on until the session's budget
    stops it (EPOCHS 1000), then validated, predicted and zipped, all inside SESSION_HOURS."""
    work, _, _ = first_session
    earlier = work / "runs" / "nb"
    start = tmp_path / "start"  # as on Kaggle: the notebook starts outside the repo, which is a (read-only) input
    start.mkdir()
    began = time.time()
    _, text = run_notebook(kernel, start, DATA_DIR=str(demo_dir), CODE_DIR=str(ROOT), WORK_DIR=str(tmp_path),
                           RUN_NAME="nb", RESUME_FROM=os.path.relpath(earlier, start), EPOCHS=1000, DEMO=True,
                           TTA="none", OVERLAYS=1, INSTALL=False, TRAIN_ARGS=TRAIN_ARGS, INFER_ARGS=INFER_ARGS,
                           **SESSION)
    copy = tmp_path / "cellseg"  # the code was copied and run there, without the clone's .git, data and runs
    assert (copy / "train.py").is_file() and f"code {copy}" in text
    assert not any((copy / name).exists() for name in (".git", "data", "runs"))
    assert "holds 1 finished epoch(s): training resumes" in text and f"resumed {tmp_path / 'runs' / 'nb'}" in text
    cmd = train_command(text)
    assert "--resume" in cmd and cmd[cmd.index("--reserve-passes") + 1] == "5"  # 3 test + 2 val images, 1 pass
    assert SESSION["LOAD_MINUTES"] <= float(cmd[cmd.index("--run-minutes") + 1]) < 2 - SESSION["LOAD_MINUTES"]
    before = load_checkpoint(earlier / "last.pt")["state"]["history"]
    after = load_checkpoint(tmp_path / "runs" / "nb" / "last.pt")["state"]["history"]
    assert 2 <= len(after) < 1000 and repr(after[0]) == repr(before[0])  # repr: NaN (a class not found) equals NaN
    assert re.search(r"RUN_MINUTES [\d.]+: (training steps stopped|no time left)", text)  # the budget ended it
    assert (tmp_path / "submission.zip").stat().st_mtime - began < SESSION["SESSION_HOURS"] * 3600


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


def plan_training(run_dir, demo_dir, minutes_spent=0.0, **params):
    """Execute the notebook's script helper and training cell with the train.py call recorded, not run: returns
    (its command line as strings, or None, and the lines printed)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    [helper] = [c.source for c in nb.cells if c.cell_type == "code" and "def sh(" in c.source]
    [cell] = [c.source for c in nb.cells if c.cell_type == "code" and '"--run-minutes"' in c.source]
    import pathlib
    import subprocess
    printed, ran = [], []
    scope = dict(json=json, os=os, sys=sys, time=time, subprocess=subprocess, Path=pathlib.Path,
                 print=lambda *a, **k: printed.append(" ".join(map(str, a))), START=time.time() - 60 * minutes_spent,
                 DATA=demo_dir, RUN_DIR=run_dir, AMP="auto", EPOCHS=None, DEMO=True, BACKBONE="unused", WEIGHTS="",
                 GPUS=1, TRAIN_ARGS=TRAIN_ARGS, SESSION_HOURS=11.5, LOAD_MINUTES=5, TTA="flips")
    scope.update(params)
    exec(helper, scope)
    scope["sh"] = lambda *cmd: ran.append([str(c) for c in cmd])
    exec(cell, scope)
    return (ran[0] if ran else None), "\n".join(printed)


def test_training_gets_the_session_left_and_keeps_the_predictions_time(demo_dir, tmp_path):
    cmd, out = plan_training(tmp_path / "run", demo_dir, minutes_spent=30)
    minutes = float(cmd[cmd.index("--run-minutes") + 1])
    assert 11.5 * 60 - 30 - 5 - 0.1 < minutes <= 11.5 * 60 - 30 - 5  # SESSION_HOURS less what is spent, LOAD_MINUTES
    assert cmd[cmd.index("--reserve-passes") + 1] == "15"  # (3 test + 2 val images of train.py's split) x 3 flips
    assert "--epochs" not in cmd and "--resume" not in cmd  # EPOCHS None: train.py's own (10 with DEMO)
    assert "3 test + 2 val images x 3 TTA pass(es)" in out
    cmd, _ = plan_training(tmp_path / "run", demo_dir, EPOCHS=7, TTA="none")
    assert cmd[cmd.index("--epochs") + 1] == "7" and cmd[cmd.index("--reserve-passes") + 1] == "5"
    resumed = tmp_path / "resumed"  # a resumed run: its own split's val images
    resumed.mkdir()
    (resumed / "last.pt").write_bytes(b"")
    (resumed / "split.json").write_text(json.dumps({"train": ["a"], "val": ["b", "c", "d"]}))
    cmd, _ = plan_training(resumed, demo_dir, TTA="none")
    assert "--resume" in cmd and cmd[cmd.index("--reserve-passes") + 1] == "6"


def test_with_too_little_session_left_training_is_skipped_or_refused(demo_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(RuntimeError, match=r"left to train and no .*best.pt to predict with"):
        plan_training(run, demo_dir, minutes_spent=11.5 * 60 - 8)  # 8 - LOAD_MINUTES 5 = 3 min: too little
    (run / "best.pt").write_bytes(b"")
    cmd, out = plan_training(run, demo_dir, minutes_spent=11.5 * 60 - 8)
    assert cmd is None and "training skipped" in out and "predicting with" in out


def test_notebook_defaults_are_infer_and_train_defaults():
    """One TTA default for the notebook and infer.py; EPOCHS None leaves train.py its own (DEMO's 10)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = {}
    exec(next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", [])), params)
    assert params["TTA"] == infer.TTA and params["EPOCHS"] is None
    assert 0 < params["SESSION_HOURS"] < 12 and params["LOAD_MINUTES"] > 0
