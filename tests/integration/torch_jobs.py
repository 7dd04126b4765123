"""Training functions for the PyTorch tests (importable, so they also travel by value)."""
from __future__ import annotations

import os

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

INPUT_COLS = ["age", "income", "score"]


class SimpleNet(nn.Module):
    def __init__(self, n_in: int, hidden: int, n_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))

    def forward(self, x):
        return self.net(x)


def seed_style_train_func():
    """The issue's seed code, unchanged but for its imports."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from producer.pytorch import get_context

    context = get_context()
    dist.init_process_group(backend="gloo")
    torch.manual_seed(0)
    model = DDP(SimpleNet(len(INPUT_COLS), 32, 1))
    hp = context.get_hyper_params()
    optimizer = torch.optim.SGD(model.parameters(), lr=hp.get("lr", 0.05))
    loss_fn = nn.MSELoss()
    torch_dataset = context.get_dataset_map()["train"].get_shard().to_torch_dataset(batch_size=256)
    losses = []
    for epoch in range(hp.get("epochs", 3)):
        total, n = 0.0, 0
        for batch_dict in DataLoader(torch_dataset):
            features = torch.cat([batch_dict[col].T for col in INPUT_COLS], dim=1).float()
            features = (features - torch.tensor([50.0, 25000.0, 0.0])) / torch.tensor([20.0, 15000.0, 1.0])
            target = batch_dict["risk"].T.float()
            optimizer.zero_grad()
            loss = loss_fn(model(features), target)
            loss.backward()
            optimizer.step()
            total, n = total + loss.item(), n + 1
        losses.append(total / max(n, 1))
        context.get_metrics_reporter().log_metrics({"epoch": epoch, "loss": losses[-1]})
    flat = torch.cat([p.detach().flatten() for p in model.module.parameters()])
    context.report({"param_checksum": float(flat.double().sum()), "first_loss": losses[0],
                    "last_loss": losses[-1]})
    if context.get_rank() == 0:
        torch.save(model.module.state_dict(), os.path.join(context.get_model_dir(), "model.pt"))


def context_probe():
    """Reports what get_context() and the environment say, per rank."""
    import torch

    from producer.pytorch import get_context
    ctx = get_context()
    full = ctx.get_dataset_map()["full"].to_pandas()
    shard = ctx.get_dataset_map()["part"].get_shard().to_pandas()
    info = {"rank": ctx.get_rank(), "world": ctx.get_world_size(), "local_rank": ctx.get_local_rank(),
            "local_world": ctx.get_local_world_size(), "node_rank": ctx.get_node_rank(),
            "backend": ctx.get_default_backend(), "hp": ctx.get_hyper_params(),
            "env": {k: os.environ[k] for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                               "LOCAL_WORLD_SIZE", "NODE_RANK")},
            "full_rows": len(full), "shard_rows": len(shard), "shard_first": int(shard["i"].iloc[0]),
            "omp_threads": os.environ["OMP_NUM_THREADS"], "torch_threads": torch.get_num_threads()}
    import json
    with open(os.path.join(ctx.get_model_dir(), f"rank{ctx.get_rank()}.json"), "w") as f:
        json.dump(info, f)
    if ctx.get_rank() != 0:   # only rank 0's folder is uploaded: send ours through the metrics instead
        pass
    ctx.get_metrics_reporter().log_metrics({f"rank{ctx.get_rank()}": info})


def checkpointing():
    from producer.pytorch import get_context
    ctx = get_context()
    assert ctx.get_latest_checkpoint() is None
    for step in range(2):
        with open(os.path.join(ctx.get_checkpoint_dir(), "state.txt"), "w") as f:
            f.write(f"step {step}")
        ctx.report({"step": step}, checkpoint=True)
    latest = ctx.get_latest_checkpoint()
    with open(os.path.join(latest, "state.txt")) as f:
        ctx.report({"restored": f.read()})


def failing():
    from producer.pytorch import get_context
    if get_context().get_rank() == 1:
        raise ValueError("rank 1 does not like this data")


def exits_early():
    import sys
    sys.exit(3)


def forks_a_sleeper():
    from producer.pytorch import get_context
    pid = os.fork()
    if pid == 0:   # the grandchild: would outlive the job if nothing reaped it
        import time
        time.sleep(600)
        os._exit(0)
    get_context().get_metrics_reporter().log_metrics({"sleeper_pid": pid})


def writes_scratch_files():
    """Writes a relative file and a temp file; reports where they went (as the metrics of rank 0)."""
    import tempfile

    from producer.pytorch import get_context
    with open("relative.txt", "w") as f:
        f.write("x" * 1000)
    fd, tmp = tempfile.mkstemp(suffix=".bin")
    os.write(fd, b"y" * 1000)
    os.close(fd)
    from multiprocessing.connection import Listener
    with Listener() as listener:   # a Unix socket under TMPDIR, as a DataLoader's workers open: path < 108 bytes
        socket_path = listener.address
    get_context().get_metrics_reporter().log_metrics(
        {"relative": os.path.abspath("relative.txt"), "temp": tmp, "socket": socket_path,
         "model_dir": get_context().get_model_dir()})


def many_files_train_func():
    """Rank 0 leaves ``files`` model files (an upload that takes a while) and one named by a fresh id, so a
    model folder mixing two attempts' uploads would hold two of those."""
    import uuid

    from producer.pytorch import get_context
    context = get_context()
    folder = context.get_model_dir()
    for i in range(context.get_hyper_params()["files"]):
        with open(os.path.join(folder, f"part-{i:04d}.bin"), "wb") as f:
            f.write(os.urandom(256))
    with open(os.path.join(folder, f"attempt-{uuid.uuid4().hex}.txt"), "w") as f:
        f.write("this attempt's files")


