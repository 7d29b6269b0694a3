"""Optimizer and learning-rate schedules.

AdamW with two parameter groups: matrices are weight-decayed; 1-D parameters (norm gains
and offsets, biases, scalar gates) and embedding tables (input embeddings, and the LM head
when it is tied to them) are not. The schedules are warmup followed by cosine decay,
warmup-stable-decay (WSD) or a constant rate, expressed as a multiplier for
`torch.optim.lr_scheduler.LambdaLR`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from wiola.train.config import TrainConfig


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters excluded from weight decay: embeddings and every parameter with ndim < 2."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    names = set()
    for name, param in model.named_parameters():
        if param.ndim < 2 or id(param) in embedding_params:
            names.add(name)
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups; each parameter appears once even when weights are tied."""
    skip = no_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # named_parameters() de-duplicates tied tensors
        if not param.requires_grad:
            continue
        (no_decay if name in skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW (fused kernel on CUDA) over `param_groups`."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=1e-8,
        fused=device.type == "cuda" or None,
    )


def lr_multiplier(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the peak lr after `step` optimizer steps (0-based), for LambdaLR.

    Warmup rises linearly to 1 over `warmup_steps`; then `cosine` decays to `min_lr/lr`
    at `max_steps`, `wsd` stays at 1 until the last `decay_fraction` of the steps and then
    decays linearly to `min_lr/lr`, `constant` stays at 1. A plain closure is used on
    purpose: LambdaLR does not save functions, so a resume with a new `max_steps` takes effect.
    """
    warmup, total, floor = cfg.warmup_steps or 0, cfg.max_steps, (cfg.min_lr or 0.0) / cfg.lr
    schedule, decay_fraction = cfg.schedule, cfg.decay_fraction

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        if schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_steps = max(1, round(decay_fraction * (total - warmup)))
        decay_start = total - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / decay_steps)
        return floor + (1 - floor) * (1 - progress)

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg))
