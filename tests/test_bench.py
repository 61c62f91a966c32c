"""bench.py's --bf16 runs autocast where prime.py and finetune.py do, and tools/gpu_check.sh keeps each device's outputs apart."""
import os
import subprocess
import sys

import pytest
import torch

import bench
import model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_CHECK = os.path.join(ROOT, "tools", "gpu_check.sh")


def run_bench(monkeypatch, tiny_dir, *flags):
    """bench.main in this process on the tiny BERT (synthetic data, one measured meta-batch, one thread). Returns the set of
    (what ran, under CPU autocast?): "body" a pass through the body, "top" adapter+head on cached body outputs,
    "backward" a .backward()."""
    seen = set()
    features, forward, backward = model.Tagger.features, model.Tagger.forward, torch.Tensor.backward

    def spy_features(self, *args, **kwargs):
        seen.add(("body", torch.is_autocast_enabled("cpu")))
        return features(self, *args, **kwargs)

    def spy_forward(self, input_ids=None, attention_mask=None, pool=None, features=None):
        if features is not None:
            seen.add(("top", torch.is_autocast_enabled("cpu")))
        return forward(self, input_ids, attention_mask, pool, features)

    def spy_backward(self, *args, **kwargs):
        seen.add(("backward", torch.is_autocast_enabled("cpu")))
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(model.Tagger, "features", spy_features)
    monkeypatch.setattr(model.Tagger, "forward", spy_forward)
    monkeypatch.setattr(torch.Tensor, "backward", spy_backward)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--model", tiny_dir, "--synthetic", "--repeats", "1", "--task-size", "2",
                                      "--sentences", "20", "--inner-steps", "2", *flags])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small only wait on each other's threads
    try:
        bench.main()
    finally:
        torch.set_num_threads(threads)
    return seen


@pytest.mark.parametrize("part", ["1", "4", "5"])
def test_bf16_autocasts_the_body_passes_only(monkeypatch, tiny_dir, part):
    """--bf16: every body pass under bf16 autocast, as prime.py's amp; adapter+head on cached body outputs (the inner
    steps of the cached support pass) and backward passes outside it, in parts 1 (meta-step), 4 (PE methods) and 5
    (inner-loop variants)."""
    assert run_bench(monkeypatch, tiny_dir, "--parts", part, "--bf16") == {("body", True), ("top", False), ("backward", False)}


def test_without_bf16_nothing_autocasts(monkeypatch, tiny_dir):
    assert run_bench(monkeypatch, tiny_dir, "--parts", "1,4,5") == {("body", False), ("top", False), ("backward", False)}


@pytest.mark.parametrize("flags, says", [(["--parts", "6", "--bf16"], "--bf16 does not apply to part 6"),
                                         (["--parts", "1,7"], "--parts is a comma-separated list of 1-6, not '1,7'")])
def test_refused_in_one_line(monkeypatch, tiny_dir, capsys, flags, says):
    with pytest.raises(SystemExit) as exit:
        run_bench(monkeypatch, tiny_dir, *flags)
    assert exit.value.code == 2 and says in capsys.readouterr().err.strip().splitlines()[-1]


FAKE_PYTHON = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$FAKE_LOG"
case "$*" in
  *device_count*) echo 2 ;;
  *get_device*) echo "$FAKE_GPU" ;;
esac
"""


def run_gpu_check(tmp_path, out, gpu, *flags):
    """tools/gpu_check.sh with a stand-in `python` that has 2 GPUs named `gpu`, runs nothing and logs its command
    lines. Returns (gpu_check's lines, the logged command lines)."""
    bin_dir, data_dir, log = tmp_path / "bin", tmp_path / "data", tmp_path / f"log-{len(list(tmp_path.glob('log-*')))}"
    bin_dir.mkdir(exist_ok=True)
    (data_dir / "hi").mkdir(parents=True, exist_ok=True)
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "FAKE_GPU": gpu}
    run = subprocess.run(["bash", GPU_CHECK, "--out", str(out), "--data-dir", str(data_dir), *flags], capture_output=True,
                         text=True, timeout=120, env=env)
    assert run.returncode == 0 and "bench-bf16: ok" in run.stdout, run.stdout + run.stderr
    return run.stdout.splitlines(), log.read_text().splitlines()


def test_gpu_check_keeps_each_devices_outputs_apart(tmp_path):
    """finetune.py's run identity leaves out the device: a rerun into the same --out on another device must not find
    the runs made there. Every path the checks use lies under OUT/<device>, one folder per GPU model and the CPU."""
    out = tmp_path / "out"
    for gpu, flags, tag in [("NVIDIA H100 80GB HBM3", [], "nvidia-h100-80gb-hbm3"), ("NVIDIA H200", [], "nvidia-h200"),
                            ("NVIDIA H200", ["--device", "cpu"], "cpu")]:
        _, commands = run_gpu_check(tmp_path, out, gpu, *flags)
        paths = [w for c in commands for w in c.split() if w.startswith(str(out))]
        assert len(paths) > 10 and all(p.startswith(str(out / tag) + "/") for p in paths), (tag, paths)


def test_gpu_check_does_not_report_a_cpu_run_as_a_gpu_result(tmp_path):
    """A smoke run that a --device cpu check left in OUT is not counted by the check on a GPU."""
    out = tmp_path / "out"
    _, commands = run_gpu_check(tmp_path, out, "NVIDIA H100 80GB HBM3", "--device", "cpu")
    s3 = next(w for c in commands for w in c.split() if w.endswith("/finetune/s3"))
    os.makedirs(os.path.join(s3, "hi", "seed1"))
    with open(os.path.join(s3, "hi", "seed1", "result.json"), "w") as f:
        f.write('{"config": {"device": "cpu"}}')
    lines, _ = run_gpu_check(tmp_path, out, "NVIDIA H100 80GB HBM3")
    assert next(line for line in lines if line.startswith("gpu_check: smoke: ok")).count("; 0 runs;") == 1