def checkpoint_then_die_once():
    """The first attempt stores a checkpoint, then its process is killed (retried); the retry reports what
    get_latest_checkpoint() brought back."""
    import signal

    from producer.pytorch import get_context
    ctx = get_context()
    latest = ctx.get_latest_checkpoint()
    if latest is None:
        with open(os.path.join(ctx.get_checkpoint_dir(), "state.txt"), "w") as f:
            f.write("from the first attempt")
        ctx.report({"step": 1}, checkpoint=True)
        os.kill(os.getpid(), signal.SIGKILL)
    with open(os.path.join(latest, "state.txt")) as f:
        ctx.report({"restored": f.read()})


def _rss_anon() -> int:
    """This process's anonymous resident memory (the heap; mapped chunk files are file-backed)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("RssAnon:")).split()[1]) * 1024


def batch_order(dataset, label: str, epochs: int) -> list[float]:
    """Per epoch, a fingerprint of the order batches and rows come in (first labels, weighted by position)."""
    out = []
    for _ in range(epochs):
        total = 0.0
        for i, batch in enumerate(dataset):
            total += (i + 1) * float(batch[label][0]) + float(batch[label].sum())
        out.append(total)
    return out


def streamed_linear_train_func():
    """Linear regression with DDP over a shard streamed by ``to_torch_dataset`` (shuffled per epoch):
    reports the batch order it saw, the final weights and how much its heap grew while iterating."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from producer.pytorch import get_context

    context = get_context()
    dist.init_process_group(backend="gloo")
    hp = context.get_hyper_params()
    feats, label = hp["features"], hp["label"]
    dataset = context.get_dataset_map()["train"].get_shard().to_torch_dataset(
        batch_size=hp["batch_size"], shuffle=True, seed=hp["seed"])
    torch.manual_seed(0)
    model = DDP(nn.Linear(len(feats), 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=hp["lr"])
    loss_fn = nn.MSELoss()

    def step(x, y) -> None:
        optimizer.zero_grad()
        loss_fn(model(x).squeeze(1), y).backward()
        optimizer.step()
    # torch sets itself up (autograd, thread pools, gloo buffers) on the first step: before the heap is measured
    with torch.no_grad():
        saved = [p.clone() for p in model.parameters()]
    step(torch.zeros(hp["batch_size"], len(feats)), torch.zeros(hp["batch_size"]))
    with torch.no_grad():
        for p, v in zip(model.parameters(), saved):
            p.copy_(v)
    optimizer = torch.optim.SGD(model.parameters(), lr=hp["lr"])
    before = peak = _rss_anon()
    order = batch_order(dataset, label, 1)   # epoch 0: the order only
    peak = max(peak, _rss_anon())
    for _ in range(hp["epochs"]):
        for batch in dataset:
            step(torch.stack([batch[c] for c in feats], dim=1).float(), batch[label].float())
            peak = max(peak, _rss_anon())
    layer = model.module
    context.report({"order": order, "weights": layer.weight.detach().flatten().tolist(),
                    "bias": float(layer.bias.detach()[0]), "heap_growth": peak - before})
