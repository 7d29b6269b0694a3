"""`transformers.Trainer` callbacks for Wiola models.

`F3NLevels` gives the article's Fractal FFN (`mlp=f3n` with `f3n_sampling` step or layer) one level draw per
optimizer step, from (seed, step) — what `wiola train` does — instead of one per forward: gradient
accumulation and data parallelism then train the same sub-networks as one big batch, and a resumed run
draws exactly the levels of an uninterrupted one.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from wiola.modeling_wiola import draw_f3n_levels


def step_levels(config, seed: int, step: int) -> torch.Tensor:
    """The F3N levels of optimizer step `step` (0-based) of a run seeded with `seed`."""
    return draw_f3n_levels(config, torch.Generator().manual_seed(seed * 1_000_003 + step))


class F3NLevels(TrainerCallback):
    """`Trainer(..., callbacks=[F3NLevels()])`: fix each step's F3N levels before its forwards."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        targets = [m for m in model.modules() if hasattr(m, "set_f3n_levels")] if model is not None else []
        if targets and targets[0].config.mlp == "f3n" and targets[0].config.f3n_sampling != "none":
            levels = step_levels(targets[0].config, args.seed, state.global_step)
            for m in targets:
                m.set_f3n_levels(levels)
