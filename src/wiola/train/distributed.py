"""Process groups, devices and data-parallel wrapping.

`wiola train` runs as a single process, or under `torchrun` (which sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT): then each process joins a process group (NCCL on CUDA,
Gloo on CPU) and the model is wrapped with DDP or FSDP2 (`fully_shard` on every decoder
layer, then on the whole model). Everything here works unchanged when world_size is 1.
Full (unsharded) state dicts for checkpoints come from `torch.distributed.checkpoint.state_dict`,
which handles plain, DDP and FSDP2 models alike.

A lost process (a node killed, crashed or cut off) must end the run, not hang it: every collective
waits at most `--dist-timeout` seconds (the process group's timeout, for gloo and NCCL alike), and
`peer_failures` turns the backend's error into one line that names the checkpoint to resume from.
A peer whose connection closes (a killed process, a rebooted node) fails the next collective at once;
one that just stops answering (a frozen or cut-off node) fails it after the timeout.
A process that dies in native code (a segfault, an abort from the C heap) prints its Python stack first
(`faulthandler`), so that the launcher's "Signal 6 received by PID ..." comes with the line it died on.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from wiola.errors import WiolaError


@dataclass(frozen=True)
class Dist:
    """Where this process sits: rank among world_size processes, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; anything else is passed to torch.device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise WiolaError(f"unknown device {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WiolaError("--device cuda requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise WiolaError("--device mps requested but MPS is not available")
    return device


def setup(device_name: str = "auto", timeout_s: float = 1800.0) -> Dist:
    """Join the torchrun process group if launched by torchrun; pick this process's device.

    `timeout_s` bounds every collective (and the group's own rendezvous): a rank that waits longer
    for the others fails instead of hanging."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if world_size > 1:
        if not faulthandler.is_enabled():  # a native crash of one rank names its Python line (on this rank's stderr)
            faulthandler.enable(file=sys.stderr, all_threads=True)
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            backend = "nccl"
        elif device.type == "cpu":
            backend = "gloo"
        else:
            raise WiolaError(f"multi-process training supports cuda and cpu devices, not {device.type}")
        if not dist.is_initialized():
            dist.init_process_group(
                backend,
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=timeout_s),
                device_id=device if device.type == "cuda" else None,
            )
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def teardown(d: Dist) -> None:
    """Leave the process group after a successful run: every rank meets at a barrier first.

    Destroying a group while another rank is still inside a collective can hang (with gloo
    too), so after an error this is skipped and the launcher ends the other processes.
    """
    if d.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class LostPeer(WiolaError):
    """Another process of a multi-process run failed, left or stopped answering."""


# how the backends word a peer that is gone or silent (gloo's tcp transport, NCCL, the c10d store)
_PEER_SIGNS = ("gloo", "nccl", "connection reset", "connection closed", "broken pipe", "timed out", "socket")


def is_peer_failure(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because another rank is gone (not an error of this rank's own)."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(sign in str(exc).lower() for sign in _PEER_SIGNS)


@contextlib.contextmanager
def peer_failures(d: Dist, latest: Path) -> Iterator[None]:
    """Turn a collective's failure under torchrun into a one-line `LostPeer` naming the checkpoint to resume from."""
    try:
        yield
    except RuntimeError as exc:
        if not (d.enabled and is_peer_failure(exc)) or isinstance(exc, WiolaError):
            raise
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        first = first.split("] ", 1)[-1].split(". This is typically", 1)[0][:200]  # gloo's source location and advice
        step = _checkpoint_step(latest)
        where = (f"the last checkpoint is {latest} (step {step}): start every node again with --resume"
                 if step is not None else "no checkpoint was written yet: start the run again")
        raise LostPeer(f"rank {d.rank}: lost the other processes of the run ({first}); {where}") from exc


def _checkpoint_step(path: Path) -> int | None:
    """The step of the checkpoint at `path`, or None when there is none (or it cannot be read)."""
    import json

    try:
        return int(json.loads((path / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _torch_version() -> tuple[int, int]:
    return tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


def wrap_model(model: nn.Module, d: Dist, strategy: str, param_dtype: torch.dtype | None = None) -> nn.Module:
    """DDP or FSDP2 when world_size > 1; the model itself otherwise."""
    if not d.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [d.device.index] if d.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if d.device.type == "cpu" and _torch_version() < (2, 7):  # measured on 2.6.0: AttributeError deep in FSDP2's unshard
            raise WiolaError(f"--distributed fsdp on CPU needs torch 2.7 or later (this is {torch.__version__}, whose FSDP2 "
                             "records CUDA stream events); use --distributed ddp")

        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in decoder_layers(model):
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    raise WiolaError(f"unknown distributed strategy {strategy!r} (ddp or fsdp)")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: the first nn.ModuleList found (LLaMA-style `model.layers`)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return list(module)
    return []


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying model of a DDP wrapper (FSDP2 shards in place, so nothing to undo)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-steps that are not the last."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum a tensor over ranks (in place); a no-op for a single process."""
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj: Any, d: Dist) -> list[Any]:
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, d: Dist) -> Any:
    """Rank 0's `obj` on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict with plain parameter names (collective under FSDP: call on every rank)."""
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Unsharded optimizer state keyed by parameter name (collective under FSDP)."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def _plain_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in ("module", "_orig_mod"))


def complete_optimizer_state(model: nn.Module, state: dict[str, Any]) -> list[str]:
    """Give every parameter that has no optimizer state yet a fresh one, in place; returns their names.

    AdamW creates a parameter's state at its first gradient, so a parameter that has never had one (a frozen
    or not-yet-used part of the model) is absent from a checkpoint. Zero moments at step 0 are exactly the
    state AdamW would create on the first gradient, so resuming continues as the uninterrupted run would."""
    saved = state.get("state", {})
    if not saved:
        return []  # nothing was stepped yet: the optimizer starts fresh as it is
    template = next(iter(saved.values()))
    shapes = {_plain_name(name): tuple(p.shape) for name, p in model.named_parameters()}  # global shapes (DTensor too)
    missing = [name for group in state.get("param_groups", []) for name in group.get("params", []) if name not in saved]
    for name in missing:
        shape = shapes.get(_plain_name(str(name)))
        if shape is None:
            continue
        fresh = {}
        for key, value in template.items():
            if torch.is_tensor(value) and value.dim() > 0:
                fresh[key] = torch.zeros(shape, dtype=value.dtype, device=value.device)
            elif torch.is_tensor(value):
                fresh[key] = torch.zeros_like(value)  # the step counter
            else:
                fresh[key] = type(value)(0) if isinstance(value, (int, float)) else value
        saved[name] = fresh
    return [str(name) for name in missing]


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> list[str]:
    """Load a full (parameter-name keyed) optimizer state into the optimizer of a plain, DDP or FSDP2 model.
    Parameters without state in `state` start fresh (see `complete_optimizer_state`); returns their names."""
    from torch.distributed.tensor import DTensor

    fresh = complete_optimizer_state(model, state)
    if any(isinstance(t, DTensor) for t in model.parameters()):  # FSDP2: shard the full state
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return fresh
    # a plain or DDP model: parameter names -> the optimizer's own indices (torch 2.6's helper loses an empty group's
    # "params", e.g. the no-decay group of a LoRA run, and fails)
    names = {id(p): _plain_name(n) for n, p in model.named_parameters()}
    saved_groups = state.get("param_groups", [])
    if len(saved_groups) != len(optimizer.param_groups):
        raise WiolaError(f"the checkpoint's optimizer has {len(saved_groups)} parameter groups, this run's {len(optimizer.param_groups)}")
    index, groups = {}, []  # parameter name -> position in the optimizer (its state_dict's key)
    for saved, group in zip(saved_groups, optimizer.param_groups):
        start = len(index)
        index.update((names[id(p)], start + i) for i, p in enumerate(group["params"]))
        groups.append({**saved, "params": list(range(start, len(index)))})
    by_name = {_plain_name(str(n)): v for n, v in state.get("state", {}).items()}
    optimizer.load_state_dict({"state": {index[n]: v for n, v in by_name.items() if n in index}, "param_groups": groups})
    return fresh
