"""`wiola compare` on the tiny setting of configs/compare/tiny.yaml (a char corpus written here).

One comparison (2 Wiola entrants, 1 ablation, GPT-2 and Mistral baselines, 6 steps) is run
through the command line and its outputs checked; a grown spec then trains only its new
entrant; an entrant interrupted after 3 steps resumes and ends exactly where an uninterrupted
run ends; bad specs fail with clear messages before anything trains.
"""

from __future__ import annotations

import json
import math
import random
import signal
from pathlib import Path

import pytest
import yaml

from wiola.cli import main
from wiola.compare import compare, load_spec, resolve_entrants
from wiola.errors import WiolaError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "compare" / "tiny.yaml"
NAMES = ["seed", "seed:mlp=swiglu", "paper", "gpt2", "mistral"]
COLUMNS = ["entrant", "kind", "parameters", "tokens seen", "best val loss", "best val ppl", "final val loss",
           "final val ppl", "tokens/s", "peak memory", "wall time"]
FIELDS = ["name", "kind", "parameters", "tokens_seen", "best_val_loss", "best_val_ppl", "final_val_loss", "final_val_ppl",
          "tokens_per_s", "peak_memory_bytes", "peak_memory_kind", "wall_time_s", "config", "val_curve"]


def write_corpus(path: Path) -> None:
    rng = random.Random(0)
    words = "to be or not that is the question whether tis nobler in the mind to suffer slings and arrows".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))).capitalize() + "." for _ in range(600)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    write_corpus(root / "tiny.txt")
    return root


@pytest.fixture(autouse=True)
def _in_workdir(workdir, monkeypatch):
    monkeypatch.chdir(workdir)  # the tiny spec's data source `tiny.txt` is relative to the working directory


def tiny_spec(**changes) -> dict:
    spec = yaml.safe_load(TINY.read_text())
    spec.update(changes)
    return spec


def write_spec(path: Path, spec: dict) -> str:
    path.write_text(json.dumps(spec))
    return str(path)


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def by_name(out: Path) -> dict[str, dict]:
    return {r["name"]: r for r in results(out)["entrants"]}


@pytest.fixture(scope="module")
def first_run(workdir) -> tuple[Path, str]:
    """The tiny comparison, run once through the command line."""
    import contextlib
    import io
    import os

    out = workdir / "out"
    stdout = io.StringIO()
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with contextlib.redirect_stdout(stdout):
            assert main(["compare", str(TINY), str(out)]) == 0
    finally:
        os.chdir(cwd)
    return out, stdout.getvalue()


