"""Run under torchrun by tests/test_memory.py: one process feeds a non-finite patch; every
process must skip the same step (and none may hang in DistributedDataParallel's all-reduce)."""

import json
import sys

import torch

from scnas.build import BuildConfig, build_network
from scnas.genotype import builtin_genotype
from scnas.engine.processes import close_processes, setup_processes
from scnas.engine.steps import Precision, accumulate_exact, guarded_step, split_batch

d = setup_processes("cpu")
torch.manual_seed(0)
net = build_network(builtin_genotype("minimal"), BuildConfig(stem_channels=2, in_channels=1, num_classes=2))
model = torch.nn.parallel.DistributedDataParallel(net)
optimiser = torch.optim.Adam(net.parameters(), lr=0.1, fused=True)
precision = Precision("off", torch.device("cpu"))
results = []
for step in range(3):
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(10 * step + d.rank))
    y = torch.randint(0, 2, (2, 16, 16, 16), generator=torch.Generator().manual_seed(step))
    if step == 1 and d.rank == 1:
        x[0, 0, 0, 0, 0] = float("nan")
    before = [p.detach().clone() for p in net.parameters()]
    optimiser.zero_grad(set_to_none=True)
    loss = accumulate_exact(model, split_batch(x, y, 1), precision.backward, precision=precision, world=d.world,
                            no_sync=model.no_sync)
    skipped = bool(guarded_step(optimiser, list(net.parameters()), precision, loss=loss, max_norm=12.0))
    unchanged = all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
    results.append({"skipped": skipped, "unchanged": unchanged})
weights = torch.cat([p.detach().flatten() for p in net.parameters()])
gathered = [torch.zeros_like(weights) for _ in range(d.world)]
torch.distributed.all_gather(gathered, weights)
report = {"rank": d.rank, "steps": results, "same_weights": all(torch.equal(gathered[0], g) for g in gathered)}
with open(f"{sys.argv[1]}/rank{d.rank}.json", "w") as handle:   # one file each: stdout lines would interleave
    json.dump(report, handle)
close_processes()
