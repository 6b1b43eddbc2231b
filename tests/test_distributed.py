"""fusedrnn under torch.distributed on the CPU (gloo, 2 processes): DDP and FSDP2 (fully_shard).

Each rank trains on its half of every batch; the result must match one process trained on the whole batch
(float64, so the bound is tight). One pair of processes runs both (starting them is most of the time); a
hang fails the tests after TIMEOUT_S instead of blocking the run.
"""
import os
import re
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fusedrnn

WORLD = 2
STEPS = 3
BATCH = 8  # global batch, split evenly over the ranks
TIMEOUT_S = 90
TOL = 1e-12  # float64: the two runs differ only in the order of a few additions

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = fusedrnn.LSTM(3, 8, num_layers=2, batch_first=True, dtype=torch.float64)
        self.head = nn.Linear(8, 1, dtype=torch.float64)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1]).squeeze(-1)


def make_model() -> Regressor:
    torch.manual_seed(0)
    return Regressor()


def global_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 5, 3, generator=g, dtype=torch.float64)
    return x, x.sum((1, 2)).tanh()


def train_single() -> list[torch.Tensor]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(STEPS):
        x, y = global_batch(step)
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in model.parameters()]


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's sharded parameter or gradient) gathered whole; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _train(rank: int, mode: str) -> dict:
    model = make_model()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        trained = DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (WORLD,))
        fully_shard(model.rnn, mesh=mesh)
        trained = fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(trained.parameters(), lr=0.5)
    grads = []
    for step in range(STEPS):
        x, y = global_batch(step)
        mine = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        F.mse_loss(trained(x[mine]), y[mine]).backward()
        grads.append([_full(p.grad).detach().clone() for p in trained.parameters()])
        opt.step()
        opt.zero_grad()
    return {"grads": grads, "params": [_full(p).detach().clone() for p in trained.parameters()]}


def _worker(rank: int, port: int, out_dir: str) -> None:
    # both modes in one pair of processes: starting them (importing torch) is most of the time
    torch.set_num_threads(1)  # two processes on a shared machine
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=TIMEOUT_S // 2))
    try:
        results = {}
        for mode in ("ddp", "fsdp2"):
            try:
                results[mode] = _train(rank, mode)
            except Exception as e:  # reported by that mode's test; the other mode still runs
                results[mode] = f"{type(e).__name__}: {e}"
                dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ranks")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):  # a rank's exception is raised here, with its traceback
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the ranks did not finish within {TIMEOUT_S} s")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def check(results: list[dict]) -> None:
    for r, res in enumerate(results):
        assert isinstance(res, dict), f"rank {r} failed: {res}"
    for step, (grads0, grads1) in enumerate(zip(results[0]["grads"], results[1]["grads"])):
        for g0, g1 in zip(grads0, grads1):
            assert torch.equal(g0, g1), f"step {step}: gradients differ across ranks after the reduction"
    want = train_single()
    for r, res in enumerate(results):
        assert len(res["params"]) == len(want)
        for i, (got, ref) in enumerate(zip(res["params"], want)):
            err = (got - ref).abs().max().item()
            assert err <= TOL, f"rank {r}, parameter {i}: {err:.3g} from the single-process run"
    # the training moved the weights well beyond the bound, so matching them means something
    assert max((p - q).abs().max().item() for p, q in zip(want, make_model().parameters())) > 1e-3


def test_ddp(ranks):
    check([res["ddp"] for res in ranks])


def test_fsdp2(ranks):
    """FSDP2 on the CPU with gloo: parameters and gradients are DTensor shards (gathered whole to compare)."""
    check([res["fsdp2"] for res in ranks])


# -- an example under torchrun ------------------------------------------------------------------------------
MEMORY_ARGS = ["--lengths", "5", "--cells", "lstm", "--steps", "40", "--hidden", "16", "--test-size", "200"]
RESULT_LINE = re.compile(r"T=5\s+lstm\s+accuracy ([\d.]+)\s+MSE ([\d.]+)")


def test_memory_example_under_torchrun(tmp_path, capsys):
    """Two DDP processes, each on half of every batch, train as one process on the whole batch does."""
    pytest.importorskip("matplotlib")
    from fusedrnn.examples import memory
    single = memory.main(MEMORY_ARGS + ["--out", str(tmp_path / "one")])
    capsys.readouterr()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fusedrnn.examples.memory", *MEMORY_ARGS, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("2 processes (DDP)") == 1, proc.stdout  # rank 0 alone prints
    found = RESULT_LINE.findall(proc.stdout)
    assert len(found) == 1, proc.stdout
    accuracy, mse = map(float, found[0])
    # printed to 3 and 4 decimals; a rank training on its half alone lands far off
    assert abs(mse - single["mse"]["lstm"][0]) <= 2e-4 and abs(accuracy - single["accuracy"]["lstm"][0]) <= 0.01, \
        (proc.stdout, single)
    assert os.path.isfile(tmp_path / "two" / "memory.png")
