"""One code path for 1 process, many GPUs and many nodes: the same command, optionally under `torchrun`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them we run as a single process. CPU runs use
the `gloo` backend, GPU runs `nccl`. Only rank 0 writes files (checkpoints, logs, artifacts).
"""
from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: Optional[str] = None, local_rank: int = 0) -> torch.device:
    """`requested` ('cpu', 'cuda', 'cuda:1'), else DEVICE, else the local GPU when there is one."""
    name = requested or os.environ.get("DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: Optional[str] = None) -> DistInfo:
    """Join the process group when launched by torchrun; otherwise a 1-process DistInfo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def cleanup_distributed() -> None:
    """Leave the process group. No barrier: rank 0 may still be evaluating, and a barrier that waits
    longer than the collective timeout (10 min for NCCL) would kill the run."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: object, src: int = 0) -> object:
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel without per-step buffer broadcasts: the only buffers are frozen (trunk
    BatchNorm statistics, pos_embed, text embeddings) and identical on every rank."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    kwargs = {"device_ids": [device] if device.type == "cuda" else None}
    params = inspect.signature(DDP.__init__).parameters
    kwargs["forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"] = False
    return DDP(module, **kwargs)


class ShardedSampler(Sampler[int]):
    """DistributedSampler's rule (seeded shuffle per epoch, padded to equal shards, rank::world)
    plus a `skip` of already-consumed indices, so a run resumed mid-epoch sees the rest of the same order.

    With world size W and per-process batch b, global step k covers positions [kWb, (k+1)Wb) of the
    shuffled order in both a W-process run and a 1-process run with batch Wb, so they see the same images.
    """

    def __init__(self, size: int, world_size: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0) -> None:
        self.size, self.world_size, self.rank = size, world_size, rank
        self.shuffle, self.seed = shuffle, seed
        self.epoch = 0
        self.skip = 0
        self.per_rank = -(-size // world_size)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def global_order(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        total = self.per_rank * self.world_size
        while len(order) < total:
            order += order[: total - len(order)]
        return order

    def rank_order(self) -> List[int]:
        """This rank's indices: position p of the global batch stream goes to rank p % W."""
        return self.global_order()[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_order()[self.skip :])

    def __len__(self) -> int:
        return self.per_rank - self.skip


class RunLogger:
    """Rank-0 step log: CSV (step, epoch, lr, losses, time), TensorBoard scalars, and a tqdm bar."""

    def __init__(self, out_dir: Path, total_steps: int, initial_step: int, enabled: bool,
                 progress: bool = True, tensorboard: bool = True, desc: str = "train") -> None:
        self.enabled = enabled
        self.start = time.time()
        self.csv_path = out_dir / "logs" / "train.csv"
        self._writer = None
        self._bar = None
        self._fields: Optional[List[str]] = None
        if not enabled:
            return
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        if self.csv_path.exists():
            self._fields = next(csv.reader(self.csv_path.open(encoding="utf-8")), None)
            self._truncate_after(initial_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(out_dir / "tb"), purge_step=initial_step + 1 if initial_step else None)
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc=desc, unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint, so the CSV has each step once."""
        rows = list(csv.DictReader(self.csv_path.open(encoding="utf-8")))
        keep = [r for r in rows if int(r["step"]) <= step]
        with self.csv_path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=self._fields or [])
            w.writeheader()
            w.writerows(keep)

    def log(self, step: int, epoch: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "epoch": epoch, **{k: float(v) for k, v in values.items()},
               "time": round(time.time() - self.start, 3)}
        new_file = not self.csv_path.exists() or self._fields is None
        if new_file:
            self._fields = list(row)
        with self.csv_path.open("a", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=self._fields, extrasaction="ignore")
            if new_file:
                w.writeheader()
            w.writerow(row)
        if self._writer is not None:
            for k, v in values.items():
                self._writer.add_scalar(f"train/{k}", float(v), step)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}", lr=f"{values.get('lr', 0):.2e}")

    def scalars(self, prefix: str, values: Dict[str, float], step: int) -> None:
        if self.enabled and self._writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and v is not None:
                    self._writer.add_scalar(f"{prefix}/{k}", float(v), step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()


def read_csv_log(path: Path) -> List[Dict[str, float]]:
    """The step log as floats (tests and reports)."""
    with Path(path).open(encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """Round-robin share of a work list (feature dumps, evaluation)."""
    return list(items[rank::world_size])
