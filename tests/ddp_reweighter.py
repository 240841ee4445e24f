"""A user's DDP script with lfm.Reweighter (run by tests/test_api.py, 1 or 2 processes).

Each process takes its contiguous part of every global batch of 40 (as a DistributedSampler
would hand it its own examples), initialises the process group itself, and passes its part to
`step`; rank 0 saves b, r, W1 and W2 after 8 steps.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import lfm


def main(out: str, method: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(400, 12, generator=g), torch.randint(0, 4, (400,), generator=g)
    xv, yv = torch.randn(40, 12, generator=g), torch.randint(0, 4, (40,), generator=g)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    rw = lfm.Reweighter(model, opt, len(y), (xv, yv), method, val_batch_size=20)
    for _ in range(8):
        idx = torch.randperm(400, generator=g)[:40]
        part = idx.chunk(world)[rank]
        rw.step(x[part], y[part], part)
    if rank == 0:
        pe = {k: torch.as_tensor(v) for k, v in rw.per_example().items()}
        nets = {k: [p.detach() for p in m.parameters()] for k, m in rw.models().items()}
        torch.save({"per_example": pe, "nets": nets}, out)
    if world > 1:
        dist.barrier()  # no rank tears gloo down while another still uses it
        # Leave without the interpreter's teardown: on torch 2.13 gloo's threads winding down
        # during it aborted a rank now and then ("terminate called without an active
        # exception", SIGABRT; seen in about 1 of 4 suite runs on a loaded 2-core machine),
        # with or without destroy_process_group. Everything this script makes is saved above.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
