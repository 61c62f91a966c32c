"""run_table1.sh end to end on the smoke preset (tiny random BERT, synthetic data): one whole grid (7 settings x 2
targets), the reference; then parts of it (--settings, --targets), each checked against the reference's numbers: killed with
SIGKILL twice and rerun, a diverged MAML priming, --jobs 2 (one log per unit, a rerun redoes nothing, a failing unit
stops the grid), another priming seed into the same OUT (refused); --pe, the default preset, the GPU check."""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

import finetune
import prime
from conftest import ROOT

SCRIPT = os.path.join(ROOT, "run_table1.sh")
PRIMED = ["meta", "ft", "maml", "one-step"]
TARGETS = ["hi", "af"]  # the reference grid's targets (the preset's 6 would only add training time)
NAMES = ["Full FT", "HT", "AT", "Meta Priming -> AT", "FT Priming -> AT", "MP [MAML Loop] -> AT", "MP [1 Inner Step] -> AT"]


def run_script(out, *options):
    return subprocess.run(["bash", SCRIPT, "--preset", "smoke", "--out", str(out), *options], capture_output=True, text=True,
                          timeout=900)


def smoke(out, *options):
    run = run_script(out, *options)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def table_rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    return out, smoke(out, "--targets", ",".join(TARGETS))


def test_smoke_preset_prints_seven_rows(reference):
    out, stdout = reference
    rows = table_rows(stdout)
    assert [r.split(" | ")[1] for r in rows] == NAMES
    assert all(r.count(" | ") == 5 and "not run" not in r and "diverged" not in r for r in rows)  # 2 targets + avg, all filled
    for setting, name in {4: "meta", 5: "ft", 6: "maml", 7: "one-step"}.items():
        assert not (out / "prime" / name / "resume.pt").exists()
        assert json.loads((out / "prime" / name / "checkpoint.json").read_text())["variant"] == name  # not swapped
        for result in out.glob(f"finetune/s{setting}/*/seed1/result.json"):
            assert json.loads(result.read_text())["init"].endswith(f"prime/{name}")
    assert len(list(out.glob("finetune/s*/*/seed1/result.json"))) == 7 * len(TARGETS)
    assert (out / "table1.md").read_text() in stdout and (out / "table1.csv").exists()
    times = [line.split("\t") for line in (out / "times.tsv").read_text().splitlines()]  # every unit timed, in order
    assert [t[1] for t in times] == [f"prime-{name}" for name in PRIMED] + [f"s{s}" for s in range(1, 8)]
    assert all(t[2].isdigit() and t[3:] == ["0", "1"] for t in times)


def start(out, *options):
    return subprocess.Popen(["bash", SCRIPT, "--preset", "smoke", "--out", str(out), *options], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def kill_when(proc, condition, timeout=300):
    """SIGKILL the whole process group as soon as `condition()` holds."""
    end = time.time() + timeout
    while not condition() and proc.poll() is None and time.time() < end:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def cells(out, settings, langs):
    """{(setting, lang): test F1} of the grid's result.json files."""
    return {(s, lang): json.loads((out / "finetune" / f"s{s}" / lang / "seed1" / "result.json").read_text())["test_f1"]
            for s in settings for lang in langs}


def test_tools_split_a_grids_time_by_stage_and_a_units_time_by_part(reference, tmp_path):
    """tools/stages.py: the reference grid's times.tsv summed by stage, a fine-tuning unit's time outside its runs'
    wall_time_s; tools/unit_profile.py: finetune.py runs as usual and its wall time is split into parts."""
    out, _ = reference
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "stages.py"), str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    seconds = {line.split("\t")[1]: int(line.split("\t")[2]) for line in (out / "times.tsv").read_text().splitlines()}
    outside = seconds["s1"] - sum(json.loads(f.read_text())["wall_time_s"] for f in out.glob("finetune/s1/*/seed*/result.json"))
    assert f"  priming: 4 units, {sum(seconds[f'prime-{n}'] for n in PRIMED) / 60:.1f} unit-min\n" in run.stdout
    assert (f"  setting 1: full FT: 1 units, {seconds['s1'] / 60:.1f} unit-min; outside training and scoring "
            f"{outside / 60:.1f} unit-min ({outside:.1f} s per unit)\n") in run.stdout
    flags = ["--setting", "3", "--model", str(out / "tiny-bert"), "--synthetic", "--lang", "hi", "--seed", "1", "--train-size",
             "30", "--dev-size", "10", "--test-size", "10", "--epochs", "2", "--pe", "adapter", "--out", str(tmp_path / "s3")]
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "unit_profile.py"), *flags], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    parts = re.fullmatch(r"unit_profile: training (\S+) s, decoding (\S+) s, scoring (\S+) s, the rest (\S+) s \(imports, "
                         r"loading, body outputs\); whole process (\S+) s", run.stdout.splitlines()[-1])
    assert parts and abs(sum(map(float, parts.groups()[:4])) - float(parts[5])) <= 0.25
    assert json.loads((tmp_path / "s3" / "hi" / "seed1" / "result.json").read_text())["setting"] == 3


