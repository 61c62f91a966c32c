"""Mean dev F1 after each tuning epoch, per setting, over the finished runs (targets x fine-tuning seeds) of a
run directory, and each setting's gap to setting 3 (plain PE tuning) at that epoch: does a primed start's lead
shrink as tuning goes on? Issue J.
    python results/pe/dev_by_epoch.py results/pe/lora-prime1 [more run dirs]
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import evaluate  # noqa: E402

for run_dir in sys.argv[1:]:
    curves = {}  # setting -> one list of dev F1 per finished run
    for path, r in evaluate.runs(run_dir).items():
        if path.endswith("result.json"):
            log = evaluate.read_jsonl(os.path.join(os.path.dirname(path), "log.jsonl"))
            curves.setdefault(int(r["setting"]), []).append([e["dev"]["f1"] for e in log if "dev" in e])
    means = {s: [statistics.mean(c[k] for c in cs) for k in range(min(map(len, cs)))] for s, cs in sorted(curves.items())}
    print(f"{run_dir}: mean dev F1 after epoch 1, 2, ... (gap to setting 3)")
    base = means.get(3, [])
    for s, m in means.items():  # every epoch of the setting; the gap where setting 3 has that epoch too
        cells = [f"{x:.2f}" + (f" ({x - base[k]:+.2f})" if s != 3 and k < len(base) else "") for k, x in enumerate(m)]
        print(f"  setting {s}, {len(curves[s])} runs: " + ", ".join(cells))
