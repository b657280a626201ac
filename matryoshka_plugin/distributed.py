"""torch.distributed for the plugin's trainers under ``torchrun`` (CPU and GPU).

``join_process_group`` joins the group ``torchrun`` describes in the environment
(``LOCAL_RANK``, ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL for a
CUDA device, gloo for the CPU, both with a timeout so that a dead rank ends the others
instead of leaving them waiting. ``reporting_lost_ranks`` turns the error a collective
then raises into one ``PeerLostError`` line naming the rank that saw it.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from .core.errors import PeerLostError, UsageError

DEFAULT_TIMEOUT_S = 600
"""How long a collective waits for the other ranks before this rank gives up."""


def launched() -> bool:
    """Whether this process is one rank of a ``torchrun`` launch (as upstream decides)."""
    return os.environ.get("LOCAL_RANK") is not None


def rank() -> int:
    """This process's global rank; 0 outside a process group."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks; 1 outside a process group."""
    return dist.get_world_size() if dist.is_initialized() else 1


def join_process_group(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> int | None:
    """Join torchrun's process group for ``device``; the local rank, or None when alone."""
    if not timeout_s > 0:
        raise UsageError(f"--dist_timeout {timeout_s}: must be a positive number of seconds")
    if not launched():
        return None
    local_rank = int(os.environ["LOCAL_RANK"])
    if dist.is_initialized():
        return local_rank
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"LOCAL_RANK {local_rank} has no GPU: this node has "
                f"{torch.cuda.device_count()}; lower --nproc_per_node"
            )
        torch.cuda.set_device(local_rank)
        dist.init_process_group(
            "nccl", device_id=torch.device("cuda", local_rank), timeout=timeout
        )
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return local_rank


def leave_process_group() -> None:
    """Leave the group after a run that ended normally (every rank reaches this)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _short_reason(error: BaseException) -> str:
    """gloo's message without its source path and its boilerplate advice."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". ")[0]


@contextmanager
def reporting_lost_ranks(resume_hint: str) -> Iterator[None]:
    """Turn a collective's failure (a dead or stalled rank) into one ``PeerLostError``."""
    try:
        yield
    except RuntimeError as e:
        # NCCL raises DistError subclasses; gloo plain RuntimeErrors from its transport
        # ("gloo/transport/tcp/pair.cc: Connection closed by peer", "Timed out waiting").
        if not dist.is_initialized() or not (isinstance(e, dist.DistError) or "gloo/" in str(e)):
            raise
        reason = _short_reason(e)
        raise PeerLostError(
            f"rank {dist.get_rank()} of {dist.get_world_size()}: another rank died or "
            f"stopped answering ({reason}); {resume_hint}"
        ) from None
