"""Several processes under torchrun (torch.distributed): the few collectives prime.py needs.

    torchrun --nproc_per_node 2 prime.py ...      # gloo on CPU; with --device cuda: nccl, one GPU per process

In a plain run (no WORLD_SIZE in the environment, or WORLD_SIZE=1) nothing is initialised and every function
here is a no-op or the identity, so that run is unchanged. Imports nothing of ours.
"""
import os
import sys

import torch
import torch.distributed as tdist


def setup(device):
    """Join torchrun's process group: gloo on CPU, nccl on CUDA with one GPU per process (cuda:LOCAL_RANK).
    Returns (rank, world size, the device this process uses); (0, 1, device) in a plain run."""
    if launched_by_torchrun() and not tdist.is_initialized():
        if torch.device(device).type == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        tdist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    return (*rank_world(), device)


def launched_by_torchrun():
    """WORLD_SIZE > 1 in the environment (read before `setup`, or after a failure)."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


def rank_world():
    """(this process's rank, number of processes); (0, 1) in a plain run."""
    return (tdist.get_rank(), tdist.get_world_size()) if tdist.is_available() and tdist.is_initialized() else (0, 1)


def is_main_process():
    """Rank 0, or a plain run; read from the environment, so it also holds before `setup` or after a failure."""
    return os.environ.get("RANK", "0") == "0"


def all_gather(obj):
    """[rank 0's obj, rank 1's obj, ...] on every process (any picklable object); [obj] in a plain run."""
    world = rank_world()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    tdist.all_gather_object(out, obj)
    return out


def gather_stats(stats, summed=False):
    """Every process's per-task stats of its share of a meta-batch -> the meta-batch's, on every process: each task's in
    task order (task i was rank i % W's (i // W)-th), or with `summed` (ft priming: one loss per share) their sum."""
    per_rank = all_gather(stats)
    if summed:
        return [{"loss": sum(s[0]["loss"] for s in per_rank)}]
    return [per_rank[i % len(per_rank)][i // len(per_rank)] for i in range(sum(map(len, per_rank)))]


def sum_gradients(params):
    """Replace the .grad of `params` by its SUM over the processes (one all-reduce of one flat buffer). A process
    with no gradient for a parameter (no task in this meta-batch) contributes zeros."""
    if rank_world()[1] == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    tdist.all_reduce(flat)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


@torch.no_grad()
def broadcast(tensors, src=0):
    """Overwrite `tensors` (in place) on every process with rank `src`'s."""
    if rank_world()[1] > 1:
        for t in tensors:
            tdist.broadcast(t, src=src)


def barrier():
    if rank_world()[1] > 1:
        tdist.barrier()


def teardown():
    """Leave the process group together, at the end or on an error every process raised: a barrier first, so that no
    process destroys its gloo connections while another still uses them."""
    if rank_world()[1] > 1:
        tdist.barrier()
        tdist.destroy_process_group()


def end_process(code=0):
    """Exit with `code`. Under torchrun: os._exit after flushing, skipping interpreter finalization. A gloo worker
    thread can still be releasing a collective's tensors after destroy_process_group; that takes the GIL, and a thread
    that takes it during finalization is stopped inside a C++ destructor: "terminate called without an active
    exception", SIGABRT (3 CI runs, on the normal and the error path; a race, never reproduced here)."""
    if launched_by_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
