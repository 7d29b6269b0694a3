"""A comparison repeated over seeds: mean ± standard deviation per entrant and a test against the control.

`wiola compare --seeds A B C` trains every entrant once per seed into OUT/seed-S/ (each a whole
single-seed comparison with its own reports). `write_seed_reports` then writes OUT/results.json,
OUT/results.md and OUT/val_loss.png from the finished runs.

**The rule.** An entrant differs from the control (the spec's `control`, e.g. `llama-arch`) when
Welch's two-sided t-test on the per-seed best validation losses (unequal variances,
`scipy.stats.ttest_ind(equal_var=False)`) gives p < 0.05; otherwise the table says "no difference
beyond noise". With 24 entrants tested, about one passes by chance when nothing differs, so the table
also gives Benjamini-Hochberg q values over all tests (`scipy.stats.false_discovery_control`).

**The paired test.** Every entrant trained with seed S sees the same data order, so beside Welch's
test the table gives the seed-matched one: a paired two-sided t-test (`scipy.stats.ttest_rel`) on the
seeds both entrants finished (n pairs; fewer than 2 cannot be tested), with its own Benjamini-Hochberg
q over the paired tests. Entrants with a same-budget LLaMA are also tested against it, both ways
(`wiola.compare.same_budget`).
"""

from __future__ import annotations

import math
import statistics
import warnings
from pathlib import Path
from typing import Any

from wiola.compare.entrants import Entrant
from wiola.compare.report import _duration, _environment, _fmt, _read_json, _write_json, data_summary, entrant_notes
from wiola.compare.spec import BASELINES, Spec

ALPHA = 0.05


def seed_rows(out: Path, seeds: list[int], entrants: list[Entrant]) -> list[dict[str, Any]]:
    """One row per entrant with at least one finished seed: its per-seed results and their mean and spread."""
    rows = []
    for e in entrants:
        runs = [(s, _read_json(out / f"seed-{s}" / "runs" / e.slug / "result.json")) for s in seeds]
        runs = [(s, r) for s, r in runs if r is not None]
        if not runs:
            continue
        ok = [(s, r) for s, r in runs if r["status"] == "done" and r["best_val_loss"] is not None]
        best = [r["best_val_loss"] for _, r in ok]
        rows.append({
            "name": e.name, "kind": e.kind, "parameters": runs[0][1]["parameters"], "note": e.note,
            "same_budget_llama": e.same_budget,
            "seeds": [s for s, _ in ok], "failed_seeds": [s for s, r in runs if (s, r) not in ok],
            "best_val_losses": best,
            "best_val_loss_mean": statistics.fmean(best) if best else None,
            "best_val_loss_std": statistics.stdev(best) if len(best) > 1 else None,
            "final_val_loss_mean": _mean([r["final_val_loss"] for _, r in ok]),
            # speed: the median over the seeds, so one run slowed by other work on the machine does not move it
            "tokens_per_s_median": _median([r["tokens_per_s"] for _, r in ok]),
            "wall_time_s_median": _median([r["wall_time_s"] for _, r in ok]),
            "val_curve_mean": _mean_curve([r["val_curve"] for _, r in ok]),
        })
    return rows


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _mean_curve(curves: list[list[list[float]]]) -> list[list[float]]:
    """The mean validation loss at every step that all seeds evaluated."""
    if not curves:
        return []
    common = set.intersection(*({step for step, _ in c} for c in curves))
    return [[step, statistics.fmean(v for c in curves for s, v in c if s == step)] for step in sorted(common)]


def welch(row: dict[str, Any], ref: dict[str, Any]) -> tuple[float | None, float | None, str]:
    """(mean difference row - ref, Welch's two-sided p or None, verdict) over the per-seed best losses."""
    from scipy import stats

    if row["best_val_loss_mean"] is None or ref["best_val_loss_mean"] is None:
        return None, None, "no finished seed"
    delta = row["best_val_loss_mean"] - ref["best_val_loss_mean"]
    a, b = row["best_val_losses"], ref["best_val_losses"]
    if len(a) < 2 or len(b) < 2:
        return delta, None, "needs 2+ seeds"
    if len(set(a)) == 1 and len(set(b)) == 1:  # no spread on either side: nothing to test against
        return delta, None, "no spread to test"
    with warnings.catch_warnings():  # scipy warns of precision loss when one side has (almost) no spread
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    if not math.isfinite(p):
        return delta, None, "no spread to test"
    return delta, p, ("better" if delta < 0 else "worse") if p < ALPHA else "no difference beyond noise"


def paired(row: dict[str, Any], ref: dict[str, Any]) -> tuple[int, float | None, float | None, str]:
    """(n pairs, mean of the seed-matched differences row - ref, the paired two-sided p or None, why no p).

    The pairs are the seeds both rows finished; the test is `scipy.stats.ttest_rel` on their best losses.
    """
    from scipy import stats

    theirs = dict(zip(ref.get("seeds") or [], ref["best_val_losses"]))
    shared = [(v, theirs[s]) for s, v in zip(row.get("seeds") or [], row["best_val_losses"]) if s in theirs]
    diffs = [a - b for a, b in shared]
    delta = statistics.fmean(diffs) if diffs else None
    if len(shared) < 2:
        return len(shared), delta, None, f"needs 2+ shared seeds ({len(shared)} shared)"
    if len(set(diffs)) == 1:  # the same difference on every seed: no spread to test against
        return len(shared), delta, None, "no spread to test"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_rel([a for a, _ in shared], [b for _, b in shared]).pvalue)
    return (len(shared), delta, p, "") if math.isfinite(p) else (len(shared), delta, None, "no spread to test")


def bh(tested: list[dict[str, Any]], p: str, q: str) -> None:
    """Benjamini-Hochberg: set `row[q]` from `row[p]` over the rows given (one family of tests)."""
    from scipy import stats

    if tested:
        for r, value in zip(tested, stats.false_discovery_control([r[p] for r in tested])):
            r[q] = float(value)


def compare_with_control(rows: list[dict[str, Any]], control: str | None) -> None:
    """Add `delta`, `p`, `q`, `significant` and `verdict` (Welch against the control), `n_pairs`,
    `delta_paired`, `p_paired` and `q_paired` (paired against the control) to every row, and for an
    ablation `BASE:component=value` also `delta_base` and `p_base` against its base entrant; then the
    tests against each row's same-budget LLaMA (`same_budget.compare_with_same_budget`). In place."""
    from wiola.compare.same_budget import compare_with_same_budget

    ref = next((r for r in rows if r["name"] == control), None)
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        base = by_name.get(r["name"].rsplit(":", 1)[0]) if r.get("kind") == "ablation" and ":" in r["name"] else None
        r.update(base=base["name"] if base else None, delta_base=None, p_base=None)
        if base is not None:
            r["delta_base"], r["p_base"], _ = welch(r, base)
        r.update(delta=None, p=None, q=None, significant=None, verdict="",
                 n_pairs=None, delta_paired=None, p_paired=None, q_paired=None, paired_note="")
        if ref is None or r is ref:
            r["verdict"] = "control" if r is ref else ""
            continue
        r["delta"], r["p"], r["verdict"] = welch(r, ref)
        if r["p"] is not None:
            r["significant"] = r["p"] < ALPHA
        r["n_pairs"], r["delta_paired"], r["p_paired"], r["paired_note"] = paired(r, ref)
    bh([r for r in rows if r["p"] is not None], "p", "q")
    bh([r for r in rows if r["p_paired"] is not None], "p_paired", "q_paired")
    compare_with_same_budget(rows)


def write_seed_reports(*, spec: Spec, out: Path, data_dir: Path, manifest: dict[str, Any], options: dict[str, Any],
                       entrants: list[Entrant], seeds: list[int]) -> None:
    """OUT/results.json, results.md and val_loss.png over the seeds (per-seed reports are in OUT/seed-S/)."""
    rows = seed_rows(out, seeds, entrants)
    compare_with_control(rows, spec.control)
    runs = [r for s in seeds for r in (_read_json(out / f"seed-{s}" / "results.json") or {}).get("entrants", [])]
    summary = {
        "spec": str(spec.path), "seeds": seeds, "control": spec.control, "alpha": ALPHA,
        "test": ("Welch's two-sided t-test on the per-seed best validation losses, and the paired t-test on the seeds both "
                 "entrants finished; q: Benjamini-Hochberg over each family of tests"),
        "data": data_summary(data_dir, manifest),
        "train": {k: v for k, v in options.items() if k != "seed"},
        "shape": spec.shape,
        "tokens_per_step": options.get("batch_size", 32) * options["seq_len"],
        "environment": {**_environment(runs), "threads": sorted({r.get("threads") for r in runs if r.get("threads")})},
        "entrants": rows,
        "pending": [f"{e.name} (seed {s})" for s in seeds for e in entrants
                    if not (out / f"seed-{s}" / "runs" / e.slug / "result.json").is_file()],
    }
    _write_json(out / "results.json", summary)
    (out / "results.md").write_text(seeds_markdown(summary), encoding="utf-8")
    plot_seeds(rows, spec.control, out / "val_loss.png")


SEED_HEADER = ("entrant", "kind", "parameters", "best val loss (mean ± std)", "per seed", "Δ vs control", "p (Welch)",
               "q (BH)", "Δ paired (n)", "p (paired)", "q (paired BH)", "verdict", "Δ vs base (p)", "final val loss",
               "tokens/s", "wall time / run")


def seeds_markdown(summary: dict[str, Any]) -> str:
    """The seed summary as markdown: setting, rule, one row per entrant; the same-budget table."""
    from wiola.compare.same_budget import same_budget_markdown

    t, data = summary["train"], summary["data"]
    seeds = ", ".join(map(str, summary["seeds"]))
    lines = [
        f"# wiola compare: `{summary['spec']}`, seeds {seeds}", "",
        f"Data `{data['dir']}`: vocabulary {data['vocab_size']}, {data['train_tokens']:,} train / {data['val_tokens']:,} "
        f"validation tokens. Every entrant, once per seed: {t.get('max_steps', 1000)} steps x batch {t.get('batch_size', 32)} "
        f"x {t['seq_len']} tokens ({summary['tokens_per_step']:,} tokens/step), lr {t.get('lr', 6e-4)}, evaluation every "
        f"{t.get('eval_every', 250)} steps on up to {t.get('eval_batches', 10)} batches. The seed sets the initial weights, "
        "the data order and dropout.", "",
        (f"Control: `{summary['control']}`. Rule: a difference is called significant when Welch's two-sided t-test on "
         f"the per-seed best validation losses gives p < {summary['alpha']}; q is the Benjamini-Hochberg adjusted p over "
         "all tests (when nothing differs, about 1 test in 20 passes p < 0.05 by chance). Beside it, the paired t-test on "
         "the seeds both entrants finished (n pairs; the same seed gives the same data order), with its own q. An "
         "ablation `BASE:switch` is also set against its own base (Δ vs base, with Welch's p)." if summary["control"] else
         "No `control` entrant in the spec: no differences are tested."), "",
        "| " + " | ".join(SEED_HEADER) + " |",
        "|" + "---|" * 2 + "---:|" * 9 + "---|" + "---:|" * 4,
    ]
    for r in summary["entrants"]:
        mean, std = r["best_val_loss_mean"], r["best_val_loss_std"]
        spread = "–" if mean is None else f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"
        failed = f" ({len(r['failed_seeds'])} seed(s) non-finite)" if r["failed_seeds"] else ""
        lines.append("| " + " | ".join([
            f"{r['name']}{failed}", r["kind"], _fmt(r["parameters"]), spread,
            " / ".join(f"{v:.4f}" for v in r["best_val_losses"]) or "–",
            _fmt(r["delta"], "+.4f"), _fmt(r["p"], ".3f"), _fmt(r["q"], ".3f"), _paired_delta(r),
            _fmt(r.get("p_paired"), ".3f", r.get("paired_note") or "–"), _fmt(r.get("q_paired"), ".3f"), r["verdict"], _vs_base(r),
            _fmt(r["final_val_loss_mean"], ".4f"), _fmt(r["tokens_per_s_median"]), _duration(r["wall_time_s_median"]),
        ]) + " |")
    env = summary["environment"]
    threads = ", ".join(map(str, env.get("threads") or [])) or "?"
    lines += ["", f"Devices: {', '.join(env['devices']) or '–'}; torch {env['torch']}, transformers {env['transformers']}; "
              f"CPU threads per training: {threads}.",
              "Tokens/s: each run's median over its log windows, then the median over the seeds; wall time: the median "
              "`train()` time of one run (evaluation included). Per-seed tables and curves: `seed-S/results.md`."]
    lines += same_budget_markdown(summary["entrants"])
    lines += entrant_notes(summary["entrants"])
    if summary["pending"]:
        lines += ["", f"Not finished yet ({len(summary['pending'])}): {', '.join(summary['pending'])}."]
    return "\n".join(lines) + "\n"


