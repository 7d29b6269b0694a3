"""The reports of a comparison: results.json, results.md and val_loss.png, and the JSON file helpers.

`write_reports` gathers the finished entrants' result rows; `markdown_report` and
`plot_val_curves` render them. `_write_json` (atomic) and `_read_json` serve every output file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from wiola.compare.entrants import Entrant
from wiola.compare.spec import BASELINES, Spec
from wiola.data.manifest import content_id


# ---------------------------------------------------------------------------- JSON files


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two halves of a comparison may write at once
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# ---------------------------------------------------------------------------- reports


def _environment(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import platform

    import torch
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "devices": sorted({r["device"] for r in rows if r.get("device")}), "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
    return env


def data_summary(data_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The data block of results.json: directory, content id and fingerprint, vocabulary, split sizes."""
    splits = manifest["splits"]
    return {"dir": str(data_dir), "content": content_id(manifest), "fingerprint": manifest.get("fingerprint"),
            "vocab_size": manifest["vocab_size"],
            "train_tokens": splits["train"]["num_tokens"], "val_tokens": splits["val"]["num_tokens"]}


def entrant_notes(entrants: list[dict[str, Any]]) -> list[str]:
    """The "Notes:" lines of a markdown report (empty when no entrant has a note)."""
    notes = [f"- {r['name']}: {r['note']}" for r in entrants if r.get("note")]
    return ["", "Notes:", *notes] if notes else []


def write_reports(*, spec: Spec, out: Path, data_dir: Path, manifest: dict[str, Any], options: dict[str, Any],
                  entrants: list[Entrant], plot: bool = True) -> None:
    """results.json, results.md and (with `plot`) val_loss.png from the finished entrants (in spec order)."""
    rows, pending = [], []
    for e in entrants:
        row = _read_json(out / "runs" / e.slug / "result.json")
        (rows.append(row) if row is not None else pending.append(e.name))
    summary = {
        "spec": str(spec.path),
        "data": data_summary(data_dir, manifest),
        "train": options,
        "shape": spec.shape,
        "tokens_per_step": options.get("batch_size", 32) * options["seq_len"],
        "environment": _environment(rows),
        "entrants": rows,
        "pending": pending,
    }
    _write_json(out / "results.json", summary)
    (out / "results.md").write_text(markdown_report(summary), encoding="utf-8")
    if plot:
        plot_val_curves(rows, out / "val_loss.png")


def _fmt(value: Any, spec: str = ",.0f", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def _memory(row: dict[str, Any]) -> str:
    b = row.get("peak_memory_bytes")
    if b is None:
        return "n/a"
    mark = {"cuda_max_memory_allocated": "", "cpu_peak_rss": " (RSS)"}.get(row.get("peak_memory_kind"), " (?)")
    return f"{b / 2**20:,.0f} MiB{mark}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h {m:02d}m" if hours else (f"{m}m {s:02d}s" if m else f"{seconds:.1f} s")


TABLE_HEADER = ("entrant", "kind", "parameters", "tokens seen", "best val loss", "best val ppl", "final val loss",
                "final val ppl", "tokens/s", "peak memory", "wall time")


def markdown_report(summary: dict[str, Any]) -> str:
    """The comparison as markdown: the setting, one table row per finished entrant, notes."""
    t, data = summary["train"], summary["data"]
    lines = [
        f"# wiola compare: `{summary['spec']}`", "",
        f"Data `{data['dir']}`: vocabulary {data['vocab_size']}, {data['train_tokens']:,} train / {data['val_tokens']:,} validation tokens. "
        f"Every entrant: {t.get('max_steps', 1000)} steps x batch {t.get('batch_size', 32)} x {t['seq_len']} tokens "
        f"({summary['tokens_per_step']:,} tokens/step), lr {t.get('lr', 6e-4)}, seed {t.get('seed', 1337)}, "
        f"evaluation every {t.get('eval_every', 250)} steps on up to {t.get('eval_batches', 10)} batches.", "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---|" * 2 + "---:|" * (len(TABLE_HEADER) - 2),
    ]
    for r in summary["entrants"]:
        status = "" if r["status"] == "done" else f" ({r['status'].replace('_', '-')} at step {r['steps']})"
        lines.append("| " + " | ".join([
            f"{r['name']}{status}", r["kind"], _fmt(r["parameters"]), _fmt(r["tokens_seen"]),
            _fmt(r["best_val_loss"], ".4f"), _fmt(r["best_val_ppl"], ".2f"), _fmt(r["final_val_loss"], ".4f"),
            _fmt(r["final_val_ppl"], ".2f"), _fmt(r["tokens_per_s"]), _memory(r), _duration(r["wall_time_s"]),
        ]) + " |")
    env = summary["environment"]
    lines += ["", f"Devices: {', '.join(env['devices']) or '–'}{' (' + env['cuda_device'] + ')' if env.get('cuda_device') else ''}; "
              f"torch {env['torch']}, transformers {env['transformers']}.",
              "Peak memory: CUDA `max_memory_allocated` on a GPU; on a CPU the process peak resident set size "
              "during that entrant's training (marked RSS; it includes the Python and PyTorch runtime).",
              "Tokens/s: median over the training log windows (evaluation and checkpoint time fall in a few windows only). "
              "Wall time: the whole `train()` call(s), evaluation and checkpoints included."]
    lines += entrant_notes(summary["entrants"])
    if summary["pending"]:
        lines += ["", f"Not finished yet: {', '.join(summary['pending'])}."]
    return "\n".join(lines) + "\n"


def plot_val_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """Validation loss against step for every finished entrant (matplotlib, Agg backend).

    Baselines are dashed, ablations dotted, Wiola entrants solid; the legend sits beside the axes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = [plt.get_cmap("tab20")(i) for i in range(20)] + [plt.get_cmap("tab20b")(i) for i in range(20)]
    fig, ax = plt.subplots(figsize=(12, 6))
    for i, r in enumerate(r for r in rows if r["val_curve"]):
        steps, losses = zip(*r["val_curve"])
        style = "--" if r["kind"] in BASELINES else (":" if r["kind"] == "ablation" else "-")
        ax.plot(steps, losses, style, color=colors[i % len(colors)], marker="o", markersize=2.5, linewidth=1.3, label=r["name"])
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("wiola compare: validation loss")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
