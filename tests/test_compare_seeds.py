"""`wiola compare --seeds`: the nanoGPT CPU spec of issue 16 run end to end at a tiny scale over two
seeds, its summary checked against scipy on the per-seed results, the significance rule, the spec
itself against nanoGPT's published CPU command, and `--threads`.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from scipy import stats

from wiola.cli import main
from wiola.compare import COMPONENTS, compare, load_spec, resolve_entrants, compare_with_control
from wiola.errors import WiolaError

REPO = Path(__file__).resolve().parents[1]
NANOGPT_CPU = REPO / "configs" / "compare" / "nanogpt_cpu.yaml"
# nanoGPT README: python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
#   --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
#   --lr_decay_iters=2000 --dropout=0.0   (config/train_shakespeare_char.py: lr 1e-3, min_lr 1e-4, warmup 100,
#   beta2 0.99, weight decay 0.1, grad_clip 1.0, eval_interval 250)
NANOGPT = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "context": 64, "dropout": 0.0}
NANOGPT_TRAIN = {"max_steps": 2000, "batch_size": 12, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 100, "schedule": "cosine",
                 "beta2": 0.99, "weight_decay": 0.1, "grad_clip": 1.0, "eval_every": 250, "eval_batches": 20}
CHAR_FIELDS = {"vocab_size": 69, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}


def test_nanogpt_cpu_spec_is_nanogpts_setting_with_every_component_both_ways():
    spec = load_spec(NANOGPT_CPU)
    assert spec.shape == NANOGPT
    assert {k: spec.train[k] for k in NANOGPT_TRAIN} == NANOGPT_TRAIN
    assert spec.data["source"] == "corpora/tinyshakespeare.txt" and spec.data["split_at"] == "exact"
    assert spec.data["tokenizer_kind"] == "char" and spec.data["val_fraction"] == 0.1
    assert spec.seeds == [1337, 1338, 1339] and spec.control == "llama-arch"
    entrants = {e.name: e for e in resolve_entrants(spec, CHAR_FIELDS)}
    assert {"gpt2", "llama", "llama-arch", "wiola13m", "paper", "llama@paper"} <= set(entrants)
    control = entrants["llama-arch"].shape
    assert all(control[c] == off for c, off in COMPONENTS.items())  # every novelty off
    # every component value a Wiola model uses is switched on alone in the control, and off alone in its model
    for base in ("wiola13m", "paper"):
        for component, off in COMPONENTS.items():
            value = entrants[base].shape[component]
            if value != off:
                assert f"{base}:{component}={off}" in entrants, (base, component)
                assert f"llama-arch:{component}={value}" in entrants, (base, component)
    for switch in ("mlp=agu", "mlp=f3n", "norm=hln"):  # the article's components
        assert f"llama-arch:{switch}" in entrants
    f3n = entrants["llama-arch:mlp=f3n"].fields
    assert f3n["f3n_sampling"] == "layer" and entrants["llama-arch:mlp=agu"].fields["agu_l1"] > 0
    for e in entrants.values():  # the baselines and switched MLPs sit at their budgets (widths are multiples of 8)
        if e.budget is not None:
            assert abs(e.parameters / e.budget - 1) < 0.015, (e.name, e.parameters, e.budget)
    assert entrants["llama@paper"].budget == entrants["paper"].parameters


@pytest.fixture(scope="module")
def tiny_nanogpt(tmp_path_factory) -> tuple[Path, dict, str]:
    """The nanoGPT CPU spec, every entrant, two seeds, at a tiny scale (a small corpus, 2 steps)."""
    root = tmp_path_factory.mktemp("seeds")
    text = (REPO / "README.md").read_text(encoding="utf-8")
    (root / "corpus.txt").write_text(text * 2, encoding="utf-8")
    spec = yaml.safe_load(NANOGPT_CPU.read_text())
    spec["data"]["source"] = str(root / "corpus.txt")
    spec["shape"].update(hidden_size=32, num_hidden_layers=2, context=16)
    spec["train"].update(max_steps=2, batch_size=2, warmup_steps=1, eval_every=1, eval_batches=1, log_every=1, save_every=2)
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = root / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["compare", str(path), str(out), "--seeds", "11", "12", "--threads", "1"]) == 0
    return out, spec, printed.getvalue()


def test_every_entrant_runs_once_per_seed_and_the_summary_is_their_statistics(tiny_nanogpt):
    out, spec, printed = tiny_nanogpt
    summary = json.loads((out / "results.json").read_text())
    assert summary["seeds"] == [11, 12] and summary["control"] == "llama-arch" and summary["pending"] == []
    rows = {r["name"]: r for r in summary["entrants"]}
    per_seed = {s: {r["name"]: r for r in json.loads((out / f"seed-{s}" / "results.json").read_text())["entrants"]}
                for s in (11, 12)}
    assert len(rows) == 25 and all(set(rows) == set(runs) for runs in per_seed.values())
    assert "[50/50]" in printed
    for name, r in rows.items():
        losses = [per_seed[s][name]["best_val_loss"] for s in (11, 12)]
        assert r["seeds"] == [11, 12] and r["best_val_losses"] == losses
        assert r["best_val_loss_mean"] == pytest.approx(statistics.fmean(losses))
        assert r["best_val_loss_std"] == pytest.approx(statistics.stdev(losses))
        for s in (11, 12):  # each run trained with its seed and the thread count asked for
            run = Path(per_seed[s][name]["run_dir"])
            assert json.loads((run / "entrant.json").read_text())["setting"]["train"]["seed"] == s
            start = next(json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if '"start"' in x)
            assert start["threads"] == 1
    assert rows["llama-arch"]["best_val_losses"][0] != rows["llama-arch"]["best_val_losses"][1]  # the seed changes the run
    control = rows["llama-arch"]["best_val_losses"]
    for name, r in rows.items():
        if name == "llama-arch":
            assert r["verdict"] == "control" and r["p"] is None
            continue
        p = stats.ttest_ind(r["best_val_losses"], control, equal_var=False).pvalue
        assert r["p"] == pytest.approx(p) and r["delta"] == pytest.approx(r["best_val_loss_mean"] - statistics.fmean(control))
        assert r["verdict"] == ("no difference beyond noise" if p >= 0.05 else "better" if r["delta"] < 0 else "worse")
        if ":" in name:  # an ablation is also set against its own base
            base = rows[name.split(":")[0]]["best_val_losses"]
            assert r["p_base"] == pytest.approx(stats.ttest_ind(r["best_val_losses"], base, equal_var=False).pvalue)
        else:
            assert r["p_base"] is None
    md = (out / "results.md").read_text()
    assert "Welch's two-sided t-test" in md and md.count("\n| ") == 1 + 25 and "| Δ vs base (p) |" in md
    assert (out / "val_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "seed-12" / "results.md").is_file()


def test_second_run_skips_every_finished_seed(tiny_nanogpt, capsys):
    out, spec, _ = tiny_nanogpt
    path = out.parent / "spec.yaml"
    before = (out / "seed-11" / "runs" / "paper" / "log.jsonl").read_text()
    assert main(["compare", str(path), str(out), "--seeds", "11", "12", "--only", "paper", "gpt2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == 4 and "training" not in printed
    assert (out / "seed-11" / "runs" / "paper" / "log.jsonl").read_text() == before


def test_report_only_rewrites_the_reports_and_trains_nothing(tiny_nanogpt, capsys):
    out, spec, _ = tiny_nanogpt
    path = out.parent / "spec.yaml"
    before = json.loads((out / "results.json").read_text())
    (out / "results.md").unlink()
    (out / "seed-11" / "results.md").unlink()
    assert main(["compare", str(path), str(out), "--seeds", "11", "12", "--report-only"]) == 0
    assert "training" not in capsys.readouterr().out
    assert (out / "results.md").is_file() and (out / "seed-11" / "results.md").is_file()
    assert json.loads((out / "results.json").read_text())["entrants"] == before["entrants"]


def _row(name, losses):
    return {"name": name, "best_val_losses": losses, "best_val_loss_mean": statistics.fmean(losses) if losses else None}


def test_the_significance_rule():
    rows = [_row("ctl", [1.50, 1.51, 1.49]), _row("worse", [1.60, 1.61, 1.59]), _row("better", [1.40, 1.41, 1.39]),
            _row("noise", [1.52, 1.47, 1.53]), _row("one", [1.2]), _row("flat", [1.5, 1.5, 1.5])]
    rows[0]["best_val_losses"] = [1.50, 1.51, 1.49]
    compare_with_control(rows, "ctl")
    verdicts = {r["name"]: r["verdict"] for r in rows}
    assert verdicts == {"ctl": "control", "worse": "worse", "better": "better", "noise": "no difference beyond noise",
                        "one": "needs 2+ seeds", "flat": "no difference beyond noise"}
    tested = [r for r in rows if r["p"] is not None]
    q = stats.false_discovery_control([r["p"] for r in tested])
    assert [r["q"] for r in tested] == pytest.approx(list(q))
    flat = [_row("a", [1.5, 1.5]), _row("b", [1.6, 1.6])]
    compare_with_control(flat, "a")
    assert flat[1]["verdict"] == "no spread to test" and flat[1]["p"] is None


@pytest.mark.parametrize("extra, args, message", [
    ({"seeds": [1, 1]}, [], "seeds lists a seed twice: [1, 1]"),
    ({"seeds": "1337"}, [], "seeds must be a non-empty list of non-negative integers, got '1337'"),
    ({"control": "nobody"}, [], "control 'nobody' is not an entrant"),
    ({}, ["--seeds", "3", "3"], "--seeds lists a seed twice: [3, 3]"),
    ({}, ["--threads", "0"], "--threads must be a positive integer, got 0"),
])
def test_bad_seeds_control_and_threads_are_one_line_errors(tmp_path, capsys, extra, args, message):
    spec = yaml.safe_load((REPO / "configs" / "compare" / "tiny.yaml").read_text())
    (tmp_path / "tiny.txt").write_text("to be or not to be, that is the question\n" * 200)
    spec["data"]["source"] = str(tmp_path / "tiny.txt")
    spec.update(extra)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    assert main(["compare", str(path), str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "runs").exists() and not list((tmp_path / "out").glob("seed-*/runs"))


def test_thread_default_shares_the_cores_among_local_processes(monkeypatch):
    from wiola import cpu

    before = torch.get_num_threads()
    try:
        for name in cpu.THREAD_ENV:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(cpu, "physical_cores", lambda: 4)
        torch.set_num_threads(8)
        assert cpu.cpu_threads(processes=2) == 2
        torch.set_num_threads(8)
        assert cpu.cpu_threads() == 4
        assert cpu.cpu_threads(3) == 3  # asked for: exactly that
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(5)
        assert cpu.cpu_threads(processes=2) == 5  # the environment's choice stands
    finally:
        torch.set_num_threads(before)


def test_an_empty_seed_list_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(WiolaError, match="--seeds must be a non-empty list"):
        compare(NANOGPT_CPU, tmp_path / "out", seeds=[])
    assert not (tmp_path / "out" / "data").exists()
