"""Launched by torch.distributed.run (torchrun): trains a sasified model with DDP on gloo.

Each rank takes its half of a fixed batch; rank 0 writes the final parameters to argv[1].
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sas_compile  # noqa: E402


def build():
    torch.manual_seed(0)
    # no BatchNorm: its statistics are per rank (SyncBatchNorm needs GPUs), unlike one process
    dense = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, stride=2, padding=1),
        torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32, 7))
    model = sas_compile.sasify(dense, M=2).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 16, 16, generator=g)
    y = torch.randint(0, 7, (8,), generator=g)
    return model, x, y


def train(model, x, y, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def main():
    out = sys.argv[1]
    if os.environ.get("WORLD_SIZE") is None:  # single process, full batch
        model, x, y = build()
        torch.save({k: v.detach() for k, v in train(model, x, y).state_dict().items()}, out)
        return
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, x, y = build()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    train(ddp, x[shard], y[shard])
    if rank == 0:
        torch.save({k: v.detach() for k, v in model.state_dict().items()}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
