"""run_table1.sh end to end on the smoke preset (tiny random BERT, synthetic data, 7 x 6 grid):
a plain run, a run killed with SIGKILL twice and rerun, and a run whose MAML priming diverged."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "run_table1.sh")
NAMES = ["Full FT", "HT", "AT", "Meta Priming -> AT", "FT Priming -> AT", "MP [MAML Loop] -> AT", "MP [1 Inner Step] -> AT"]


def smoke(out):
    run = subprocess.run(["bash", SCRIPT, "--preset", "smoke", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def table_rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    return out, smoke(out)


def test_smoke_preset_prints_seven_rows(reference):
    out, stdout = reference
    rows = table_rows(stdout)
    assert [r.split(" | ")[1] for r in rows] == NAMES
    assert all(r.count(" | ") == 9 and " - " not in r and "diverged" not in r for r in rows)  # 6 targets + avg, all filled
    for setting, name in {4: "meta", 5: "ft", 6: "maml", 7: "one-step"}.items():
        assert not (out / "prime" / name / "resume.pt").exists()
        assert json.loads((out / "prime" / name / "checkpoint.json").read_text())["variant"] == name  # not swapped
        for result in out.glob(f"finetune/s{setting}/*/seed1/result.json"):
            assert json.loads(result.read_text())["init"].endswith(f"prime/{name}")
    assert len(list(out.glob("finetune/s*/*/seed1/result.json"))) == 42
    assert (out / "table1.md").read_text() in stdout and (out / "table1.csv").exists()


def start(out):
    return subprocess.Popen(["bash", SCRIPT, "--preset", "smoke", "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def kill_when(proc, condition, timeout=300):
    """SIGKILL the whole process group as soon as `condition()` holds."""
    end = time.time() + timeout
    while not condition() and proc.poll() is None and time.time() < end:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_killed_twice_then_rerun_gives_the_same_table(reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "run"
    # 1: while priming, once a priming run has saved its resume state
    kill_when(start(out), lambda: any(out.glob("prime/*/resume.pt")))
    assert not (out / "table1.md").exists()
    # 2: while fine-tuning, after some runs have finished
    kill_when(start(out), lambda: len(list(out.glob("finetune/s*/*/seed1/result.json"))) >= 3)
    assert all((out / "prime" / n / "checkpoint.json").exists() for n in ["meta", "ft", "maml", "one-step"])
    stdout = smoke(out)
    assert (out / "table1.md").read_text() == (ref_out / "table1.md").read_text()
    assert (out / "table1.md").read_text() in stdout


def test_diverged_priming_is_reported_and_the_grid_carries_on(reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    shutil.rmtree(out / "prime" / "maml")
    shutil.rmtree(out / "finetune" / "s6")
    (out / "prime" / "maml").mkdir()
    (out / "prime" / "maml" / "diverged.json").write_text(json.dumps({"script": "prime.py", "step": 3, "loss": None}))
    rows = table_rows(smoke(out))
    assert rows[5] == "| 6 | MP [MAML Loop] -> AT | " + " | ".join(["diverged"] * 7) + " | 0 |"
    assert rows[:5] + rows[6:] == [r for i, r in enumerate(table_rows((ref_out / "table1.md").read_text())) if i != 5]
