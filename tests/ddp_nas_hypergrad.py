"""NAS under torchrun, piece by piece (run by tests/test_distributed_search.py with 2 processes).

Every process computes each NAS hypergradient twice on the same global batch: whole (what one
process computes: `Part.whole`, no communication) and split (its own rows, `Part` of the
global batch, with BatchNorm over the global batch and sums over processes). Rank 0 writes
the largest difference of every output, per case, to the JSON file named on the command line.
Cases: DARTS second order, LFM-DARTS (full encoder) and LFM-DARTS with parameter sharing,
each with the exact and the fd backend and P-DARTS's skip dropout on; and the evaluation
network (BatchNorm with running statistics, drop-path, auxiliary head) in module mode.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lfm.engine.functional import params_of
from lfm.engine.virtual import StepRule
from lfm.models.split import rows
from lfm.nas.evalnet import NetworkCIFAR
from lfm.nas.genotypes import Genotype
from lfm.nas.hypergrad import SameMasks, darts_alpha_grad, lfm_nas_grad, lfm_nas_grad_shared
from lfm.nas.search import nas_encoder
from lfm.nas.supernet import Supernet
from lfm.train.distributed import Part, all_reduce_sum, shard_bounds, tensors_in

SHAPE = (1, 8, 8)


def _diff(a, b) -> float:
    ta, tb = tensors_in(a), tensors_in(b)
    assert len(ta) == len(tb) and ta, (len(ta), len(tb))
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(ta, tb, strict=True))


def _outputs(g) -> dict:
    out = {"alphas": list(g.alphas)}
    for k in ("r", "a", "u"):
        if getattr(g, k, None) is not None:
            out[k] = getattr(g, k)
    if getattr(g, "encoder", None):
        out["encoder"] = g.encoder
    for k in ("step1", "step2"):
        if getattr(g, k, None) is not None:
            out[k] = getattr(g, k).params
    for k in ("loss_train", "loss_val"):
        if hasattr(g, k):
            out[k] = torch.tensor(getattr(g, k))
    return out


def main(path: str) -> None:
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(0)
    n, m = 8, 6
    xt, yt = torch.randn(n, *SHAPE, generator=g), torch.randint(0, 3, (n,), generator=g)
    xv, yv = torch.randn(m, *SHAPE, generator=g), torch.randint(0, 3, (m,), generator=g)
    off, size = shard_bounds(n, world, rank)
    part, whole = Part(off, size, n), Part.whole(n)
    report: dict[str, dict[str, float]] = {}

    def net(heads: int = 1) -> Supernet:
        torch.manual_seed(1)
        s = Supernet(4, 3, 2, SHAPE, heads=heads)
        s.set_skip_dropout(0.3)
        return s

    def rule(module) -> StepRule:
        opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=3e-4)
        return StepRule.of(opt, module, grad_clip=5.0)

    n1 = net()
    alphas = n1.new_alphas(torch.Generator().manual_seed(2), scale=0.5)
    masks = SameMasks(3)
    for backend in ("exact", "fd"):
        res = {}
        for p in (whole, part):
            res[p.split] = _outputs(
                darts_alpha_grad(
                    n1, params_of(n1), alphas, (xt, yt), (xv, yv), rule(n1), 2, backend,
                    masks=masks, part=p,
                )
            )  # fmt: skip
        report[f"darts-{backend}"] = {k: _diff(res[False][k], res[True][k]) for k in res[False]}

        n2 = net()
        torch.manual_seed(4)
        enc = nas_encoder(SHAPE, 8, "cnn")
        r = torch.rand(m, generator=torch.Generator().manual_seed(5)) + 0.5
        res = {}
        for p in (whole, part):
            res[p.split] = _outputs(
                lfm_nas_grad(
                    n1, params_of(n1), params_of(n2), alphas, r, (xt, yt), (xv, yv), rule(n1),
                    rule(n2), enc, {k: v.detach() for k, v in enc.named_parameters()}, backend,
                    masks=masks, part=p,
                )
            )  # fmt: skip
        report[f"lfm-full-{backend}"] = {k: _diff(res[False][k], res[True][k]) for k in res[False]}

        ns = net(heads=2)
        res = {}
        for p in (whole, part):
            res[p.split] = _outputs(
                lfm_nas_grad_shared(
                    ns, params_of(ns), alphas, r, (xt, yt), (xv, yv), rule(ns), backend,
                    masks=masks, part=p,
                )
            )  # fmt: skip
        report[f"lfm-shared-{backend}"] = {
            k: _diff(res[False][k], res[True][k]) for k in res[False]
        }

    # the evaluation network, module mode: gradients, running statistics, drop-path masks
    torch.manual_seed(6)
    ev = NetworkCIFAR(Genotype.load("DARTS_V2"), 4, 3, 3, True, SHAPE)
    ev.drop_path_prob = 0.3
    got = {}
    for p in (whole, part):
        model = copy.deepcopy(ev).train()
        torch.manual_seed(7)  # the same drop-path draws
        with rows(p):
            logits, aux = model(p.local(xt))
        y = p.local(yt)
        loss = p.mean(F.cross_entropy(logits, y, reduction="none"))
        loss = loss + 0.4 * p.mean(F.cross_entropy(aux, y, reduction="none"))
        loss.backward()
        grads = [q.grad for q in model.parameters()]
        if p.split:
            grads = all_reduce_sum(grads)
        got[p.split] = {"grads": grads, "buffers": [b for b in model.buffers()]}
    report["evalnet"] = {k: _diff(got[False][k], got[True][k]) for k in got[False]}
    if rank == 0:
        with open(path, "w") as f:
            json.dump({"world": world, "report": report}, f, indent=1)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown (gloo's aborted now and then under load)


if __name__ == "__main__":
    main(sys.argv[1])
