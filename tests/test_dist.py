"""prime.py under torchrun (2 processes, gloo on CPU): the same parameters as one process (meta-batches of 3 tasks,
split 2 + 1, and --mode ft), only rank 0 writes, kill + --resume ends as an uninterrupted run, and a diverged or
bad run stops every process with rank 0's one line."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import data
import model
import prime
from conftest import ROOT

STEPS = 3


def torchrun(*argv, nproc=2, wait=True):
    """`torchrun --standalone` (a free port of its own) running prime.py; OMP_NUM_THREADS=1 per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "prime.py", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def prime_argv(model_dir, out, *extra):
    return ["--model", model_dir, "--synthetic", "--train-size", "48", "--support-size", "4", "--query-size", "4",
            "--max-steps", str(STEPS), "--device", "cpu", "--out", str(out), *extra]


def log_lines(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("flags", [["--sources", "en", "es", "de"], ["--mode", "ft", "--sources", "en", "es", "de"]],
                         ids=["meta-3-tasks", "ft"])  # 3 tasks on 2 processes: rank 0 holds 2, rank 1 one (2 tasks: one each)
def test_two_processes_end_with_the_one_process_parameters(tiny_nodrop_dir, tmp_path, flags):
    """Dropout off: after 3 meta-steps, 2 processes hold what 1 process holds (body, adapter, and the first task's
    head), log every task's losses in task order, and rank 0 alone wrote the same files as a plain run."""
    one, two = tmp_path / "one", tmp_path / "two"
    prime.main(prime.parse_args(prime_argv(tiny_nodrop_dir, one, *flags)))
    r = torchrun(*prime_argv(tiny_nodrop_dir, two, *flags))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("primed checkpoint:") == 1  # rank 0 prints, the others do not
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys() and {k.split(".")[0] for k in a} == {"body", "adapter", "head"}
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)
    initial = model.load_tagger(tiny_nodrop_dir, data.LABELS)[0].state_dict()
    assert not torch.allclose(a["body.encoder.layer.0.output.dense.weight"], initial["body.encoder.layer.0.output.dense.weight"])
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))  # no resume.pt, no stray files from rank 1
    logs = log_lines(one), log_lines(two)
    assert [r["step"] for r in logs[1]] == list(range(1, STEPS + 1))  # one line per step: rank 0 alone writes
    for x, y in zip(*logs):
        assert len(y["tasks"]) == len(x["tasks"]) == (1 if "ft" in flags else len(flags) - 1)
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        for tx, ty in zip(x["tasks"], y["tasks"]):  # every task's stats, in task order
            assert ty.get("query_loss", ty.get("loss")) == pytest.approx(tx.get("query_loss", tx.get("loss")), rel=1e-5)
            assert ty.get("support_loss", []) == pytest.approx(tx.get("support_loss", []), rel=1e-5)
    assert json.load(open(two / "config.json"))["processes"] == 2


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def kill_when(proc, condition, timeout=120):
    """SIGKILL torchrun and its workers as soon as `condition()` holds. The workers run in sessions of their own
    (torchrun starts them so), so killing torchrun's process group alone would leave them running."""
    end = time.time() + timeout
    while not condition() and proc.poll() is None and time.time() < end:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        workers = [int(pid) for pid in f.read().split()]
    assert len(workers) == 2
    for pid in workers + [proc.pid]:
        os.killpg(pid, signal.SIGKILL)
    proc.wait()
    while any(alive(pid) for pid in workers) and time.time() < end:
        time.sleep(0.02)


def test_killed_and_resumed_under_torchrun_ends_as_an_uninterrupted_run(tiny_dir, tmp_path):
    """Dropout ON (each rank its own stream): SIGKILL the whole run once resume.pt exists, resume with 2 processes:
    the same parameters and log as an uninterrupted 2-process run, bit for bit, so every rank's RNG was restored.
    A single process refuses that resume.pt with one line."""
    argv = lambda out, *extra: prime_argv(tiny_dir, out, "--train-size", "1000", "--max-steps", "30", "--save-every", "3", *extra)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    r = torchrun(*argv(straight))
    assert r.returncode == 0, r.stderr[-3000:]
    kill_when(torchrun(*argv(resumed), wait=False), lambda: (resumed / "resume.pt").exists())
    assert not (resumed / "checkpoint.json").exists()
    with pytest.raises(model.ModelError, match=r"resume.pt was written by 2 process\(es\), not 1; resume it with "
                                               r"torchrun --nproc_per_node 2 prime.py"):
        prime.main(prime.parse_args(argv(resumed, "--resume")))
    r = torchrun(*argv(resumed, "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "prime.py: resuming" in r.stdout
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert open(straight / "log.jsonl").read() == open(resumed / "log.jsonl").read()
    assert not (resumed / "resume.pt").exists()


@pytest.mark.parametrize("case", ["diverged", "error"])
def test_every_process_stops_and_rank_0_says_why(tiny_dir, tmp_path, case):
    """A NaN loss stops every process at the same step (exit 3, diverged.json); bad input stops them all (exit 2);
    either way rank 0 alone prints its one line, and nothing hangs. (torchrun itself then exits 1 with its own
    failure report.)"""
    if case == "diverged":
        r = torchrun(*prime_argv(tiny_dir, tmp_path, "--inner-scope", "all", "--inner-lr", "1e4"))
        line, code = "prime.py: priming (meta all S=5, inner lr 10000.0) diverged at meta-step 1 of 3: loss nan", 3
        assert json.load(open(tmp_path / "diverged.json"))["step"] == 1
    else:
        (tmp_path / "hi").mkdir()
        (tmp_path / "hi" / "train.tsv").write_text("bo\tO\nkavo\tB-MISC\n")
        argv = [a for a in prime_argv(tiny_dir, tmp_path / "out", "--sources", "hi", "--data-dir", str(tmp_path)) if a != "--synthetic"]
        r = torchrun(*argv)
        line, code = f"prime.py: error: {tmp_path}/hi/train.tsv:2: unknown tag 'B-MISC'", 2
    assert r.returncode != 0 and r.stderr.count(line) == 1, r.stderr[-3000:]
    ours = r.stderr.split("failed (exitcode")[0]  # what the workers wrote, before torchrun's own report
    assert "Traceback" not in ours and f"exitcode  : {code}" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "checkpoint.json").exists()


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_torchrun_process_ends_without_interpreter_finalization(world):
    """Under torchrun (WORLD_SIZE > 1) end_process flushes what was printed and exits with the code, skipping
    finalization (an atexit handler stands for it: it does not run); a plain run exits as usual (it runs)."""
    code = ("import atexit, sys, dist; atexit.register(lambda: print('finalized')); print('printed'); "
            "print('to stderr', file=sys.stderr); dist.end_process(5)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "WORLD_SIZE": world},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 5 and r.stderr == "to stderr\n", r.stderr
    assert r.stdout == ("printed\n" if world == "2" else "printed\nfinalized\n")
