"""Run logs: JSON lines, TensorBoard scalars and the loss-curve plot.

Every record is one JSON object per line in `out/log.jsonl` (`{"step": .., "loss": ..}` for
training, `{"step": .., "val_loss": ..}` for validation, plus `event` records); numeric
fields are mirrored to TensorBoard under `out/tensorboard/` when tensorboard is installed.
Only rank 0 logs. At the end `plot_losses` draws `out/loss.png` from the JSONL file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class RunLog:
    """Append-only JSONL log with an optional TensorBoard mirror; inert when `enabled` is False."""

    def __init__(self, out: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = out / "log.jsonl"
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(log_dir=str(out / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled or self._file is None:
            return
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    tag = key if "/" in key else ("val/" + key[4:] if key.startswith("val_") else "train/" + key)
                    self._tb.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
    return records


def truncate_log(path: Path, step: int) -> None:
    """Drop records after `step` (written after the checkpoint a run resumes from)."""
    records = read_log(path)
    if not records:
        return
    kept = [r for r in records if r.get("step", 0) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def plot_losses(log_path: Path, png_path: Path) -> bool:
    """Training and validation loss against step, as a PNG; False when there is nothing to plot."""
    records = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and math.isfinite(r["val_loss"])]
    if not train and not val:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return True


def extra_metrics(output: Any) -> dict[str, float]:
    """Per-layer diagnostics a model may put on its output (e.g. `merge_ratios` of ATM layers).

    Any field of the output other than the standard ones that is a number, a tensor or a
    list of numbers is returned flat: `merge_ratios/3` for layer 3, etc.
    """
    import torch

    standard = {"loss", "logits", "past_key_values", "cache", "hidden_states", "attentions", "aux_loss", "aux_tokens", "router_logits"}
    keys = list(output.keys()) if hasattr(output, "keys") else []
    if hasattr(output, "merge_ratios") and "merge_ratios" not in keys:
        keys.append("merge_ratios")
    metrics: dict[str, float] = {}
    for key in keys:
        if key in standard:
            continue
        value = getattr(output, key, None)
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            if value.numel() > 256 or not (value.is_floating_point() or value.dtype in (torch.int64, torch.int32)):
                continue
            values = value.detach().float().flatten().tolist()
            single = value.ndim == 0
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            values, single = [float(value)], True
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float, torch.Tensor)) for v in value):
            values = [float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v) for v in value]
            single = False
        elif isinstance(value, dict) and all(isinstance(v, (int, float, torch.Tensor)) for v in value.values()):
            for k, v in value.items():
                metrics[f"{key}/{k}"] = float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)
            continue
        else:
            continue
        if single:
            metrics[key] = values[0]
        else:
            metrics.update({f"{key}/{i}": v for i, v in enumerate(values)})
    return metrics
