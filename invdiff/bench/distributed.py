"""One process per GPU under ``torchrun``: the process group that ``invdiff bench`` and
``invdiff reconstruct`` share.

Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE > 1``) :func:`init_distributed` starts
the process group (NCCL when the device is CUDA, gloo otherwise; rank ``r`` uses
``cuda:<LOCAL_RANK>``, :meth:`ProcessGroup.device`); without torchrun it is the one-process
group, where every method is a no-op. Work is split by :meth:`ProcessGroup.share` (a
contiguous block per rank, so that concatenating the ranks' results in rank order gives the
original order) and collected by :meth:`ProcessGroup.gather` (tensors, padded to a common
length and concatenated) and :meth:`ProcessGroup.gather_json` (JSON records, sent as bytes:
nothing is unpickled).
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ProcessGroup", "init_distributed"]


@dataclass
class ProcessGroup:
    """This process's place in the run: ``rank`` of ``world`` processes (one per GPU).

    :ivar owned: this process started the group (and :meth:`close` ends it).
    :ivar backend: ``"nccl"``, ``"gloo"``, or ``None`` for one process.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False
    backend: str | None = None

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if self.backend == "nccl":
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owned = False

    def device(self, device: str | torch.device) -> str:
        """``device`` for this rank: a bare ``"cuda"`` is ``cuda:<LOCAL_RANK>`` under torchrun."""
        device = str(device)
        return f"cuda:{self.local_rank}" if self.world > 1 and device == "cuda" else device

    def share(self, n: int) -> range:
        """This rank's contiguous block of ``range(n)`` (the first ``n % world`` ranks get one more)."""
        per, extra = divmod(int(n), self.world)
        start = self.rank * per + min(self.rank, extra)
        return range(start, start + per + (1 if self.rank < extra else 0))

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def gather(self, t: Tensor) -> Tensor:
        """Every rank's ``t`` (same trailing shape and dtype, any length) concatenated along
        dim 0 in rank order, on every rank, on the CPU; ``t`` itself for one process."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        dev = self._comm_device()
        n = torch.tensor([t.shape[0]], device=dev, dtype=torch.long)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        top = max(sizes)
        padded = torch.zeros((top, *t.shape[1:]), device=dev, dtype=t.dtype)
        padded[: t.shape[0]] = t.to(dev)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:s].cpu() for p, s in zip(parts, sizes)])

    def gather_json(self, records: list) -> list:
        """Every rank's list of JSON-serialisable records, concatenated in rank order, on every
        rank (sent as UTF-8 bytes: nothing is unpickled)."""
        if self.world == 1:
            return list(records)
        data = torch.frombuffer(bytearray(json.dumps(records, default=str).encode()), dtype=torch.uint8)
        parts = self.gather(data.clone()).numpy().tobytes()
        lengths = self.gather(torch.tensor([data.numel()], dtype=torch.long)).tolist()
        out, start = [], 0
        for size in lengths:
            out.extend(json.loads(parts[start:start + size].decode()))
            start += size
        return out


def init_distributed(device: str | torch.device) -> ProcessGroup:
    """The process group of this run: the one already initialised (not owned), a new one
    under torchrun (``WORLD_SIZE > 1``; NCCL for a CUDA ``device``, which sets
    ``cuda:<LOCAL_RANK>`` as the current device, gloo otherwise), else one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return ProcessGroup(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                            False, dist.get_backend())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ProcessGroup()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {str(device)!r} requested under torchrun but CUDA is not available")
        torch.cuda.set_device(local)
    # long timeout: the final barrier waits for the slowest rank
    dist.init_process_group(backend, timeout=datetime.timedelta(days=7))
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), local, True, backend)