def test_killed_twice_then_rerun_gives_the_same_results(reference, tmp_path):
    """A part of the grid (the meta priming and setting 4): killed while priming, once a resume state exists, and while
    fine-tuning, once a run has finished; the rerun completes it with the reference's numbers."""
    ref_out, _ = reference
    out, part = tmp_path / "run", ("--settings", "4", "--targets", "hi,af")
    kill_when(start(out, *part), lambda: any(out.glob("prime/*/resume.pt")))
    assert not (out / "table1.md").exists() and not (out / "prime" / "meta" / "checkpoint.json").exists()
    kill_when(start(out, *part), lambda: len(list(out.glob("finetune/s*/*/seed1/result.json"))) >= 1)
    assert (out / "prime" / "meta" / "checkpoint.json").exists()
    stdout = smoke(out, *part)
    assert cells(out, (4,), ("hi", "af")) == cells(ref_out, (4,), ("hi", "af"))
    assert (out / "table1.md").read_text() in stdout


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_diverged_priming_is_reported_and_the_grid_carries_on(reference, tmp_path, jobs):
    ref_out, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    shutil.rmtree(out / "prime" / "maml")
    shutil.rmtree(out / "finetune" / "s6")
    (out / "prime" / "maml").mkdir()
    (out / "prime" / "maml" / "diverged.json").write_text(json.dumps({"script": "prime.py", "step": 3, "loss": None}))
    stdout = smoke(out, "--jobs", jobs, "--settings", "6", "--targets", ",".join(TARGETS), "--model", str(ref_out / "tiny-bert"))
    if jobs == "2":  # exit code 3 per unit: reported, and the other units go on
        assert all(re.search(f"end   s6-{lang} after .*: diverged \\(exit 3\\); carrying on", stdout) for lang in TARGETS)
    times = {t.split("\t")[1]: t.split("\t")[3:] for t in (out / "times.tsv").read_text().splitlines()[-len(TARGETS):]}
    assert times == ({f"s6-{lang}": ["3", "2"] for lang in TARGETS} if jobs == "2" else {"prime-maml": ["3", "1"], "s6": ["3", "1"]})
    rows = table_rows(stdout)
    assert rows[5] == "| 6 | MP [MAML Loop] -> AT | " + " | ".join(["diverged"] * (len(TARGETS) + 1)) + " | 0 |"
    assert rows[:5] + rows[6:] == [r for i, r in enumerate(table_rows((ref_out / "table1.md").read_text())) if i != 5]


def test_jobs_2_gives_the_same_results_with_one_log_per_unit(reference, tmp_path):
    ref_out, _ = reference
    out, part = tmp_path / "run", ("--jobs", "2", "--settings", "3,4", "--targets", "hi,af")
    stdout = smoke(out, *part)
    assert cells(out, (3, 4), ("hi", "af")) == cells(ref_out, (3, 4), ("hi", "af"))
    assert "2 jobs at a time on CPU, 1 thread(s) each" in stdout or "GPU" in stdout
    units = ["prime-meta"] + [f"s{s}-{lang}" for s in (3, 4) for lang in ("hi", "af")]
    assert sorted(p.name for p in (out / "logs").iterdir()) == sorted(f"{u}.log" for u in units)
    lines = stdout.splitlines()
    at = lambda text: next(i for i, line in enumerate(lines) if text in line)
    for unit in units:  # one line when a unit starts, one when it ends
        assert sum(f"start {unit} (slot " in line or re.search(f"end   {unit} after .*: ok$", line) is not None
                   for line in lines) == 2, unit
    assert at("end   prime-meta ") < min(at(f"start s4-{lang}") for lang in ("hi", "af"))  # dependencies
    assert "s4 hi seed1: test F1" in (out / "logs" / "s4-hi.log").read_text()
    assert "s4 hi seed1: test F1" not in stdout  # the units' own output goes to their logs
    rerun = smoke(out, *part)  # everything is done: each unit says so and ends; the same numbers
    assert "primed: " in (out / "logs" / "prime-meta.log").read_text()
    assert all("all runs done" in (out / "logs" / f"{u}.log").read_text() for u in units[1:])
    assert cells(out, (3, 4), ("hi", "af")) == cells(ref_out, (3, 4), ("hi", "af")) and "| 4 |" in rerun


