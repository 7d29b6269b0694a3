"""Welch's and the paired t-test between two entrants of a seed comparison, from its published numbers.

    python scripts/paired_test.py RESULTS ENTRANT REFERENCE [--section TEXT]

RESULTS is a seed comparison's results.json (pairs by seed number) or a markdown file holding a seed
table (a results.md, or docs/results.md; pairs by position in the "per seed" column; `--section` picks
the table under the first heading that contains TEXT). Prints the seed-matched differences, their
mean, the paired p (`scipy.stats.ttest_rel`) and Welch's p (`scipy.stats.ttest_ind(equal_var=False)`).
Example (docs/results.md, issue 28):

    python scripts/paired_test.py docs/results.md paper:mlp=swiglu llama@paper --section "three seeds, 25 entrants"
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from wiola.compare.same_budget import seed_table_rows
from wiola.compare.seeds import paired, welch
from wiola.errors import WiolaError


def rows_from(path: Path, section: str | None) -> dict[str, dict]:
    if path.suffix == ".json":
        return {r["name"]: r for r in json.loads(path.read_text(encoding="utf-8"))["entrants"]}
    return seed_table_rows(path.read_text(encoding="utf-8"), section)


def report(rows: dict[str, dict], name: str, ref: str) -> str:
    for who in (name, ref):
        if who not in rows:
            raise WiolaError(f"no entrant {who!r} in the table; entrants: {', '.join(rows)}")
    a, b = rows[name], rows[ref]
    theirs = dict(zip(b["seeds"], b["best_val_losses"]))
    diffs = [v - theirs[s] for s, v in zip(a["seeds"], a["best_val_losses"]) if s in theirs]
    n, delta, p_paired, why = paired(a, b)
    delta_means, p_welch, welch_note = welch(a, b)
    sd = f" ± {statistics.stdev(diffs):.4f}" if len(diffs) > 1 else ""
    return "\n".join([
        f"{name} - {ref}, best validation loss:",
        f"  seed-matched differences: {' / '.join(f'{d:+.4f}' for d in diffs) or 'none'}",
        f"  n pairs {n}, mean Δ {'–' if delta is None else f'{delta:+.4f}'}{sd}",
        f"  paired t-test p = {p_paired:.4f}" if p_paired is not None else f"  paired t-test: {why}",
        f"  Welch p = {p_welch:.4f} (Δ of the means {delta_means:+.4f})" if p_welch is not None else f"  Welch: {welch_note}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="results.json of a seed comparison, or a markdown file with a seed table")
    parser.add_argument("entrant")
    parser.add_argument("reference")
    parser.add_argument("--section", help="the seed table under the first heading containing this text")
    args = parser.parse_args(argv)
    try:
        print(report(rows_from(args.results, args.section), args.entrant, args.reference))
    except (WiolaError, OSError, ValueError, KeyError) as exc:
        print(f"paired_test: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
