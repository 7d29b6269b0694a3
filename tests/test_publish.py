"""`wiola push` and the model card: the card that `wiola train` writes, checked against independent
computation (parameters of the loaded model, `wiola eval`, `wiola generate`, huggingface_hub's card
parser), and the upload through huggingface_hub's real client against a stand-in Hub on 127.0.0.1."""

from __future__ import annotations

import json
import re
import socket

import pytest

from tests.fakehub import FakeHub
from tests.train.tinyrun import FAMILIES, FAST, make_dataset, read_log, write_model_config
from wiola.cli import main
from wiola.publish import upload_files


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("publish")
    data = make_dataset(root / "data")
    out = root / "run"
    config = write_model_config(root / "m.json", **FAMILIES["seed"])
    assert main(["train", str(config), str(data), str(out), *FAST, "--max-steps", "4", "--eval-every", "2"]) == 0
    return data, out


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants

    server = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    if int(huggingface_hub.__version__.split(".")[0]) < 2:
        # as if set before the process started: huggingface_hub 1.3 reads it once, at import, for the URLs it
        # parses (2.4 passes without this, and patched it sends a request of its own, GET /api/agent-harnesses)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # never the user's own login
    yield server
    server.stop()


def test_train_writes_a_card_that_matches_the_model(run, capsys):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    from wiola.evaluate import eval_command
    from wiola.generate import generate_command

    data, out = run
    text = (out / "README.md").read_text()
    meta = ModelCard.load(out / "README.md").data  # huggingface_hub's own parser of the YAML header
    assert (meta.library_name, meta.license, meta.pipeline_tag) == ("transformers", "apache-2.0", "text-generation")
    assert {"wiola", "custom_code", "spiral-rope", "gated-spiral-attention", "butterfly-mlp"} <= set(meta.tags)

    model = AutoModelForCausalLM.from_pretrained(out)
    assert f"**{sum(p.numel() for p in model.parameters()):,} parameters**" in text
    config = json.loads((out / "config.json").read_text())
    for switch in ("position_encoding", "attention_gate", "cross_layer_context", "token_merging", "mlp", "norm"):
        assert f"| `{switch}` | `{config[switch]}` |" in text
    state = json.loads((out / "checkpoints" / "final" / "trainer_state.json").read_text())
    assert f"**{state['tokens_seen']:,} tokens seen**" in text and state["data_source"]["train_tokens"] > 0
    assert f"{state['data_source']['train_tokens']:,} training tokens" in text

    # the final validation loss and bits per byte: those of `wiola eval` on the windows training validated on
    val = [r for r in read_log(out) if "val_loss" in r][-1]
    measured = eval_command(str(out), str(data), seq_len=32, batch_size=8, max_batches=2, device="cpu")
    assert val["val_bpb"] == pytest.approx(measured["bits_per_byte"], rel=1e-6)
    assert f"final validation loss **{measured['loss']:.4f}**" in text
    assert f"**{measured['bits_per_byte']:.4f} bits per byte** at step 4" in text
    assert "![training and validation loss](loss.png)" in text and (out / "loss.png").is_file()

    # the sample: what `wiola generate` draws from the saved model with the card's settings
    (sample,) = generate_command(str(out), "", max_new_tokens=64, temperature=0.8, top_k=50, seed=0, stream=False, device="cpu")
    assert f"```text\n{sample}\n```" in text
    assert 'from_pretrained("' + str(out) + '", trust_remote_code=True)' in text
    capsys.readouterr()


