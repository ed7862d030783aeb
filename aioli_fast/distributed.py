"""Where this process stands in the job, and the few collectives the package makes.

The one home of rank and world size: :func:`launch_info` reads what the launcher (torchrun, the
``deepspeed`` launcher, a Slurm script exporting the same variables) says before any process group
exists; :func:`group_info` reads the initialised default process group afterwards. Every collective here
is a no-op (or the identity) when the job has one process, so the same code runs alone and under
``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from .errors import AioliError, ConfigError

T = TypeVar("T")


class CollectiveError(RuntimeError):
    """A collective over the processes of a job failed: another process has died or cannot be reached.

    Raised (with the backend's error as its cause) by the collectives of this module and by the parts of
    a step that DeepSpeed runs collectives in (:func:`collectives`), so that a lost peer is recognised by
    its type. torch's own typed errors (``torch.distributed.DistError``: NCCL, store and network errors)
    count too: see :func:`is_collective_failure`.
    """


# torch.OutOfMemoryError exists from torch 2.5; the CUDA one before
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@contextlib.contextmanager
def collectives() -> Iterator[None]:
    """Inside: code whose failures in a job of several processes come from its collectives (gloo
    reports a lost peer as a plain ``RuntimeError``): they leave as :class:`CollectiveError`. Running
    out of memory is not a collective's failure and leaves as it is."""
    try:
        yield
    except _OUT_OF_MEMORY:
        raise
    except RuntimeError as exc:
        if isinstance(exc, CollectiveError) or not is_multiprocess():
            raise
        raise CollectiveError(str(exc)) from exc


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed collective (a lost peer), by its type or that of an error it chains."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, CollectiveError) or isinstance(exc, getattr(dist, "DistError", ())):
            return True
        exc = exc.__cause__
    return False


@dataclass(frozen=True)
class DistInfo:
    """This process' place in the job (rank 0 of 1 when it runs alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_info() -> DistInfo:
    """Rank, world size and local rank from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise ConfigError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({exc})") from exc
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return DistInfo(rank, world, local)


def group_info() -> DistInfo:
    """Rank and world size of the default process group (rank 0 of 1 when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def is_multiprocess() -> bool:
    """Whether collectives have peers (an initialised default group of more than one process)."""
    return group_info().world_size > 1


def all_reduce_(x: torch.Tensor, op=None, group=None) -> torch.Tensor:
    """In-place sum (or ``op``) of ``x`` over the ranks of ``group``; nothing when running alone."""
    if is_multiprocess():
        with collectives():
            dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=group)
    return x


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """A new tensor: ``x`` summed over all ranks (a copy of ``x`` when running alone)."""
    return all_reduce_(x.clone())


def barrier() -> None:
    """Wait for every rank (nothing when running alone)."""
    if is_multiprocess():
        with collectives():
            dist.barrier()


_HOST_GROUP: list = []  # [(the default group it was made for, the gloo group)]


def host_group():
    """A process group whose collectives run on CPU tensors (gloo), for agreements that must not wait
    for the accelerator: the default group when it is gloo, else a gloo group over the same ranks, made
    at the first call (every rank must make that call at the same point, as ``new_group`` requires:
    the trainer makes it at start-up) and made again if the default group is replaced."""
    if dist.get_backend() == "gloo":
        return None  # the default group
    if not _HOST_GROUP or _HOST_GROUP[0][0] is not dist.group.WORLD:
        _HOST_GROUP[:] = [(dist.group.WORLD, dist.new_group(backend="gloo"))]
    return _HOST_GROUP[0][1]


def shutdown() -> None:
    """Destroy the process groups (default and host) before the process exits. A gloo group left to
    the interpreter's shutdown sometimes aborts the process ("terminate called without an active
    exception") after the work is done; a command that made the groups calls this once at its end."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _HOST_GROUP.clear()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank: one all-reduce of a CPU tensor in :func:`host_group`, so
    the host waits for its peers but never for the device."""
    if not is_multiprocess():
        return flag
    box = torch.tensor([1 if flag else 0], dtype=torch.int32)
    with collectives():
        dist.all_reduce(box, op=dist.ReduceOp.MAX, group=host_group())
    return bool(box[0])


def all_ok(ok: bool, device: torch.device) -> bool:
    """Whether ``ok`` holds on every rank (one all-reduce when there are several)."""
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    return bool(all_reduce_(flag, op=dist.ReduceOp.MIN).item() > 0)


def on_rank0(fn: Callable[[], T], rank: int) -> T:
    """Run ``fn`` on rank 0 only; every rank returns its result, or raises if it failed.

    Keeps the other ranks from waiting forever in the next collective when rank 0 fails (a full disk,
    a finished run directory, a bad checkpoint path).
    """
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - every failure must reach the other ranks
            error = exc
    if is_multiprocess():
        # a user-facing error reaches the other ranks with its type and message, anything else as text
        if error is None:
            sent = None
        elif isinstance(error, AioliError):
            sent = (type(error), str(error))
        else:
            sent = (AioliError, f"rank 0 failed: {type(error).__name__}: {error}")
        box = [(result, sent)]
        with collectives():
            dist.broadcast_object_list(box, src=0)
        result, sent = box[0]
        if sent is not None and rank != 0:
            kind, message = sent
            try:
                raised = kind(message)
            except TypeError:  # an error type whose constructor takes other arguments
                raised = AioliError(message)
            raise raised
    if error is not None:
        raise error
    return result


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order, on every rank (``[obj]`` alone)."""
    if is_multiprocess():
        out = [None] * dist.get_world_size()
        with collectives():
            dist.all_gather_object(out, obj)
        return out
    return [obj]


def to_cpu(obj):
    """``obj`` with every tensor (in dicts, lists, tuples) copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj
