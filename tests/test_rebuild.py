"""Every committed table rebuilds byte for byte from the committed result files (issue Q): `python evaluate.py DIR` for
each results/ directory holding a table1.md (table1.md, table1.csv, and curve.csv where committed), `--sweep DIR` for
each holding a sweep.md. The CLI runs in-process on a copy of the json/jsonl files, figures stubbed out (PNGs may
differ across matplotlib versions and are not compared)."""
import glob
import os
import shutil
import sys

import pytest

from conftest import ROOT

import report

TABLES = sorted(os.path.dirname(p) for p in glob.glob("results/**/table1.md", root_dir=ROOT, recursive=True))
SWEEPS = sorted(os.path.dirname(p) for p in glob.glob("results/**/sweep.md", root_dir=ROOT, recursive=True))
OUTPUTS = ("table1.md", "table1.csv", "curve.csv", "sweep.md")


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    """results/ with only its json and jsonl files (what evaluate.py reads), in a temporary directory."""
    root = tmp_path_factory.mktemp("rebuild")
    for top, _, files in os.walk(os.path.join(ROOT, "results")):
        kept = [f for f in files if f.endswith((".json", ".jsonl"))]
        if kept:
            dest = os.path.join(root, os.path.relpath(top, ROOT))
            os.makedirs(dest, exist_ok=True)
            for f in kept:
                shutil.copyfile(os.path.join(top, f), os.path.join(dest, f))
    return root


def rebuild(copy, monkeypatch, *argv):
    monkeypatch.chdir(copy)  # relative paths, as the committed tables were made
    monkeypatch.setattr(report, "plot", lambda *a: None)
    monkeypatch.setattr(report, "plot_curve", lambda *a: None)
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *argv])
    report.main()


def assert_same(copy, run_dir, names):
    compared = [n for n in names if os.path.exists(os.path.join(ROOT, run_dir, n))]
    for name in compared:
        with open(os.path.join(ROOT, run_dir, name), "rb") as a, open(os.path.join(copy, run_dir, name), "rb") as b:
            assert a.read() == b.read(), f"{run_dir}/{name} does not rebuild unchanged"
    return compared


def test_the_committed_directories_are_found():
    assert len(TABLES) >= 15 and "results/full" in TABLES and "results/grid-pe/lora" in SWEEPS and len(SWEEPS) >= 5


@pytest.mark.parametrize("run_dir", TABLES)
def test_table1_rebuilds_unchanged(copy, monkeypatch, run_dir):
    for name in OUTPUTS[:3]:
        assert not os.path.exists(os.path.join(copy, run_dir, name))
    rebuild(copy, monkeypatch, run_dir)
    assert assert_same(copy, run_dir, OUTPUTS[:3])[:2] == ["table1.md", "table1.csv"]


@pytest.mark.parametrize("run_dir", SWEEPS)
def test_sweep_rebuilds_unchanged(copy, monkeypatch, run_dir):
    assert not os.path.exists(os.path.join(copy, run_dir, "sweep.md"))
    rebuild(copy, monkeypatch, "--sweep", run_dir)
    assert assert_same(copy, run_dir, ["sweep.md"]) == ["sweep.md"]


def test_no_committed_result_names_a_path_of_the_machine_it_ran_on():
    """A clone anywhere reads the same records: no json file under results/ holds an absolute path (runs/... relative)."""
    absolute = [path for path in glob.glob("results/**/*.json", root_dir=ROOT, recursive=True)
                if '": "/' in open(os.path.join(ROOT, path), encoding="utf-8").read()]
    assert not absolute, absolute[:3]
