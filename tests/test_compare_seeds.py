"""`wiola compare --seeds`: the nanoGPT CPU spec of issue 16 run end to end at a tiny scale over two
seeds, its summary checked against scipy on the per-seed results, the significance rule, the spec
itself against nanoGPT's published CPU command, and `--threads`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
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
    assert "Welch's two-sided t-test" in md and "| Δ vs base (p) |" in md and "| p (paired) |" in md
    # the seed table (header and 25 rows), then `paper` against the listed `llama@paper`, its same-budget LLaMA
    assert md.count("\n| ") == 1 + 25 + 2 and "\n| paper | " in md.split("## Against a same-budget LLaMA")[1]
    assert rows["paper"]["vs_llama"]["llama"] == "llama@paper"
    losses = {n: rows[n]["best_val_losses"] for n in ("paper", "llama@paper")}
    assert rows["paper"]["vs_llama"]["p_paired"] == pytest.approx(stats.ttest_rel(losses["paper"], losses["llama@paper"]).pvalue)
    for name, r in rows.items():
        if name != "llama-arch":
            expected = stats.ttest_rel(r["best_val_losses"], control).pvalue
            # an entrant that differs from the control by the same amount on both seeds (llama = llama-arch) has no
            # spread to test against: no p (scipy gives nan, or, since 1.17, 0.0 with a precision-loss warning)
            same = len({a - b for a, b in zip(r["best_val_losses"], control)}) == 1
            assert r["n_pairs"] == 2 and (r["p_paired"] is None if same or not math.isfinite(expected) else r["p_paired"] == pytest.approx(expected))
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


# ---------------------------------------------------------------------------- issue 28: paired test, same-budget LLaMAs

CANDIDATE_CPU = REPO / "configs" / "compare" / "candidate_cpu.yaml"


def _seeded(name, by_seed, kind="wiola", parameters=1000, same_budget=None):
    seeds = sorted(by_seed)
    losses = [by_seed[s] for s in seeds]
    return {"name": name, "kind": kind, "parameters": parameters, "same_budget_llama": same_budget, "seeds": seeds,
            "best_val_losses": losses, "best_val_loss_mean": statistics.fmean(losses) if losses else None}


def test_the_paired_test_is_scipys_ttest_rel_on_the_shared_seeds():
    from wiola.compare import paired

    ctl = _seeded("ctl", {1: 1.50, 2: 1.53, 3: 1.49, 4: 1.52})
    row = _seeded("x", {1: 1.47, 2: 1.52, 3: 1.45, 5: 1.40})  # seed 4 missing here, seed 5 not in the control
    n, delta, p, why = paired(row, ctl)
    want = stats.ttest_rel([1.47, 1.52, 1.45], [1.50, 1.53, 1.49])
    assert (n, why) == (3, "") and p == pytest.approx(want.pvalue)
    assert delta == pytest.approx(statistics.fmean([1.47 - 1.50, 1.52 - 1.53, 1.45 - 1.49]))
    # the order the seeds are listed in does not matter: pairs are matched by seed number
    shuffled = {**row, "seeds": [5, 3, 2, 1], "best_val_losses": [1.40, 1.45, 1.52, 1.47]}
    assert paired(shuffled, ctl)[2] == pytest.approx(want.pvalue)
    one = _seeded("one", {1: 1.40, 9: 1.41})
    assert paired(one, ctl) == (1, pytest.approx(-0.10), None, "needs 2+ shared seeds (1 shared)")
    assert paired(_seeded("none", {8: 1.4, 9: 1.4}), ctl) == (0, None, None, "needs 2+ shared seeds (0 shared)")
    shifted = _seeded("shifted", {s: v + 0.01 for s, v in zip(ctl["seeds"], ctl["best_val_losses"])})
    assert paired(shifted, ctl)[2:] == (None, "no spread to test")


def test_the_report_gives_the_paired_test_beside_welch_with_its_own_bh_family():
    rows = [_seeded("ctl", {1: 1.50, 2: 1.53, 3: 1.49}), _seeded("a", {1: 1.46, 2: 1.50, 3: 1.47}),
            _seeded("b", {1: 1.51, 2: 1.55, 3: 1.48}), _seeded("c", {1: 1.40, 2: 1.43, 3: 1.41}),
            _seeded("d", {2: 1.45})]
    compare_with_control(rows, "ctl")
    by = {r["name"]: r for r in rows}
    ctl = [1.50, 1.53, 1.49]
    for name in "abc":
        r = by[name]
        assert r["n_pairs"] == 3 and r["p_paired"] == pytest.approx(stats.ttest_rel(r["best_val_losses"], ctl).pvalue)
        assert r["p"] == pytest.approx(stats.ttest_ind(r["best_val_losses"], ctl, equal_var=False).pvalue)
    assert [by[n]["q_paired"] for n in "abc"] == pytest.approx(list(stats.false_discovery_control([by[n]["p_paired"] for n in "abc"])))
    assert [by[n]["q"] for n in "abc"] == pytest.approx(list(stats.false_discovery_control([by[n]["p"] for n in "abc"])))
    assert by["d"]["p_paired"] is None and by["d"]["paired_note"] == "needs 2+ shared seeds (1 shared)"
    assert by["ctl"]["p_paired"] is None and by["ctl"]["verdict"] == "control"


def _resolve(path, fields=CHAR_FIELDS, **changes):
    spec = load_spec(path)
    for key, value in changes.items():
        setattr(spec, key, value)
    return resolve_entrants(spec, fields)


def test_same_budget_llamas_are_real_llamas_within_two_percent_of_their_entrant():
    from wiola.train.config import make_model_config

    entrants = _resolve(CANDIDATE_CPU)
    by = {e.name: e for e in entrants}
    control = by["llama-arch"]
    generated = [e for e in entrants if e.name.startswith("llama@")]
    assert {e.name for e in generated} == {"llama@paper:mlp=swiglu", "llama@paper:mlp=swiglu:cross_layer_context=none",
                                           "llama@llama-arch:cross_layer_context=gcla"}
    for e in entrants:
        if e.kind not in ("wiola", "ablation") or e is control:
            continue
        off = abs(e.parameters / control.parameters - 1)
        if off <= 0.02:  # within the 2% rule of the control: no LLaMA of its own
            assert e.same_budget is None, e.name
            continue
        llama = by[e.same_budget]
        assert llama.kind == "llama" and abs(llama.parameters / e.parameters - 1) <= 0.02, (e.name, llama.parameters)
        assert llama.train == e.train and llama.budget == e.parameters or llama.name != f"llama@{e.name}"
        config = make_model_config(llama.fields, {})
        assert type(config).__name__ == "LlamaConfig" and config.hidden_act == "silu"  # SwiGLU, RoPE, RMSNorm: LLaMA
        assert not any(k in llama.fields for k in COMPONENTS)  # no Wiola switch at all
        assert config.hidden_size == e.shape["hidden_size"] and config.num_hidden_layers == e.shape["num_hidden_layers"]
        assert config.num_attention_heads == e.shape["num_attention_heads"]
        assert config.max_position_embeddings == e.shape["context"] and config.tie_word_embeddings
        from wiola.compare import built_parameters
        assert built_parameters(llama.fields) == llama.parameters
    # the switch-ons that add no parameters (SRPE, WiolaRMSNorm) get none; the ones of the candidate with the same
    # LLaMA model share one run
    assert by["llama-arch:position_encoding=srpe"].same_budget is None
    assert by["llama-arch:norm=wiola_rmsnorm"].same_budget is None
    for name in ("paper:mlp=swiglu:position_encoding=rope", "paper:mlp=swiglu:token_merging=none", "paper:mlp=swiglu:norm=rmsnorm"):
        assert by[name].same_budget == "llama@paper:mlp=swiglu"
    # deterministic: the same spec gives the same entrants, configs and pairs
    again = _resolve(CANDIDATE_CPU)
    assert [(e.name, e.fields, e.parameters, e.same_budget) for e in again] == [(e.name, e.fields, e.parameters, e.same_budget)
                                                                                 for e in entrants]
    # without the option nothing is generated
    plain = _resolve(CANDIDATE_CPU, same_budget_llama=False)
    assert [e.name for e in plain] == [e.name for e in entrants if e not in generated]


def test_a_listed_llama_at_name_is_that_entrants_and_the_nanogpt_spec_pairs_paper_with_llama_at_paper():
    by = {e.name: e for e in _resolve(NANOGPT_CPU)}
    assert by["paper"].same_budget == "llama@paper"
    assert sum(e.same_budget is not None for e in by.values()) == 1  # nothing generated without same_budget_llama
    with_flag = {e.name: e for e in _resolve(NANOGPT_CPU, same_budget_llama=True)}
    assert with_flag["paper"].same_budget == "llama@paper"
    # paper without SRPE (or ATM) is the same size: its LLaMA is the same model, so the listed llama@paper serves
    assert with_flag["paper:position_encoding=rope"].same_budget == "llama@paper"
    assert "llama@paper:position_encoding=rope" not in with_flag
    assert with_flag["paper:mlp=swiglu"].same_budget == "llama@paper:mlp=swiglu"


def _fake_results(out: Path, entrants, losses: dict[str, dict[int, float]]) -> None:
    for name, by_seed in losses.items():
        e = next(e for e in entrants if e.name == name)
        for seed, loss in by_seed.items():
            run = out / f"seed-{seed}" / "runs" / e.slug
            run.mkdir(parents=True, exist_ok=True)
            (run / "result.json").write_text(json.dumps({
                "name": e.name, "kind": e.kind, "status": "done", "parameters": e.parameters, "best_val_loss": loss,
                "final_val_loss": loss + 0.01, "tokens_per_s": 5000.0, "wall_time_s": 300.0,
                "val_curve": [[250, loss + 0.5], [2000, loss]]}))


def test_the_seed_report_tests_each_entrant_against_its_same_budget_llama(tmp_path):
    """Made-up results where the report reads them (OUT/seed-S/runs/NAME/result.json); no training."""
    from wiola.compare import write_seed_reports

    spec = load_spec(CANDIDATE_CPU)
    entrants = resolve_entrants(spec, CHAR_FIELDS)
    seeds = spec.seeds
    import random

    rng = random.Random(28)
    losses = {e.name: {s: round(1.55 + rng.gauss(0, 0.015), 4) for s in seeds} for e in entrants}
    losses["paper:mlp=swiglu"] = {s: losses["llama@paper:mlp=swiglu"][s] - 0.03 + rng.gauss(0, 0.004) for s in seeds}
    del losses["llama@paper:mlp=swiglu"][1341]  # a seed its LLaMA has not finished: 4 pairs
    _fake_results(tmp_path, entrants, losses)
    manifest = {"splits": {"train": {"num_tokens": 1000}, "val": {"num_tokens": 100}}, "fingerprint": "f", "vocab_size": 69}
    options = {**spec.train, "seq_len": 64}
    write_seed_reports(spec=spec, out=tmp_path, data_dir=tmp_path / "data", manifest=manifest, options=options,
                       entrants=entrants, seeds=seeds)
    summary = json.loads((tmp_path / "results.json").read_text())
    rows = {r["name"]: r for r in summary["entrants"]}
    assert summary["pending"] == ["llama@paper:mlp=swiglu (seed 1341)"]
    tested = {name: r["vs_llama"] for name, r in rows.items() if r["vs_llama"]}
    assert set(tested) == {e.name for e in entrants if e.same_budget}
    for name, t in tested.items():
        llama = losses[t["llama"]]
        mine = losses[name]
        shared = [s for s in seeds if s in llama]
        assert t["n_pairs"] == len(shared)
        assert t["p_paired"] == pytest.approx(stats.ttest_rel([mine[s] for s in shared], [llama[s] for s in shared]).pvalue)
        assert t["p"] == pytest.approx(stats.ttest_ind(list(mine.values()), list(llama.values()), equal_var=False).pvalue)
        assert t["delta_paired"] == pytest.approx(statistics.fmean(mine[s] - llama[s] for s in shared))
    order = list(tested)
    assert [tested[n]["q_paired"] for n in order] == pytest.approx(list(stats.false_discovery_control([tested[n]["p_paired"] for n in order])))
    assert [tested[n]["q"] for n in order] == pytest.approx(list(stats.false_discovery_control([tested[n]["p"] for n in order])))
    cand = tested["paper:mlp=swiglu"]
    assert cand["n_pairs"] == 4 and cand["p_paired"] < 0.05 and cand["verdict"].startswith("better")
    # the control column carries the paired test too, on all five seeds
    ctl = losses["llama-arch"]
    r = rows["llama-arch:cross_layer_context=gcla"]
    assert r["n_pairs"] == 5 and r["p_paired"] == pytest.approx(
        stats.ttest_rel([losses[r["name"]][s] for s in seeds], [ctl[s] for s in seeds]).pvalue)
    md = (tmp_path / "results.md").read_text()
    assert "## Against a same-budget LLaMA" in md and "| p (paired) |" in md
    table = md.split("## Against a same-budget LLaMA")[1]
    assert all(f"| {name} |" in table for name in tested)
    assert f"`paper:mlp=swiglu` is {abs(cand['delta']):.4f} below its same-budget LLaMA `llama@paper:mlp=swiglu`" in table
    assert f"paired p {cand['p_paired']:.3f} over 4 seeds" in table


def test_an_entrant_trains_with_its_own_learning_rate_and_its_llama_with_the_same(tmp_path, capsys):
    spec = yaml.safe_load((REPO / "configs" / "compare" / "tiny.yaml").read_text())
    (tmp_path / "tiny.txt").write_text("to be or not to be, that is the question\n" * 200)
    spec["data"]["source"] = str(tmp_path / "tiny.txt")
    spec["train"].update(max_steps=2, eval_every=2, save_every=2, warmup_steps=1)
    spec.pop("budget")
    spec["entrants"] = [{"name": "p", "kind": "wiola", "config": {"preset": "wiola-120m", "mlp": "swiglu"},
                         "train": {"lr": 0.02, "min_lr": 0.002}},
                        {"name": "llama@p", "kind": "llama", "budget": "p", "train": {"lr": 0.02, "min_lr": 0.002}},
                        {"name": "plain", "kind": "wiola", "config": {"preset": "wiola-120m", "mlp": "swiglu"}}]
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "out"
    assert main(["compare", str(path), str(out), "--threads", "1"]) == 0
    from wiola.train.config import TrainConfig
    from wiola.train.optim import lr_multiplier

    for slug, lr in (("p", 0.02), ("llama_p", 0.02), ("plain", 3e-3)):
        meta = json.loads((out / "runs" / slug / "entrant.json").read_text())
        assert meta["setting"]["train"]["lr"] == lr
        schedule = lr_multiplier(TrainConfig(max_steps=2, lr=lr, min_lr=lr / 10, warmup_steps=1))
        logged = [json.loads(x) for x in (out / "runs" / slug / "log.jsonl").read_text().splitlines()]
        steps = [r for r in logged if "lr" in r and "loss" in r]
        assert len(steps) == 2 and all(r["lr"] == pytest.approx(lr * schedule(r["step"])) for r in steps)
    # a second run skips all three: the per-entrant options are part of each one's recorded setting
    assert main(["compare", str(path), str(out), "--threads", "1"]) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 3


@pytest.mark.parametrize("extra, entrant, message", [
    ({"same_budget_llama": True}, {}, "same_budget_llama needs a 'control' entrant"),
    ({"same_budget_llama": "yes"}, {}, "same_budget_llama must be true or false, got 'yes'"),
    ({}, {"train": {"max_steps": 5}}, "entrant 'seed': train: unknown key 'max_steps'"),
    ({}, {"train": {"lr": "fast"}}, "entrant 'seed': train lr must be a non-negative number, got 'fast'"),
])
def test_bad_same_budget_and_entrant_train_options_are_one_line_errors(tmp_path, capsys, extra, entrant, message):
    spec = yaml.safe_load((REPO / "configs" / "compare" / "tiny.yaml").read_text())
    (tmp_path / "tiny.txt").write_text("to be or not to be, that is the question\n" * 200)
    spec["data"]["source"] = str(tmp_path / "tiny.txt")
    spec.update(extra)
    spec["entrants"][0].update(entrant)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    assert main(["compare", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "runs").exists()


def test_the_candidate_specs_are_the_issue_28_settings():
    nanogpt, bpe = load_spec(NANOGPT_CPU), load_spec(REPO / "configs" / "compare" / "shakespeare_bpe_cpu.yaml")
    cand = load_spec(CANDIDATE_CPU)
    assert cand.data == nanogpt.data and cand.train == nanogpt.train and cand.shape == nanogpt.shape
    assert cand.seeds == [1337, 1338, 1339, 1340, 1341] and cand.control == "llama-arch" and cand.same_budget_llama
    by = {e.name: e for e in resolve_entrants(cand, CHAR_FIELDS)}
    earlier = {e.name: e for e in resolve_entrants(nanogpt, CHAR_FIELDS)}
    # the control and the candidate are the very models of the nanoGPT CPU table (the same runs at seeds 1337-1339)
    for name in ("llama-arch", "paper:mlp=swiglu", "llama-arch:cross_layer_context=gcla", "llama-arch:position_encoding=srpe",
                 "llama-arch:norm=wiola_rmsnorm"):
        assert by[name].fields == earlier[name].fields, name
    assert {n for n in by if n.startswith("paper:mlp=swiglu:")} == {
        "paper:mlp=swiglu:position_encoding=rope", "paper:mlp=swiglu:cross_layer_context=none",
        "paper:mlp=swiglu:token_merging=none", "paper:mlp=swiglu:norm=rmsnorm"}
    assert len(by) == 12
    lr = load_spec(REPO / "configs" / "compare" / "candidate_lr_cpu.yaml")
    assert lr.data == nanogpt.data and lr.shape == nanogpt.shape and lr.seeds == [1337, 1338, 1339]
    assert {k: v for k, v in lr.train.items()} == nanogpt.train
    lr_by = {e.name: e for e in resolve_entrants(lr, CHAR_FIELDS)}
    for rate in ("5e-4", "1e-3", "2e-3"):
        e = lr_by[f"paper:mlp=swiglu,lr={rate}"]
        assert e.fields == earlier["paper:mlp=swiglu"].fields and e.train == {"lr": float(rate), "min_lr": float(rate) / 10}
        assert e.same_budget == f"llama@paper:mlp=swiglu,lr={rate}" and lr_by[e.same_budget].train == e.train
    bpe_spec = load_spec(REPO / "configs" / "compare" / "candidate_bpe_cpu.yaml")
    assert bpe_spec.data == bpe.data and bpe_spec.train == bpe.train and bpe_spec.shape == bpe.shape
    assert bpe_spec.seeds == [1337, 1338, 1339] and bpe_spec.same_budget_llama
    bpe_fields = {**CHAR_FIELDS, "vocab_size": 2048}
    bpe_by = {e.name: e for e in resolve_entrants(bpe_spec, bpe_fields)}
    bpe_earlier = {e.name: e for e in resolve_entrants(bpe, bpe_fields)}
    assert bpe_by["llama-arch"].fields == bpe_earlier["llama-arch"].fields
    assert set(bpe_by) == {"llama-arch", "paper:mlp=swiglu", "llama@paper:mlp=swiglu"}


def test_the_paired_test_stated_in_docs_results_is_recomputed_by_the_script(capsys):
    import importlib.util

    text = (REPO / "docs" / "results.md").read_text(encoding="utf-8")
    section = text.split("### Result: three seeds, 25 entrants")[1].split("\n## ")[0]
    values = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 4 and cells[0] in ("paper:mlp=swiglu", "llama@paper"):
            values[cells[0]] = [float(v) for v in cells[4].split(" / ")]
    want = stats.ttest_rel(values["paper:mlp=swiglu"], values["llama@paper"])
    spec = importlib.util.spec_from_file_location("paired_test", REPO / "scripts" / "paired_test.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(REPO / "docs" / "results.md"), "paper:mlp=swiglu", "llama@paper",
                        "--section", "three seeds, 25 entrants"]) == 0
    printed = capsys.readouterr().out
    assert f"paired t-test p = {want.pvalue:.4f}" in printed and "n pairs 3" in printed
    issue28 = text.split("## Issue 28")[1]
    assert f"paired p = {want.pvalue:.3f}" in issue28
    assert "python scripts/paired_test.py docs/results.md paper:mlp=swiglu llama@paper" in issue28


def test_a_seed_table_is_found_under_its_heading_past_code_blocks():
    """A shell comment in a fenced block ('# not run by ...') is no heading: the table after it still belongs to
    the section above (docs/results.md has such a block between its heading and its seed table)."""
    from wiola.compare.same_budget import seed_table_rows

    md = ("### Result: three seeds\n\ntext\n\n```bash\n# a comment, not a heading\nwiola compare x y\n```\n\n"
          "| entrant | per seed |\n|---|---|\n| a | 1.0 / 2.0 / 3.0 |\n| b | 1.5 / 2.5 / 3.0 |\n\n## Other\n")
    rows = seed_table_rows(md, "three seeds")
    assert set(rows) == {"a", "b"}
    with pytest.raises(Exception, match="found 0"):
        seed_table_rows(md, "a comment")


@pytest.mark.parametrize("heading", ["five seeds against a same-budget LLaMA", "Learning rate: 5e-4", "A second setting: BPE"])
def test_issue28_figures_are_recomputed_from_their_seed_tables(heading):
    """Each issue-28 section of docs/results.md states, for every entrant against its same-budget LLaMA, the
    difference of the means, Welch's p and the paired p: they must be what scipy gives on the per-seed values of the
    seed table printed above them, and the verdict must follow the rule (both p < 0.05)."""
    from wiola.compare.same_budget import seed_table_rows

    text = (REPO / "docs" / "results.md").read_text(encoding="utf-8")
    issue = text.split("## Issue 28")[1]
    section = next(part for part in issue.split("\n### ") if heading in part.splitlines()[0])
    rows = seed_table_rows(text.split("## Issue 28")[1], heading)
    values = {name: row["best_val_losses"] for name, row in rows.items()}
    pairs = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| `")]
    assert pairs
    for cells in pairs:
        entrant, llama = cells[0].strip("`"), cells[2].strip("`")
        a, b = values[entrant], values[llama]
        n = min(len(a), len(b))
        welch = stats.ttest_ind(a, b, equal_var=False).pvalue
        paired = stats.ttest_rel(a[:n], b[:n]).pvalue
        delta = sum(a) / len(a) - sum(b) / len(b)
        assert abs(float(cells[3].replace("−", "-")) - delta) <= 0.00005 + 1e-9, (cells, delta)
        assert cells[4] == f"{welch:.3f}" and cells[5] == f"{paired:.3f} ({n})", (cells, welch, paired)
        called = welch < 0.05 and paired < 0.05
        assert cells[6].startswith("better" if called and delta < 0 else "worse" if called else "no difference called"), cells


def test_the_gpu_candidate_spec_is_nanogpts_gpu_setting_with_the_preset():
    """configs/compare/candidate_gpu.yaml (scripts/gpu_suite.sh compare-candidate): shakespeare_char.yaml's data,
    training and shape with three seeds; its control is that spec's `llama-arch`, and the `wiola-120m-swiglu`
    preset at this shape is that spec's `paper:mlp=swiglu` (the very model), tested against a LLaMA of its size."""
    char = load_spec(REPO / "configs" / "compare" / "shakespeare_char.yaml")
    gpu = load_spec(REPO / "configs" / "compare" / "candidate_gpu.yaml")
    assert gpu.data == char.data and gpu.shape == char.shape and gpu.seeds == [1337, 1338, 1339]
    assert {k: v for k, v in gpu.train.items() if k != "seed"} == {k: v for k, v in char.train.items() if k != "seed"}
    by = {e.name: e for e in resolve_entrants(gpu, CHAR_FIELDS)}
    earlier = {e.name: e for e in resolve_entrants(char, CHAR_FIELDS)}
    assert set(by) == {"llama-arch", "wiola-120m-swiglu", "wiola-120m-swiglu:cross_layer_context=none",
                       "llama@wiola-120m-swiglu", "llama@wiola-120m-swiglu:cross_layer_context=none"}
    assert by["llama-arch"].parameters == earlier["llama-arch"].parameters
    assert by["wiola-120m-swiglu"].shape == earlier["paper:mlp=swiglu"].shape
    assert by["wiola-120m-swiglu"].parameters == earlier["paper:mlp=swiglu"].parameters == earlier["paper"].parameters
    for name in ("wiola-120m-swiglu", "wiola-120m-swiglu:cross_layer_context=none"):
        llama = by[by[name].same_budget]
        assert llama.kind == "llama" and abs(llama.parameters / by[name].parameters - 1) < 0.02, name
