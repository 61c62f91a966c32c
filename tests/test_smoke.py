"""The smoke preset end to end: tiny random BERT, synthetic data, the whole 7 x 6 grid."""
import os
import subprocess

from conftest import ROOT


def test_smoke_preset_prints_seven_rows(tmp_path):
    out = tmp_path / "smoke"
    run = subprocess.run(["bash", os.path.join(ROOT, "run_table1.sh"), "--preset", "smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split(" | ")[1] for r in rows] == ["Full FT", "HT", "AT", "Meta Priming -> AT", "FT Priming -> AT",
                                                 "MP [MAML Loop] -> AT", "MP [1 Inner Step] -> AT"]
    assert all(r.count(" | ") == 9 and " - " not in r for r in rows)  # 6 targets + avg, every cell filled
    for name in ["meta", "ft", "maml", "one-step"]:
        assert (out / "prime" / name / "checkpoint.json").exists()
    assert len(list(out.glob("finetune/s*/*/seed1/result.json"))) == 42
    assert (out / "table1.md").exists() and (out / "table1.csv").exists()
