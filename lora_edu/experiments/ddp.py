"""Data-parallel LoRA with torch.distributed: every rank holds the model, gradients are averaged.

DistributedDataParallel (DDP) keeps one full copy of the model on every process
("rank"). Each rank computes the loss and gradients of its own shard of the
batch; DDP then averages the gradients over the ranks with an all-reduce, so
every rank applies the same update and the copies stay identical. With equal
shards, the average of the shard gradients is the gradient of the whole batch,
so training matches one process on the concatenated batch::

    g = (1 / N) * (g_0 + g_1 + ... + g_{N-1})

DDP all-reduces only parameters that require a gradient. With LoRA the frozen
base has none, so each step sends the adapters' gradients only: 4 bytes per
trainable float32 number, not per parameter of the model. A communication hook
(`register_comm_hook`) counts the bytes of every bucket DDP hands it and then
does the all-reduce itself. This runs on CPU with the gloo backend on
127.0.0.1::

    python -m lora_edu.experiments.ddp --world-size 2 --steps 4 --mode both --json

Li et al., 2020, PyTorch Distributed (https://arxiv.org/abs/2006.15704).
"""

# No `from __future__ import annotations` here: DDP reads the hook's annotations at run time.

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP

from lora_edu.experiments.pretrained import load_pretrained_llama
from lora_edu.experiments.sequences import SequenceTask
from lora_edu.inject import LoRAConfig, add_lora

__all__ = ["DDPConfig", "CommCounter", "counting_allreduce_hook", "run", "single_process"]

MODES = ("lora", "full")


@dataclass
class DDPConfig:
    """One data-parallel run: the same model, task and data on every rank."""

    world_size: int = 2  # processes (ranks), each on one CPU thread
    steps: int = 4  # optimizer steps
    batch_per_rank: int = 8  # sequences per rank and step (global batch = world_size x this)
    accum: int = 1  # micro-batches per step; all but the last run under no_sync()
    modes: tuple[str, ...] = MODES  # "lora" (adapters only) and/or "full" (every parameter)
    r: int = 8  # LoRA rank
    targets: "str | list[str]" = "all-linear"  # LoRA target_modules
    lr: float = 3e-3  # AdamW learning rate
    seed: int = 0  # seeds the adapters' initialization (the base is loaded from a file)
    data_seed: int = 1  # seeds the data stream, the same on every rank
    bucket_cap_mb: float = 25.0  # DDP's gradient bucket size in MiB (25 is its default)
    timeout_s: float = 60.0  # a collective waiting longer than this fails instead of hanging

    def __post_init__(self):
        for name in ("world_size", "steps", "batch_per_rank", "accum", "r"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.batch_per_rank % self.accum:
            raise ValueError(
                f"batch_per_rank ({self.batch_per_rank}) must be a multiple of accum ({self.accum})"
            )
        self.modes = tuple(self.modes)
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"modes must be a non-empty subset of {MODES}, got {self.modes!r}")
        if not self.bucket_cap_mb > 0 or not self.timeout_s > 0:
            raise ValueError("bucket_cap_mb and timeout_s must be > 0")


@dataclass
class CommCounter:
    """What the hook saw in one backward pass: bytes all-reduced and buckets."""

    world_size: int
    bytes: int = 0
    buckets: list[int] = field(default_factory=list)  # bytes of each bucket, in order

    def reset(self) -> None:
        self.bytes, self.buckets = 0, []  # a new list: the old one may be kept in a record


def counting_allreduce_hook(
    state: CommCounter, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """Count a bucket's bytes, then average it over the ranks as DDP does by default.

    `bucket.buffer()` is one flat tensor holding the gradients of several
    parameters. The hook starts an asynchronous all-reduce (a sum over ranks) and
    returns a future whose value, the sum divided by the world size, DDP copies
    back into the parameters' `.grad`.
    """
    buffer = bucket.buffer()  # (numel,), the gradients of this bucket's parameters
    size = buffer.numel() * buffer.element_size()
    state.bytes += size
    state.buckets.append(size)
    work = dist.all_reduce(buffer, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0].div_(state.world_size))


def _model(cfg: DDPConfig, mode: str) -> torch.nn.Module:
    """The tiny pretrained LLaMA, with seeded LoRA adapters (mode "lora") or all trainable."""
    model = load_pretrained_llama()
    if mode == "lora":
        torch.manual_seed(cfg.seed)  # every rank draws the same lora_A
        add_lora(model, LoRAConfig(r=cfg.r, lora_alpha=2 * cfg.r, target_modules=cfg.targets))
    return model


def _batches(cfg: DDPConfig):
    """The global batch of every step, identical on all ranks: (world_size x batch_per_rank, 25)."""
    task, gen = SequenceTask("reverse"), torch.Generator().manual_seed(cfg.data_seed)
    for _ in range(cfg.steps):
        yield task, task.sample(cfg.world_size * cfg.batch_per_rank, gen)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    """The trainable parameters, flattened into one vector."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def single_process(cfg: DDPConfig, mode: str) -> dict:
    """The reference: one process trains on each step's whole (concatenated) batch."""
    model = _model(cfg, mode)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    losses = []
    for task, batch in _batches(cfg):
        loss = task.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "params": _flat(model)}