def test_card_bits_per_byte_from_the_data_when_the_log_predates_them(run, tmp_path):
    from wiola import card

    data, out = run
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    logged = [r for r in log if "val_bpb" in r][-1]["val_bpb"]
    old = tmp_path / "old"
    old.mkdir()
    for item in out.iterdir():
        if item.is_file():
            (old / item.name).write_bytes(item.read_bytes())
    (old / "checkpoints").symlink_to(out / "checkpoints")
    (old / "log.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "val_bpb"}) + "\n" for r in log))
    info = card.collect(old)
    assert info.val["bits_per_byte"] == pytest.approx(logged, rel=1e-9)


def test_push_uploads_the_model_and_its_card_through_huggingface_hub(run, hub, capsys):
    data, out = run
    assert main(["push", str(out), "alice/tiny-wiola", "--private", "--revision", "dev", "--token", "hf_test",
                 "--sample-prompt", "The king", "--device", "cpu"]) == 0
    assert "pushed" in capsys.readouterr().out
    calls = [(r.method, r.path) for r in hub.requests]
    assert calls == [("POST", "/api/repos/create"), ("POST", "/api/models/alice/tiny-wiola/branch/dev"),
                     ("POST", "/api/validate-yaml"), ("POST", "/api/models/alice/tiny-wiola/preupload/dev"),
                     ("POST", "/api/models/alice/tiny-wiola/commit/dev")]
    assert all(r.headers.get("authorization") == "Bearer hf_test" for r in hub.requests)
    create = hub.requests[0].json()
    assert (create["organization"], create["name"]) == ("alice", "tiny-wiola")
    assert create.get("visibility", "private" if create.get("private") else None) == "private"  # (huggingface_hub <2: "private")
    assert hub.repos["alice/tiny-wiola"]["private"]

    uploaded = hub.repos["alice/tiny-wiola"]["files"]["dev"]
    expected = upload_files(out)
    assert set(uploaded) == set(expected) | {"README.md"}
    assert {"model.safetensors", "config.json", "modeling_wiola.py", "configuration_wiola.py", "components_wiola.py",
            "tokenizer.json", "tokenizer_config.json", "loss.png"} <= set(uploaded)
    assert not [name for name in uploaded if "trainer_state" in name or name.startswith(("checkpoints", "log"))]
    for name, path in expected.items():
        assert uploaded[name] == path.read_bytes(), name
    readme = uploaded["README.md"].decode()
    assert 'from_pretrained("alice/tiny-wiola", trust_remote_code=True)' in readme
    assert 'From the prompt "The king"' in readme and "hf download alice/tiny-wiola" in readme
    preupload = {f["path"] for f in hub.requests[3].json()["files"]}
    assert preupload == set(uploaded)
    header = hub.commits()[0].ndjson()[0]
    assert header["key"] == "header" and header["value"]["summary"] == "Upload run with wiola push"


def test_push_defaults_public_main_and_the_logged_in_token(run, hub, monkeypatch, capsys):
    data, out = run
    monkeypatch.setenv("HF_TOKEN", "hf_from_login")
    own = out.parent / "own"  # a README.md written by a person goes up unchanged
    own.mkdir()
    for name, path in upload_files(out).items():
        (own / name).write_bytes(path.read_bytes())
    (own / "README.md").write_text("# my own card\n")
    assert main(["push", str(own), "bob/m", "--no-sample", "--commit-message", "first"]) == 0
    create = hub.requests[0].json()
    assert "visibility" not in create and not hub.repos["bob/m"]["private"]  # the namespace's default
    assert [r.path for r in hub.requests if "/api/models/" in r.path] == ["/api/models/bob/m/preupload/main",
                                                                          "/api/models/bob/m/commit/main"]
    assert all(r.headers.get("authorization") == "Bearer hf_from_login" for r in hub.requests)
    assert hub.repos["bob/m"]["files"]["main"]["README.md"] == b"# my own card\n"
    assert hub.commits()[0].ndjson()[0]["value"]["summary"] == "first"
    # pushing again to the existing repo: create_repo's 409 is fine, a new commit goes up
    assert main(["push", str(own), "bob/m", "--no-sample"]) == 0
    assert len(hub.commits()) == 2
    capsys.readouterr()


def test_dry_run_lists_the_files_and_sends_nothing(run, hub, capsys):
    data, out = run
    assert main(["push", str(out), "alice/x", "--dry-run", "--no-sample"]) == 0
    listed = re.findall(r"^  (\S+)\s+[\d,]+ bytes", capsys.readouterr().out, re.M)
    assert listed == [*upload_files(out), "README.md"]
    assert hub.requests == []


def test_push_errors_are_one_line(run, hub, tmp_path, monkeypatch, capsys):
    data, out = run

    def error(argv):
        assert main(argv) == 2
        err = capsys.readouterr().err
        (line,) = [line for line in err.splitlines() if line.startswith("wiola push: error: ")]
        assert "Traceback" not in err and err.endswith(line + "\n"), err
        return line

    assert "not logged in" in error(["push", str(out), "alice/x", "--no-sample"])
    assert "holds no model" in error(["push", str(tmp_path), "alice/x", "--token", "t"])
    assert "no such directory" in error(["push", str(tmp_path / "nothing"), "alice/x", "--token", "t"])
    assert "REPO must be" in error(["push", str(out), "just-a-name", "--token", "t"])
    hub.fail_with = 401
    assert "token was refused (401)" in error(["push", str(out), "alice/x", "--no-sample", "--token", "bad"])
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed}")
    assert "cannot reach the Hub at http://127.0.0.1" in error(["push", str(out), "alice/x", "--no-sample", "--token", "t"])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_card_of_a_transformers_baseline_names_its_class_and_shape(kind, tmp_path):
    """`wiola compare` trains GPT-2 and LLaMA baselines: their cards describe them, not a Wiola decoder."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from wiola import card

    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=16, vocab_size=40))
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                             max_position_embeddings=16, vocab_size=40))
    model.save_pretrained(tmp_path)
    text = card.render(card.collect(tmp_path))
    name = type(model).__name__
    assert f"a transformers `{name}` (a baseline, not a Wiola decoder)" in text and "Wiola decoder," not in text
    assert "| layers × hidden size | 2 × 32 |" in text and "| context | 16 tokens |" in text and "| vocabulary | 40 tokens |" in text
    assert "| switch | value |" not in text


def test_push_refuses_damaged_weights_and_links_in_one_line(run, hub, tmp_path, capsys):
    """Issue 26 item 9 and a minor one: damaged weights printed a SafetensorError traceback (from the layout
    check) where generate, export and card say "cannot load a model"; a link in the folder uploaded the file
    it points to."""
    import shutil

    data, out = run

    def error(argv):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        return err

    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged, ignore=shutil.ignore_patterns("checkpoints"))
    (damaged / "model.safetensors").write_bytes(b"\x00" * 64)
    for sample in ("--no-sample", "--sample"):
        assert "cannot load a model from" in error(["push", str(damaged), "alice/x", "--dry-run", sample])

    linked = tmp_path / "linked"
    shutil.copytree(out, linked, ignore=shutil.ignore_patterns("checkpoints"))
    secret = tmp_path / "secret.json"
    secret.write_text('{"not": "a tokenizer"}')
    (linked / "tokenizer.json").unlink()
    (linked / "tokenizer.json").symlink_to(secret)
    assert "tokenizer.json is a link" in error(["push", str(linked), "alice/x", "--dry-run", "--no-sample"])
    assert "tokenizer.json is a link" in error(["push", str(linked), "alice/x", "--no-sample", "--token", "t"])
    assert hub.requests == []
