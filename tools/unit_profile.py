"""Where one finetune.py process spends its time: runs finetune.py with the given flags and prints the seconds spent
in training epochs, in dev/test decoding (predict) and scoring (the task's metric; seqeval's first call imports
scikit-learn), and the process's whole wall time with imports (the rest: imports, model loading, reading and caching
body outputs). Run it alone on a quiet machine, from the repository root, e.g. the mini preset's setting 3 on hi:

    OMP_NUM_THREADS=1 python tools/unit_profile.py --setting 3 --model multilingual-e5-small --data-dir ../shared/wikiann \\
        --lang hi --seed 1 --train-size 1000 --dev-size 500 --test-size 1000 --bf16 --out runs/profile/s3 --epochs 160 \\
        --lr 3e-3 --cache-body --pe adapter --feature-cache runs/profile/features
"""
import collections
import os
import sys
import time

START = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import finetune  # noqa: E402
import tasks  # noqa: E402

SPENT = collections.Counter()


def timed(module, name):
    inner = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            SPENT[name] += time.perf_counter() - start
    setattr(module, name, wrapper)


for name in ("train_epoch", "predict"):
    timed(finetune, name)
timed(tasks, "scores")

if __name__ == "__main__":
    finetune.main(finetune.parse_args(sys.argv[1:]))
    total = time.perf_counter() - START
    rest = total - SPENT["train_epoch"] - SPENT["predict"] - SPENT["scores"]
    print(f"unit_profile: training {SPENT['train_epoch']:.1f} s, decoding {SPENT['predict']:.1f} s, scoring "
          f"{SPENT['scores']:.1f} s, the rest {rest:.1f} s (imports, loading, body outputs); whole process {total:.1f} s")