def _train_ddp(cfg: DDPConfig, mode: str, rank: int) -> dict:
    """Train one mode on this rank's shard of every batch; return what the hook counted."""
    model = _model(cfg, mode)
    ddp = DDP(model, bucket_cap_mb=cfg.bucket_cap_mb)  # broadcasts rank 0's weights
    counter = CommCounter(cfg.world_size)
    ddp.register_comm_hook(counter, counting_allreduce_hook)
    opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=cfg.lr)
    record = {"losses": [], "bytes": [], "buckets": [], "bucket_bytes": [], "micro_bytes": []}
    for task, batch in _batches(cfg):
        shard = batch.chunk(cfg.world_size)[rank]  # (batch_per_rank, 25)
        opt.zero_grad(set_to_none=True)
        counter.reset()
        step_loss = 0.0
        for i, micro in enumerate(shard.chunk(cfg.accum)):
            before = counter.bytes
            last = i == cfg.accum - 1
            with nullcontext() if last else ddp.no_sync():  # all-reduce on the last only
                loss = task.loss(ddp, micro) / cfg.accum
                loss.backward()
            record["micro_bytes"].append(counter.bytes - before)
            step_loss += loss.item()
        opt.step()
        record["losses"].append(step_loss)
        record["bytes"].append(counter.bytes)
        record["buckets"].append(len(counter.buckets))
        record["bucket_bytes"].append(counter.buckets)
    record["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    record["total"] = sum(p.numel() for p in model.parameters())
    record["params"] = _flat(model)
    return record


def _worker(rank: int, cfg: DDPConfig, port: int, out_dir: str) -> None:
    """One rank: join the process group, train every mode; rank 0 writes the results."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
        world_size=cfg.world_size, timeout=timedelta(seconds=cfg.timeout_s),
    )  # fmt: skip
    try:
        for mode in cfg.modes:
            start = time.perf_counter()
            record = _train_ddp(cfg, mode, rank)
            seconds = time.perf_counter() - start
            gathered = [torch.empty_like(record["params"]) for _ in range(cfg.world_size)]
            dist.all_gather(gathered, record["params"])  # every rank's final parameters
            losses = torch.tensor(record["losses"], dtype=torch.float64)
            dist.all_reduce(losses)  # the mean loss over ranks = the loss of the whole batch
            if rank == 0:
                record["rank_diff"] = max((g - gathered[0]).abs().max().item() for g in gathered)
                record["losses"] = (losses / cfg.world_size).tolist()
                record["seconds"] = seconds
                _write(record, out_dir, mode)
    finally:
        dist.destroy_process_group()


def _write(record: dict, out_dir: str, mode: str) -> None:
    """Rank 0's record as JSON plus its parameters as safetensors (never pickle)."""
    save_file(
        {"params": record["params"].contiguous()}, os.path.join(out_dir, f"{mode}.safetensors")
    )
    rest = {k: v for k, v in record.items() if k != "params"}
    with open(os.path.join(out_dir, f"{mode}.json"), "w") as f:
        json.dump(rest, f)


def _read(out_dir: str, mode: str) -> dict:
    with open(os.path.join(out_dir, f"{mode}.json")) as f:
        record = json.load(f)
    record["params"] = load_file(os.path.join(out_dir, f"{mode}.safetensors"))["params"]
    return record


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cfg: Optional[DDPConfig] = None, **overrides) -> dict:
    """Train with DDP on `cfg.world_size` CPU processes, then once in this process; compare.

    Returns:
        per mode: trainable and total parameters, bytes and buckets all-reduced per
        step (and per micro-batch), the DDP loss per step beside the single-process
        loss, the largest parameter difference between ranks and from the
        single-process run, and the DDP wall time.
    """
    cfg = cfg or DDPConfig(**overrides)
    budget = cfg.timeout_s * (1 + len(cfg.modes))  # the whole run, start-up included
    with tempfile.TemporaryDirectory() as out_dir:
        procs = mp.spawn(
            _worker, args=(cfg, free_port(), out_dir), nprocs=cfg.world_size, join=False
        )
        deadline = time.monotonic() + budget
        try:
            while not procs.join(timeout=0.5):  # raises if a worker failed
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the DDP workers did not finish in {budget:.0f} s")
        finally:
            for p in procs.processes:
                if p.is_alive():
                    p.terminate()
        results = {m: _read(out_dir, m) for m in cfg.modes}
    return {mode: _compare(cfg, mode, results[mode]) for mode in cfg.modes}


def _compare(cfg: DDPConfig, mode: str, record: dict) -> dict:
    """Add the single-process reference to one mode's DDP record."""
    ref = single_process(cfg, mode)
    params = record.pop("params")
    return {
        **record,
        "reference_losses": ref["losses"],
        "loss_diff": max(abs(a - b) for a, b in zip(record["losses"], ref["losses"])),
        "param_diff": (params - ref["params"]).abs().max().item(),
    }


def main(argv: Optional[list] = None) -> int:
    """Command line: run, then print JSON (--json) or a short table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-per-rank", type=int, default=8)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--mode", choices=[*MODES, "both"], default="both")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--bucket-cap-mb", type=float, default=25.0)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per collective")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # the reference run, like each rank
    cfg = DDPConfig(
        world_size=a.world_size, steps=a.steps, batch_per_rank=a.batch_per_rank, accum=a.accum,
        modes=MODES if a.mode == "both" else (a.mode,), r=a.r, bucket_cap_mb=a.bucket_cap_mb,
        timeout_s=a.timeout,
    )  # fmt: skip
    out = {"config": asdict(cfg), "results": run(cfg)}
    if a.json:
        print(json.dumps(out))
        return 0
    results = out["results"]
    for mode, res in results.items():
        print(f"{mode}: {res['trainable']:,} trainable, {res['bytes'][-1]:,} bytes per step, "
              f"loss diff {res['loss_diff']:.2e}, rank diff {res['rank_diff']:.2e}")  # fmt: skip
    if len(results) == 2:
        ratio = results["lora"]["bytes"][-1] / results["full"]["bytes"][-1]
        print(f"LoRA / full bytes per step: {ratio:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