def test_outputs(first_run):
    out, printed = first_run
    summary = results(out)
    rows = summary["entrants"]
    assert [r["name"] for r in rows] == NAMES and summary["pending"] == []
    assert [r["kind"] for r in rows] == ["wiola", "ablation", "wiola", "gpt2", "mistral"]
    for k, name in enumerate(NAMES, 1):
        assert f"[{k}/5] {name} (" in printed
    for r in rows:
        assert set(FIELDS) <= set(r), r["name"]
        assert r["status"] == "done"
        assert r["tokens_seen"] == 6 * 4 * 32  # steps x batch x context: the same for everyone
        assert [s for s, _ in r["val_curve"]] == [3, 6]
        assert r["best_val_loss"] == min(v for _, v in r["val_curve"]) and r["final_val_loss"] == r["val_curve"][-1][1]
        assert math.isclose(r["best_val_ppl"], math.exp(r["best_val_loss"])) and math.isclose(r["final_val_ppl"], math.exp(r["final_val_loss"]))
        assert 0 < r["best_val_loss"] < math.log(40)  # a char vocabulary of ~36 symbols, learning
        assert r["tokens_per_s"] > 0 and r["wall_time_s"] > 0
        assert r["peak_memory_kind"] == "cpu_peak_rss" and r["peak_memory_bytes"] > 50 * 2**20
        # parameters were counted on the built model (the trainer's log), and match the plan
        log = [json.loads(line) for line in (Path(r["run_dir"]) / "log.jsonl").read_text().splitlines()]
        assert r["parameters"] == next(x["parameters"] for x in log if x.get("event") == "start")
    rows = {r["name"]: r for r in rows}
    budget = rows["seed"]["parameters"]
    for name in ("seed:mlp=swiglu", "gpt2", "mistral"):
        assert abs(rows[name]["parameters"] / budget - 1) < 0.03, (name, rows[name]["parameters"], budget)
    # shape and dropout reach every kind of model
    gpt2, mistral, seed = rows["gpt2"]["config"], rows["mistral"]["config"], rows["seed"]["config"]
    assert (gpt2["n_embd"], gpt2["n_layer"], gpt2["n_head"], gpt2["n_positions"]) == (32, 2, 4, 32)
    assert gpt2["resid_pdrop"] == gpt2["embd_pdrop"] == gpt2["attn_pdrop"] == 0.1
    assert mistral["sliding_window"] == 16 and mistral["attention_dropout"] == 0.1 and mistral["tie_word_embeddings"]
    assert seed["hidden_dropout"] == seed["attention_dropout"] == 0.1 and seed["intermediate_size"] == 64  # 512 x 32/256
    assert rows["seed:mlp=swiglu"]["config"]["mlp"] == "swiglu"
    assert all(r["config"]["vocab_size"] == summary["data"]["vocab_size"] for r in rows.values())
    # the markdown table: header + one row per entrant
    md = (out / "results.md").read_text()
    assert "| " + " | ".join(COLUMNS) + " |" in md
    for name, r in rows.items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == len(COLUMNS)
        assert cells[2] == f"{r['parameters']:,}" and cells[4] == f"{r['best_val_loss']:.4f}"
    png = (out / "val_loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_second_run_skips_and_grown_spec_trains_only_the_new_entrant(first_run, workdir, capsys):
    out, _ = first_run
    logs = {name: (Path(r["run_dir"]) / "log.jsonl").read_text() for name, r in by_name(out).items()}
    grown = tiny_spec()
    grown["entrants"].append({"name": "llama", "kind": "llama"})
    capsys.readouterr()
    assert compare(write_spec(workdir / "grown.json", grown), out) == 0
    printed = capsys.readouterr().out
    for k, name in enumerate(NAMES, 1):
        assert f"[{k}/6] {name} (" in printed and "finished earlier, skipped" in printed.split(f"[{k}/6] {name} (")[1].splitlines()[0]
    assert "[6/6] llama (llama, " in printed and "training" in printed.split("[6/6] llama")[1].splitlines()[0]
    rows = by_name(out)
    assert list(rows) == NAMES + ["llama"]
    for name, text in logs.items():  # nothing retrained
        assert (Path(rows[name]["run_dir"]) / "log.jsonl").read_text() == text
    assert rows["llama"]["tokens_seen"] == rows["seed"]["tokens_seen"]
    assert abs(rows["llama"]["parameters"] / rows["seed"]["parameters"] - 1) < 0.03


def test_interrupted_entrant_resumes_exactly(first_run, workdir, monkeypatch, capsys):
    from wiola.train.trainer import Trainer

    reference = by_name(first_run[0])["seed"]
    spec = write_spec(workdir / "one.json", tiny_spec(entrants=[tiny_spec()["entrants"][0]]))
    out = workdir / "interrupted"
    original = Trainer.train_step

    def stop_after_three(self):
        if self.step == 3:
            self._stop.signum = signal.SIGINT  # what Ctrl-C during step 4 does
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", stop_after_three)
    assert compare(spec, out, only=["seed"]) == 130
    assert "interrupted during seed" in capsys.readouterr().out
    assert results(out)["entrants"] == [] and results(out)["pending"] == ["seed", "seed:mlp=swiglu"]
    run = out / "runs" / "seed"
    assert not (run / "result.json").exists() and (run / "checkpoints" / "latest").is_dir()

    monkeypatch.setattr(Trainer, "train_step", original)
    assert compare(spec, out, only=["seed"]) == 0
    assert "[1/2] seed (wiola, " in (printed := capsys.readouterr().out) and "resuming from step 4" in printed
    row = by_name(out)["seed"]
    assert row["sessions"] == 2 and row["tokens_seen"] == reference["tokens_seen"]
    assert [s for s, _ in row["val_curve"]] == [s for s, _ in reference["val_curve"]]
    assert [v for _, v in row["val_curve"]] == pytest.approx([v for _, v in reference["val_curve"]], abs=1e-6)  # as if never interrupted
    assert results(out)["pending"] == ["seed:mlp=swiglu"]

    # the same out/ with another setting is refused rather than mixed
    with pytest.raises(WiolaError, match="different setting"):
        compare(spec, out, only=["seed"], train_overrides={"max_steps": 8})


def test_cli_error_is_one_line(workdir, capsys):
    spec = tiny_spec()
    spec["entrants"][0]["ablations"] = ["mlp", "attention"]
    assert main(["compare", write_spec(workdir / "bad.json", spec), str(workdir / "bad")]) == 2
    err = capsys.readouterr().err
    assert "wiola compare: error:" in err and "unknown component 'attention'" in err and "Traceback" not in err


@pytest.mark.parametrize("change, message", [
    (lambda s: s["entrants"].append({"name": "x", "kind": "falcon"}), r"unknown kind 'falcon'; kinds: wiola, llama, mistral, gpt2"),
    (lambda s: s["entrants"][0].update(ablations=["norm"]), r"norm is already 'rmsnorm' \(off\); write norm=VALUE"),
    (lambda s: s["entrants"][0].update(ablations=["mlp=mixer"]), r"mlp='mixer' is not valid; choose one of: swiglu, butterfly"),
    (lambda s: s["entrants"][0].update(ablations=["attention_gate=gsa"]), r"already 'gsa'; that ablation changes nothing"),
    (lambda s: s["entrants"][1].update(ablations="all", config={"mlp": "swiglu"}), r"'all' found no novel component"),
    (lambda s: s["entrants"][0].update(config="wiola-pico"), r"neither a preset .* nor an existing file"),
    (lambda s: s["entrants"][1].update(config={"preset": "wiola-pico"}), r"unknown preset 'wiola-pico'"),
    (lambda s: s["entrants"][1].update(config={"preset": "wiola-nano", "hidden_size": 64}), r"sets hidden_size, which the spec's shape"),
    (lambda s: s["entrants"][1].update(config={"mlp": "conv"}), r"mlp='conv' is not valid"),
    (lambda s: s["entrants"][3].update(budget="nobody"), r"budget refers to unknown entrant 'nobody'"),
    (lambda s: s["entrants"][3].update(name="seed"), r"two entrants are named 'seed'"),
    (lambda s: s["entrants"][3].update(sliding_window=8), r"unknown key 'sliding_window'"),
    (lambda s: s["entrants"][0].update(budget="gpt2"), r"budgets refer to each other in a loop: seed -> gpt2 -> seed"),
    (lambda s: s["train"].update(learning_rate=0.1), r"train: unknown key 'learning_rate'"),
    (lambda s: s.update(models=[]), r"unknown key 'models'"),
    (lambda s: s["shape"].update(hiden_size=3), r"shape: unknown key 'hiden_size' \(did you mean 'hidden_size'\?\)"),
    (lambda s: s["data"].update(source="missing.txt"), r"data source missing.txt not found"),
])
def test_clear_errors(workdir, change, message):
    spec = tiny_spec()
    change(spec)
    with pytest.raises((WiolaError, ValueError), match=message):
        compare(write_spec(workdir / "bad.json", spec), workdir / "bad")
    assert not (workdir / "bad" / "runs").exists()  # refused before anything trained


def test_only_unknown_entrant(workdir):
    with pytest.raises(WiolaError, match=r"--only: unknown entrant\(s\) 'sed'; entrants: seed, seed:mlp=swiglu"):
        compare(str(TINY), workdir / "bad", only=["sed"])


@pytest.mark.parametrize("path, vocab", [("shakespeare_char.yaml", 69), ("shakespeare_bpe.yaml", 28642)])
def test_issue_specs_resolve_at_matched_budgets(path, vocab):
    """The two specs of issue 6 build every entrant; baselines and MLP ablations sit within 1% of their budgets."""
    spec = load_spec(REPO / "configs" / "compare" / path)
    entrants = resolve_entrants(spec, {"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2})
    names = [e.name for e in entrants]
    assert len(names) == len(set(names))
    assert {"llama", "mistral", "gpt2"} <= {e.kind for e in entrants}
    for e in entrants:
        if e.budget is not None:
            assert abs(e.parameters / e.budget - 1) < 0.01, (e.name, e.parameters, e.budget)
        assert e.shape["context"] == spec.shape["context"] and e.shape["hidden_size"] == spec.shape["hidden_size"]
    if path == "shakespeare_char.yaml":
        assert {"wiola13m:position_encoding=rope", "wiola13m:attention_gate=none", "wiola13m:mlp=swiglu",
                "paper:position_encoding=rope", "paper:cross_layer_context=none", "paper:token_merging=none",
                "paper:mlp=swiglu", "paper:norm=rmsnorm", "llama-arch:attention_gate=gsa"} <= set(names)
        nano_gpt = 10_650_000  # nanoGPT's baby GPT: 10.65M parameters
        assert abs(next(e for e in entrants if e.name == "wiola13m").parameters / nano_gpt - 1) < 0.01


def test_ablation_widths_match_keeps_every_ablation_at_the_base_budget():
    spec = load_spec(REPO / "configs" / "compare" / "shakespeare_char.yaml")
    spec.ablation_widths = "match"
    spec.entrants = [e for e in spec.entrants if e["name"] == "paper"]
    entrants = resolve_entrants(spec, {"vocab_size": 69})
    base, ablations = entrants[0], entrants[1:]
    assert [a.name.split(":")[1] for a in ablations] == ["position_encoding=rope", "cross_layer_context=none",
                                                         "token_merging=none", "mlp=swiglu", "norm=rmsnorm"]
    for a in ablations:
        assert a.budget == base.parameters and abs(a.parameters / base.parameters - 1) < 0.01, a.name
    no_gcla = next(a for a in ablations if a.name == "paper:cross_layer_context=none")
    assert no_gcla.fields["intermediate_size"] > base.fields["intermediate_size"]  # the freed GCLA parameters go to the MLP
    assert no_gcla.fields["dsff_wide_size"] == 4 * no_gcla.fields["intermediate_size"]


def test_article_switches_are_compare_ablations():
    """`mlp=agu`, `mlp=f3n` and `norm=hln` ablate like every other switch (docs/architecture.md §6)."""
    spec = load_spec(REPO / "configs" / "compare" / "shakespeare_char.yaml")
    spec.entrants = [{**{k: v for k, v in e.items() if k != "budget"}, "ablations": ["mlp=agu", "mlp=f3n", "norm=hln"]}
                     for e in spec.entrants if e["name"] == "llama-arch"]
    entrants = resolve_entrants(spec, {"vocab_size": 69})
    assert [e.name for e in entrants] == ["llama-arch", "llama-arch:mlp=agu", "llama-arch:mlp=f3n", "llama-arch:norm=hln"]
    assert [(e.shape["mlp"], e.shape["norm"]) for e in entrants[1:]] == [("agu", "rmsnorm"), ("f3n", "rmsnorm"), ("swiglu", "hln")]
    base = entrants[0].parameters
    assert [e.parameters - base for e in entrants[1:]] == [6 * (384 + 2), 0, 13 * 2]  # d + 2 per AGU layer, 2 per HLN norm


def test_a_touched_corpus_keeps_the_finished_runs(tmp_path, monkeypatch, capsys):
    """Copying or touching the corpus changes the inputs' fingerprint, so the data are prepared again, but
    not the tokens: finished runs are identified by the data's content and kept, not refused."""
    import os

    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "tiny.txt")
    spec = write_spec(tmp_path / "one.json", tiny_spec(entrants=[{"name": "seed", "kind": "wiola", "config": "wiola-nano"}],
                                                        train={**tiny_spec()["train"], "max_steps": 3}))
    out = tmp_path / "out"
    assert compare(spec, out) == 0
    first = results(out)["data"]
    meta_path = out / "runs" / "seed" / "entrant.json"
    log = (out / "runs" / "seed" / "log.jsonl").read_text()
    stat = (tmp_path / "tiny.txt").stat()
    os.utime(tmp_path / "tiny.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    capsys.readouterr()
    assert compare(spec, out) == 0
    printed = capsys.readouterr().out
    second = results(out)["data"]
    assert second["fingerprint"] != first["fingerprint"] and second["content"] == first["content"]  # prepared again, same tokens
    assert "finished earlier, skipped" in printed and (out / "runs" / "seed" / "log.jsonl").read_text() == log

    # a run recorded before content ids (the inputs' fingerprint): kept when that is the data prepared now
    meta = json.loads(meta_path.read_text())
    meta["setting"]["data"] = {"fingerprint": second["fingerprint"], "vocab_size": second["vocab_size"]}
    meta_path.write_text(json.dumps(meta))
    assert compare(spec, out) == 0 and "finished earlier, skipped" in capsys.readouterr().out
    meta["setting"]["data"]["fingerprint"] = first["fingerprint"]  # ... and refused when it is not
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(WiolaError, match="different setting"):
        compare(spec, out)