def _paired_delta(r: dict[str, Any]) -> str:
    return "–" if r.get("delta_paired") is None else f"{r['delta_paired']:+.4f} ({r['n_pairs']})"


def _vs_base(r: dict[str, Any]) -> str:
    """An ablation against its own base (for switch-on ablations of the control, the same as the control column)."""
    if r.get("delta_base") is None:
        return "–"
    return f"{r['delta_base']:+.4f} ({_fmt(r['p_base'], '.3f')})"


def plot_seeds(rows: list[dict[str, Any]], control: str | None, path: Path) -> None:
    """Left: mean validation curves; right: best validation loss, mean ± std per entrant, sorted, control marked."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = [plt.get_cmap("tab20")(i) for i in range(20)] + [plt.get_cmap("tab20b")(i) for i in range(20)]
    fig, (curves, dots) = plt.subplots(1, 2, figsize=(15, max(6, 0.28 * len(rows) + 1.5)), gridspec_kw={"width_ratios": [3, 2]})
    for i, r in enumerate(r for r in rows if r["val_curve_mean"]):
        steps, losses = zip(*r["val_curve_mean"])
        style = "--" if r["kind"] in BASELINES else (":" if r["kind"] == "ablation" else "-")
        width = 2.4 if r["name"] == control else 1.2
        curves.plot(steps, losses, style, color="black" if r["name"] == control else colors[i % len(colors)],
                    linewidth=width, marker="o", markersize=2, label=r["name"])
    curves.set_xlabel("step")
    curves.set_ylabel("validation loss (nats/token), mean over seeds")
    curves.grid(alpha=0.3)
    if rows:
        curves.legend(fontsize=6, ncol=2)
    done = sorted((r for r in rows if r["best_val_loss_mean"] is not None), key=lambda r: r["best_val_loss_mean"])
    for y, r in enumerate(done):
        color = "black" if r["name"] == control else {"better": "tab:green", "worse": "tab:red"}.get(r["verdict"], "tab:gray")
        dots.errorbar(r["best_val_loss_mean"], y, xerr=r["best_val_loss_std"] or 0, fmt="o", color=color, capsize=3)
    ref = next((r for r in done if r["name"] == control), None)
    if ref is not None:
        dots.axvline(ref["best_val_loss_mean"], color="black", linewidth=0.8, linestyle="--")
    dots.set_yticks(range(len(done)), [r["name"] for r in done], fontsize=7)
    dots.invert_yaxis()
    dots.set_xlabel("best validation loss, mean ± std (green/red: p < 0.05 vs control)")
    dots.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
