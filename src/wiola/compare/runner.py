"""Running a comparison: `compare()`, one entrant at a time (`run_entrant`), and the `wiola compare` command.

Also the measurements of a run: peak memory (`PeakMemory`) and the result row of an entrant
(`summarize_run`), and the training options shared by every entrant (`training_options`).

The reports (results.json, results.md) are rewritten after every entrant; the plot val_loss.png at most every
`PLOT_EVERY_S` seconds, and at the end or on an interruption. While a comparison runs, the objects that existed
before it are frozen out of the garbage collector (`gc.freeze`), so that the collection before each entrant's
peak-memory measurement scans only what the comparison made (0.3 s a collection otherwise, in a process with
torch and transformers loaded).
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Literal

from wiola.compare.entrants import Entrant, _data_fields, resolve_entrants
from wiola.compare.report import _read_json, _write_json, write_reports
from wiola.compare.seeds import write_seed_reports
from wiola.compare.spec import RUNTIME_OPTIONS, Spec, check_seeds, load_spec, prepare_data
from wiola.data.manifest import content_id
from wiola.errors import WiolaError


PLOT_EVERY_S = 30.0

# ---------------------------------------------------------------------------- measuring


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (Linux VmHWM); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakMemory:
    """Peak memory of one training session: CUDA `max_memory_allocated`, else the process peak RSS."""

    def __init__(self) -> None:
        """Start measuring: collect garbage and reset the peak counters."""
        import torch

        gc.collect()
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.rss_ok = _reset_peak_rss()

    def read(self, device: str) -> tuple[int | None, str]:
        import torch

        if device.startswith("cuda") and self.cuda:
            return int(torch.cuda.max_memory_allocated()), "cuda_max_memory_allocated"
        return (_peak_rss_bytes(), "cpu_peak_rss") if self.rss_ok else (None, "unavailable")


def _ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))


def summarize_run(run_dir: Path, meta: dict[str, Any], status: str, error: str | None = None) -> dict[str, Any]:
    """The result row of an entrant from its training log and the sessions recorded in `entrant.json`."""
    from wiola.train.metrics import read_log

    records = read_log(run_dir / "log.jsonl")
    starts = [r for r in records if r.get("event") == "start"]
    train = [r for r in records if "loss" in r and "step" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and math.isfinite(r["val_loss"])]
    sessions = meta.get("sessions", [])
    peaks = [s["peak_memory_bytes"] for s in sessions if s.get("peak_memory_bytes") is not None]
    kinds = {s.get("peak_memory_kind") for s in sessions if s.get("peak_memory_bytes") is not None}
    best = min(v for _, v in val) if val else None
    final = val[-1][1] if val else None
    rates = [r["tokens_per_s"] for r in train if r.get("tokens_per_s")]
    return {
        "name": meta["name"], "kind": meta["kind"], "status": status,
        "parameters": starts[0]["parameters"] if starts else None,
        "budget": meta.get("budget"),
        "steps": train[-1]["step"] if train else 0,
        "tokens_seen": train[-1]["tokens"] if train else 0,
        "best_val_loss": best, "best_val_ppl": _ppl(best),
        "best_val_step": next(s for s, v in val if v == best) if val else None,
        "final_val_loss": final, "final_val_ppl": _ppl(final),
        "tokens_per_s": statistics.median(rates) if rates else None,
        "peak_memory_bytes": max(peaks) if peaks else None,
        "peak_memory_kind": kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "unavailable"),
        "wall_time_s": sum(s["wall_s"] for s in sessions),
        "sessions": len(sessions),
        "device": starts[-1].get("device") if starts else None,
        "threads": starts[-1].get("threads") if starts else None,
        "error": error,
        "note": meta.get("note", ""),
        "config": meta["config"],
        "val_curve": val,
        "run_dir": str(run_dir),
    }


# ---------------------------------------------------------------------------- running


def _setting_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _setting_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return diffs


def _upgrade_data_setting(meta: dict[str, Any], setting: dict[str, Any], fingerprint: str | None) -> None:
    """A run recorded before data were identified by content names the inputs' fingerprint; when that is the
    fingerprint of the data prepared now, the same inputs gave the same tokens, so it counts as this content."""
    data = (meta.get("setting") or {}).get("data")
    if isinstance(data, dict) and "content" not in data and fingerprint and data.get("fingerprint") == fingerprint:
        meta["setting"]["data"] = dict(setting["data"])


def run_entrant(e: Entrant, k: int, n: int, *, out: Path, data_dir: Path, options: dict[str, Any],
                setting: dict[str, Any], keep_checkpoints: bool, data_fingerprint: str | None = None) -> tuple[str, int]:
    """Train (or resume, or skip) one entrant; returns (status, exit code); status is done, non_finite or interrupted."""
    from wiola.train import checkpoint, trainer
    from wiola.train.metrics import read_log

    run_dir = out / "runs" / e.slug
    meta_path, result_path = run_dir / "entrant.json", run_dir / "result.json"
    config_path = out / "configs" / f"{e.slug}.json"
    wanted = {"name": e.name, "kind": e.kind, "config": e.fields, "setting": setting}
    meta = _read_json(meta_path)
    latest = checkpoint.resolve(run_dir / "checkpoints" / "latest")
    finished = meta is not None and result_path.is_file()
    resume = meta is not None and not finished and (latest / checkpoint.STATE_FILE).is_file()
    if finished or resume:  # something to keep: it must be what this spec asks for
        _upgrade_data_setting(meta, setting, data_fingerprint)
        diffs = _setting_differences({key: meta.get(key) for key in wanted}, json.loads(json.dumps(wanted)))
        if diffs:
            raise WiolaError(f"{run_dir} was trained for a different setting or config ({'; '.join(diffs[:6])}); "
                             f"use a new OUT directory or delete {run_dir}")
    label = f"[{k}/{n}] {e.name} ({e.kind}, {e.parameters:,} parameters)"
    if finished:
        print(f"{label}: finished earlier, skipped")
        return _read_json(result_path)["status"], 0
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)  # a run stopped before its first checkpoint starts again
        meta = {**wanted, "sessions": []}
    meta.update(note=e.note, budget=e.budget, planned_parameters=e.parameters)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(config_path, e.fields)
    _write_json(meta_path, meta)
    if resume:
        step = int(_read_json(latest / checkpoint.STATE_JSON).get("step", 0)) if (latest / checkpoint.STATE_JSON).is_file() else "?"
        print(f"{label}: resuming from step {step}", flush=True)
    else:
        print(f"{label}: training", flush=True)

    status, error, code = "done", None, 0
    start = time.perf_counter()
    peak = PeakMemory()
    try:
        result = trainer.train(str(config_path), str(data_dir), str(run_dir), options=dict(options), resume=resume)
        if result.stopped_by is not None:
            status, code = "interrupted", result.exit_code or 130
    except trainer.NonFiniteLoss as exc:  # recorded as this entrant's result; the comparison goes on
        status, error = "non_finite", str(exc)
    records = [r for r in read_log(run_dir / "log.jsonl") if r.get("event") == "start"]
    memory, memory_kind = peak.read(records[-1].get("device", "cpu") if records else "cpu")
    meta["sessions"].append({"wall_s": time.perf_counter() - start, "peak_memory_bytes": memory,
                             "peak_memory_kind": memory_kind, "resumed": resume, "status": status})
    _write_json(meta_path, meta)
    if status == "interrupted":
        return status, code
    row = summarize_run(run_dir, meta, status, error)
    _write_json(result_path, row)
    if not keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    best = f"best val loss {row['best_val_loss']:.4f}" if row["best_val_loss"] is not None else "no validation loss"
    print(f"{label}: {status}, {best}, {row['tokens_seen']:,} tokens", flush=True)
    return status, code


def training_options(spec: Spec, overrides: dict[str, Any], entrants: list[Entrant]) -> dict[str, Any]:
    """The options every entrant is trained with: spec, then command-line overrides; seq_len made explicit."""
    from wiola.train.config import TrainConfig, check_threads

    options = {"tensorboard": False, **spec.train, **{k: v for k, v in overrides.items() if v is not None}}
    if "resume" in options:
        raise WiolaError("resume is not a training option of a comparison: run the same command again to resume")
    if options.get("seq_len") is None:
        options["seq_len"] = min(e.shape["context"] for e in entrants)
    TrainConfig.layered(options)  # unknown option names fail here, before anything trains
    for e in entrants:
        TrainConfig.layered(options, e.train)
    check_threads(options.get("threads"))
    return options


def compare(spec_path: str | Path, out: str | Path, *, only: list[str] | None = None, train_overrides: dict[str, Any] | None = None,
            shape_overrides: dict[str, Any] | None = None, seeds: list[int] | None = None, report_only: bool = False) -> int:
    """Run (or resume) a comparison; write the reports; return the exit status (0, or 128+signal when interrupted).

    With `seeds` (or the spec's `seeds`), every entrant is trained once per seed: OUT/seed-S/ is the
    whole comparison at train seed S, and OUT/results.* summarise the seeds (mean, std, Welch's t-test).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise WiolaError("wiola compare runs in a single process; start it without torchrun")
    gc.freeze()  # (see the module docstring) undone when the comparison ends, however it ends
    try:
        return _compare(spec_path, out, only=only, train_overrides=train_overrides, shape_overrides=shape_overrides,
                        seeds=seeds, report_only=report_only)
    finally:
        gc.unfreeze()


def _compare(spec_path: str | Path, out: str | Path, *, only: list[str] | None, train_overrides: dict[str, Any] | None,
             shape_overrides: dict[str, Any] | None, seeds: list[int] | None, report_only: bool) -> int:
    spec = load_spec(spec_path, shape_overrides)
    seeds = check_seeds(seeds) if seeds is not None else spec.seeds
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(spec, out)
    entrants = resolve_entrants(spec, _data_fields(data_dir))
    names = [e.name for e in entrants]
    if only:
        unknown = [name for name in only if name not in names]
        if unknown:
            raise WiolaError(f"--only: unknown entrant(s) {', '.join(map(repr, unknown))}; entrants: {', '.join(names)}")
    if spec.control is not None and spec.control not in names:
        raise WiolaError(f"{spec.path}: control {spec.control!r} is not an entrant; entrants: {', '.join(names)}")
    options = training_options(spec, train_overrides or {}, entrants)
    from wiola.train.batches import read_manifest

    manifest = read_manifest(data_dir)
    (out / "configs").mkdir(exist_ok=True)
    context = {"spec": spec, "data_dir": data_dir, "manifest": manifest, "entrants": entrants}
    total = len(entrants) * len(seeds or [None])
    print(f"wiola compare: {len(entrants)} entrants{f' x {len(seeds)} seeds' if seeds else ''} on {data_dir} "
          f"({options.get('max_steps', '?')} steps x {options.get('batch_size', '?')} x {options['seq_len']} tokens); results in {out}")
    if report_only:  # rewrite the reports from the finished runs; train nothing
        for sub, opts in ([(out / f"seed-{seed}", {**options, "seed": seed}) for seed in seeds] if seeds else [(out, options)]):
            if (sub / "runs").is_dir():
                write_reports(out=sub, options=opts, **context)
        if seeds:
            write_seed_reports(out=out, seeds=seeds, options=options, **context)
        print(f"wiola compare: wrote the reports in {out} from the finished runs")
        return 0
    if not seeds:
        return _run_setting(out, options, manifest, context, only, (0, total))
    if options.get("seed") is not None and spec.train.get("seed") is not None:
        print(f"wiola compare: note: the seeds {seeds} replace train.seed {options['seed']}", file=sys.stderr)
    for i, seed in enumerate(seeds):
        sub = out / f"seed-{seed}"
        (sub / "configs").mkdir(parents=True, exist_ok=True)
        code = _run_setting(sub, {**options, "seed": seed}, manifest, context, only, (i * len(entrants), total))
        write_seed_reports(out=out, seeds=seeds, options=options, **context)
        if code:
            return code
    print(f"wiola compare: wrote {out / 'results.md'} (mean and spread over {len(seeds)} seeds), {out / 'results.json'} "
          f"and {out / 'val_loss.png'}")
    return 0


def _run_setting(out: Path, options: dict[str, Any], manifest: dict[str, Any], context: dict[str, Any],
                 only: list[str] | None, position: tuple[int, int]) -> int:
    """Every entrant (or those in `only`) with one set of training options (and its own, `Entrant.train`), into
    `out`; its reports after each."""
    entrants, spec = context["entrants"], context["spec"]
    done, total = position
    code = 0
    plotted = time.monotonic()
    for k, e in enumerate(entrants, 1):
        if only and e.name not in only:
            continue
        own = {**options, **e.train}
        setting = {"data": {"content": content_id(manifest), "vocab_size": manifest["vocab_size"]},
                   "train": {key: v for key, v in own.items() if key not in RUNTIME_OPTIONS}}
        setting = json.loads(json.dumps(setting))
        status, code = run_entrant(e, done + k, total, out=out, data_dir=context["data_dir"], options=own, setting=setting,
                                   data_fingerprint=manifest.get("fingerprint"),
                                   keep_checkpoints=spec.keep_checkpoints)
        # the tables after every entrant; the plot (~0.5 s) at most every PLOT_EVERY_S seconds, and at the end
        plot = status == "interrupted" or time.monotonic() - plotted >= PLOT_EVERY_S
        write_reports(out=out, options=options, plot=plot, **context)
        plotted = time.monotonic() if plot else plotted
        if status == "interrupted":
            print(f"wiola compare: interrupted during {e.name}; run the same command again to resume", flush=True)
            return code
    write_reports(out=out, options=options, **context)
    print(f"wiola compare: wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'val_loss.png'}")
    return code


# ---------------------------------------------------------------------------- command


def compare_command(spec: str, out: str, only: list[str] | None = None, seeds: list[int] | None = None,
                    threads: int | None = None, report_only: bool = False, train: list[str] | None = None,
                    shape: list[str] | None = None, device: str | None = None,
                    dtype: Literal["auto", "fp32", "bf16"] | None = None) -> int:
    """Train several models on the same token stream and report them side by side.

    The spec (YAML/JSON, see configs/compare/) names the data, the training options and
    shape shared by every entrant, and the entrants: Wiola presets or configs, their
    single-component ablations, and LlamaForCausalLM / MistralForCausalLM / GPT2LMHeadModel
    baselines at a matched parameter budget. Writes OUT/results.json, OUT/results.md and
    OUT/val_loss.png (after every entrant) and one training run per entrant in OUT/runs/.
    Running the same command again resumes: finished entrants are skipped, a partial one continues.

    Args:
        spec: comparison spec file (YAML or JSON).
        out: output directory.
        only: train only these entrants (by name); the reports still list every finished one. Two
            processes with disjoint --only lists and --threads 1 can share one OUT (docs/results.md#side-by-side).
        seeds: train every entrant once per seed (weights, data order, dropout) into OUT/seed-S/ and
            report the mean and standard deviation of each entrant's best validation loss, with
            Welch's t-test against the spec's `control` entrant (default: the spec's `seeds`, else once).
        threads: CPU threads per training (default: the physical cores; 1 when running side by side).
        report_only: train nothing; rewrite OUT's reports from the runs finished so far.
        train: training option overrides, key=value (e.g. --train max_steps=200 eval_every=50), for smoke runs.
        shape: shape overrides, key=value (hidden_size, num_hidden_layers, num_attention_heads,
            num_key_value_heads, context, dropout).
        device: auto, cpu, cuda, cuda:N or mps (default: the spec's, else auto).
        dtype: auto (bf16 autocast on CUDA), fp32 or bf16 (default: the spec's, else auto).
    """
    from wiola.train.config import parse_overrides

    overrides = {**parse_overrides(train), "device": device, "dtype": dtype, "threads": threads}
    return compare(spec, out, only=only, train_overrides=overrides, shape_overrides=parse_overrides(shape), seeds=seeds,
                   report_only=report_only)