def test_jobs_2_a_failing_unit_stops_the_grid_and_names_its_log(reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    (out / "table1.md").unlink()
    info = json.loads((out / "prime" / "meta" / "checkpoint.json").read_text())
    (out / "prime" / "meta" / "checkpoint.json").write_text(json.dumps({**info, "labels": ["O", "B-X"]}))  # s4 cannot use it
    for s in (4, 5):
        shutil.rmtree(out / "finetune" / f"s{s}" / "hi")
    # --model: the checkpoints were primed from the reference's tiny BERT (a copy would be refused)
    run = run_script(out, "--jobs", "2", "--settings", "4,5", "--targets", "hi", "--model", str(ref_out / "tiny-bert"))
    assert run.returncode == 2, run.stdout + run.stderr
    assert re.search("end   s4-hi after .*: FAILED \\(exit 2\\): finetune.py: error: .*prime/meta was made for labels O B-X",
                     run.stdout), run.stdout
    message = run.stderr.strip().splitlines()[-1]
    assert "1 unit(s) failed: s4-hi" in message and str(out / "logs" / "s4-hi.log") in message, run.stderr
    assert re.search("end   s5-hi after .*: ok", run.stdout)  # started with s4-hi: allowed to finish
    assert (out / "finetune" / "s5" / "hi" / "seed1" / "result.json").exists()
    assert not (out / "table1.md").exists()


def test_another_priming_seed_into_an_existing_out_is_refused(reference):
    """Issue L4: --prime-seed 2 into the OUT of priming seed 1 must not reuse seed 1's checkpoints and results."""
    ref_out, _ = reference
    run = run_script(ref_out, "--prime-seed", "2", "--settings", "4")
    assert run.returncode == 2, run.stdout + run.stderr
    assert "holds a priming made with other settings (--seed: 1 -> 2)" in run.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("value", ["0", "x"])
def test_invalid_jobs_is_one_line_and_exit_2(tmp_path, value):
    run = subprocess.run(["bash", SCRIPT, "--preset", "smoke", "--jobs", value, "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "--jobs" in run.stderr and value in run.stderr
    assert not (tmp_path / "run").exists()


def test_every_pe_method_reaches_every_priming_and_setting(tmp_path):
    """--pe goes to every priming and to settings 3-7 (with the method's recipe), and names the default OUT. (That the
    scripts then prime and tune each method: tests/test_meta.py, tests/test_pe.py.)"""
    for method in ("adapter", "lora", "bitfit"):
        run = subprocess.run(["bash", SCRIPT, "--preset", "smoke", "--pe", method, "--dry-run"], capture_output=True,
                             text=True, timeout=60, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        commands = [line for line in run.stdout.splitlines() if line.startswith("+ python")]
        assert len(commands) == 4 + 7 and all(f"--pe {method}" in c for c in commands if "--setting 1 " not in c and
                                              "--setting 2 " not in c)
        assert f"out=runs/smoke{'' if method == 'adapter' else '-' + method} " in run.stdout
        for command in commands:  # every command the grid would run parses, flags and recipe included
            script, *argv = shlex.split(command)[2:]
            args = {"prime.py": prime.parse_args, "finetune.py": finetune.parse_args}[os.path.basename(script)](argv)
            assert args.pe == method or getattr(args, "setting", 3) < 3


@pytest.mark.parametrize("preset", ["mini", "full"])
def test_every_command_of_the_cpu_presets_parses(tmp_path, preset):
    """Every command --preset mini/full would run (each PE method) parses; a full-preset LoRA/BitFit grid, which has no
    recipe, is refused in one line."""
    for method in ("adapter", "lora", "bitfit"):
        run = subprocess.run(["bash", SCRIPT, "--preset", preset, "--pe", method, "--dry-run"], capture_output=True,
                             text=True, timeout=60, cwd=tmp_path)
        if preset == "full" and method != "adapter":
            assert run.returncode == 2 and "--preset full has no" in run.stderr.strip().splitlines()[-1]
            continue
        assert run.returncode == 0, run.stderr
        commands = [shlex.split(line)[2:] for line in run.stdout.splitlines() if line.startswith("+ python")]
        assert len(commands) == {"mini": 4 + 6 + 6 * 2, "full": 4 + 6 + 4 * 4}[preset]
        if preset == "mini":  # 2 units at a time: full FT one per target, the other settings' six targets in two units
            langs = {}
            for script, *argv in commands:
                if "--setting" in argv:
                    langs.setdefault(argv[argv.index("--setting") + 1], []).append(argv[argv.index("--lang") + 1:argv.index("--seed")])
            assert langs == {"1": [[t] for t in ("hi", "af", "az", "lt", "et", "nl")],
                             **{s: [["hi", "az", "et"], ["af", "lt", "nl"]] for s in "234567"}}
        for script, *argv in commands:
            {"prime.py": prime.parse_args, "finetune.py": finetune.parse_args}[os.path.basename(script)](argv)


def test_gpu_check_runs_and_skips_each_cuda_check_in_one_line(tmp_path):
    """tools/gpu_check.sh on a machine without a GPU (this one, CI): one "skipped" line per check, exit 0."""
    run = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), "--out", str(tmp_path / "check")],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    names = ["device", "smoke", "bench-fp32", "bench-bf16", "slice", "slice-bf16", "torchrun"]
    assert lines == [f"gpu_check: {n}: skipped (no CUDA GPU here)" for n in names]


def test_without_a_gpu_or_the_hub_the_first_command_runs_the_mini_preset(tmp_path):
    """Issue K4: `bash run_table1.sh` with no --preset chooses: a GPU and the hub -> paper; else mini, said in one
    line before anything runs (--dry-run prints the commands it would run)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(["bash", SCRIPT, "--dry-run", "--settings", "3,4", "--targets", "hi", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("run_table1.sh: no GPU and no hub here, so --preset mini:") and "--preset paper to insist" in lines[0]
    assert "preset=mini model=multilingual-e5-small" in lines[1]
    commands = [line for line in lines if line.startswith("+ python")]
    assert [c.split()[2].rsplit("/", 1)[-1] for c in commands] == ["prime.py", "finetune.py", "finetune.py"]
    assert all("--model multilingual-e5-small" in c for c in commands) and not (tmp_path / "run").exists()


def subprocess_run_sh(*flags):
    return subprocess.run(["bash", SCRIPT, *flags], capture_output=True, text=True)


# --recipe auto (issue O) end to end, here beside the other smoke grids (the suite's second worker runs this file)
def test_run_table1_recipe_auto_smoke_end_to_end(tmp_path, tiny_dir):
    """--preset smoke --recipe auto: OUT/recipes.json holds each group's every cell and its choice, the table the
    settings made with it, and the recipes printed under it (resume: test_grid_on_the_tiny_bert_...)."""
    out = tmp_path / "smoke"
    r = subprocess_run_sh("--preset", "smoke", "--recipe", "auto", "--settings", "3", "--targets", "hi,af", "--recipe-targets", "1",
                          "--model", tiny_dir, "--out", str(out))  # one group: each process starts in ~8 s (test_recipe.py: more)
    assert r.returncode == 0, r.stderr[-2000:]
    recipes = json.load(open(out / "recipes.json"))
    assert set(recipes["groups"]) == {"adapter"}
    for name, group in recipes["groups"].items():
        assert len(group["cells"]) >= 4 and all({"lr", "epochs", "dev_f1"} <= set(c) for c in group["cells"])
        assert {"lr", "epochs"} <= set(group["chosen"]) and group["targets"] == ["hi"]  # the first K=1
        result = json.load(open(out / "finetune" / "s3" / "af" / "seed1" / "result.json"))
        assert (result["config"]["lr"], result["config"]["epochs"]) == (group["chosen"]["lr"], group["chosen"]["epochs"])
        assert result["test_f1"] is not None
    table = (out / "table1.md").read_text()
    assert "| 3 | AT |" in table and "Recipes chosen on dev F1" in table and "| adapter | 3-7 |" in table
