"""`wiola serve` through the official `openai` client against 127.0.0.1: concurrent greedy requests
equal sequential ones and `model.generate` (every family), streaming, seeded sampling, every bad
request's status, 503 on overload, and SIGTERM draining the requests in flight (a real subprocess)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tests.train.tinyrun import corpus

from .conftest import client, running_server
from .tinymodels import CONTEXT

PROMPTS = [doc[: 6 + 11 * i] for i, doc in enumerate(corpus(8, 3))]  # 8 prompts of growing length
MAX_TOKENS = [40, 12, 33, 20, 28, 9, 36, 17]


def complete(c, i: int, **kw):
    r = c.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=MAX_TOKENS[i], temperature=0,
                             extra_body={"return_token_ids": True}, **kw)
    return r.choices[0].token_ids, r.choices[0].text, r.choices[0].finish_reason


@pytest.mark.parametrize("family", ["seed", "paper", "all-off"])
def test_eight_concurrent_clients_get_the_tokens_of_sequential_greedy_decoding(model_dirs, tokenizer, family):
    from transformers import AutoModelForCausalLM

    model_dir = model_dirs(family)
    with running_server(model_dir, max_batch_size=4, max_queue=8) as (url, engine):
        c = client(url)
        sequential = [complete(c, i) for i in range(8)]
        alone = engine.stats()
        barrier = threading.Barrier(8)

        def concurrent(i):
            barrier.wait()
            return complete(client(url), i)

        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(concurrent, range(8)))
        stats = engine.stats()
    assert together == sequential
    assert alone["mean_batch"] == 1.0 and stats["steps"] - alone["steps"] < alone["steps"]  # the concurrent ones ran batched
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for i, (tokens, text, finish) in enumerate(sequential):
        ids = tokenizer(PROMPTS[i], return_tensors="pt").input_ids
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS[i], do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in ref:
            ref = ref[: ref.index(tokenizer.eos_token_id) + 1]
        assert tokens == ref and text == tokenizer.decode(ref, skip_special_tokens=True)
        assert finish == ("stop" if ref[-1] == tokenizer.eos_token_id else "length")


def test_rows_joining_and_leaving_a_full_cache_keep_every_request_exact(model_dirs):
    """Engine level, a tight cache (64 slots): rows shift right for longer prompts and left to reclaim
    slots; greedy and seeded sampled requests get what they get alone."""
    from wiola.serve.engine import Engine, SamplingParams
    from wiola.train.checkpoint import load_for_inference

    model, tok, _ = load_for_inference(model_dirs("paper"), torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, len(tok), (int(torch.randint(1, 34, (1,), generator=g)),), generator=g).tolist() for _ in range(12)]
    params = [SamplingParams(max_tokens=int(torch.randint(1, 64 - len(p) + 1, (1,), generator=g)), temperature=0 if i % 2 else 0.9,
                             top_k=20 if i % 4 == 0 else None, top_p=0.9 if i % 4 == 2 else None, seed=i, ignore_eos=i % 3 == 0)
              for i, p in enumerate(prompts)]
    alone = Engine(model, tok, max_batch_size=1, max_queue=0, capacity=64).start()
    reference = [alone.generate(p, s) for p, s in zip(prompts, params)]
    alone.stop()
    engine = Engine(model, tok, max_batch_size=5, max_queue=12, capacity=64).start()
    engine.pause()  # queue everything, then let the engine take them in as rows free up
    with ThreadPoolExecutor(12) as pool:
        results = [pool.submit(engine.generate, p, s) for p, s in zip(prompts, params)]
        while engine.stats()["waiting"] < 12:
            time.sleep(0.01)
        engine.resume()
        assert [r.result(60) for r in results] == reference
    stats = engine.stats()
    engine.stop()
    assert stats["shifts"] >= 2 and stats["mean_batch"] > 2


def test_streaming_chat_and_completions(model_dirs, tokenizer):
    with running_server(model_dirs("seed"), max_batch_size=4, max_queue=8) as (url, engine):
        c = client(url)
        whole = c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=30, temperature=0)
        chunks = list(c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=30, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
        assert len(chunks) > 3 and "".join(ch.choices[0].text for ch in chunks[:-1]) == whole.choices[0].text
        assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

        messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What does the king do?"}]
        reply = c.chat.completions.create(model="tiny", messages=messages, max_tokens=25, temperature=0)
        stream = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=25, temperature=0, stream=True))
        assert stream[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in stream) == reply.choices[0].message.content
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert reply.usage.prompt_tokens == len(prompt)

        # sampling: a seed repeats; n choices stream interleaved; stop strings end the text before them
        kw = dict(model="tiny", prompt=PROMPTS[1], max_tokens=20, temperature=1.0, top_p=0.95, seed=7)
        first, again = c.completions.create(**kw), c.completions.create(**kw)
        assert first.choices[0].text == again.choices[0].text
        multi = list(c.completions.create(**{**kw, "n": 2, "stream": True}))
        texts = ["".join(ch.choices[0].text for ch in multi if ch.choices[0].index == i) for i in range(2)]
        assert texts[0] == first.choices[0].text and texts[1] == c.completions.create(**{**kw, "seed": 8}).choices[0].text
        text = first.choices[0].text
        stop = next(text[i:i + 2] for i in range(3, len(text)) if "\ufffd" not in text[i:i + 2] and len(text[i:i + 2]) == 2)
        cut = c.completions.create(**kw, stop=[stop])
        assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == first.choices[0].text[: first.choices[0].text.index(stop)]
        streamed_cut = "".join(ch.choices[0].text for ch in c.completions.create(**kw, stop=[stop], stream=True))
        assert streamed_cut == cut.choices[0].text

        # a client that goes away mid-stream frees its row
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "the", "max_tokens": 100, "ignore_eos": True,
                                                                   "temperature": 0, "stream": True}) as r:
            next(r.iter_lines())
        deadline = time.monotonic() + 10
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.stats()["running"] == 0
        assert c.models.list().data[0].id == "tiny" and httpx.get(f"{url}/health").json()["status"] == "ok"
        echoed = c.completions.create(model="tiny", prompt=["the king", "a fool"], max_tokens=3, temperature=0, echo=True)
        assert [ch.text[:len(p)] for ch, p in zip(echoed.choices, ["the king", "a fool"])] == ["the king", "a fool"]
        assert echoed.usage.prompt_tokens == len(tokenizer("the king").input_ids) + len(tokenizer("a fool").input_ids)


BAD = [  # (path, body, status, param)
    ("completions", {"prompt": "a", "max_tokens": CONTEXT}, 400, "max_tokens"),  # prompt + completion > context
    ("completions", {"prompt": [5] * (CONTEXT + 1)}, 400, "prompt"),  # the prompt alone is too long
    ("chat/completions", {"messages": [{"role": "user", "content": "hi " * 200}]}, 400, "messages"),
    ("completions", {"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ("completions", {"prompt": "a", "temperature": 2.5}, 400, "temperature"),
    ("completions", {"prompt": "a", "temperature": -0.1}, 400, "temperature"),
    ("completions", {"prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ("completions", {"prompt": "a", "top_p": 0}, 400, "top_p"),
    ("completions", {"prompt": "a", "top_k": -2}, 400, "top_k"),
    ("completions", {"prompt": "a", "n": 0}, 400, "n"),
    ("completions", {"prompt": "a", "n": 5}, 400, "n"),  # more than --max-batch-size
    ("completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("completions", {"prompt": "a", "logprobs": 2}, 400, "logprobs"),
    ("completions", {"prompt": "a", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("completions", {"prompt": [1, 2, 100000]}, 400, "prompt"),
    ("completions", {"prompt": []}, 400, "prompt"),
    ("completions", {"max_tokens": 3}, 400, "prompt"),  # no prompt
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ("completions", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
]


def test_every_bad_request_gets_its_status_and_an_openai_error_body(model_dirs):
    with running_server(model_dirs("all-off"), max_batch_size=4, max_queue=4) as (url, _):
        for path, body, status, param in BAD:
            r = httpx.post(f"{url}/v1/{path}", json=body)
            error = r.json()["error"]
            assert (r.status_code, error["param"]) == (status, param), (path, body, error)
            assert error["message"] and error["type"] == "invalid_request_error"
        assert httpx.post(f"{url}/v1/completions", content=b"{not json").status_code == 400
        assert httpx.get(f"{url}/v1/nothing").json()["error"]["message"] == "Not Found"
        c = client(url)
        with pytest.raises(openai.BadRequestError) as exc:
            c.completions.create(model="tiny", prompt="a", max_tokens=CONTEXT)
        assert exc.value.code == "context_length_exceeded" and "maximum context length is 128" in exc.value.message
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
        assert c.completions.create(model="tiny", prompt="a", max_tokens=2).usage.completion_tokens <= 2  # still serving


def test_a_full_queue_answers_503_and_the_queued_requests_finish(model_dirs):
    with running_server(model_dirs("seed"), max_batch_size=1, max_queue=1) as (url, engine):
        engine.pause()
        with ThreadPoolExecutor(2) as pool:
            queued = [pool.submit(lambda: client(url).completions.create(model="tiny", prompt="the", max_tokens=5)) for _ in range(2)]
            while engine.stats()["waiting"] < 2:
                time.sleep(0.01)
            with pytest.raises(openai.InternalServerError) as exc:
                client(url).completions.create(model="tiny", prompt="the", max_tokens=5)
            assert exc.value.status_code == 503 and "at capacity" in exc.value.message
            engine.resume()
            assert all(q.result(60).choices[0].text is not None for q in queued)


def test_sigterm_finishes_the_requests_in_flight(model_dirs):
    model_dir = model_dirs("seed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "wiola", "serve", str(model_dir), "--port", "0", "--max-batch-size", "4",
                             "--log-level", "warning"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        while not lines or "wiola serve:" not in lines[-1]:
            lines.append(proc.stderr.readline())
            assert lines[-1], "".join(lines)
        threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()  # keep the pipe drained
        url = lines[-1].split(" on ")[1].split()[0]
        body = {"prompt": "the king", "max_tokens": 120, "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True}
        started, received, after = threading.Barrier(4), [0, 0, 0], [0, 0, 0]
        signalled = threading.Event()
        finish = [None, None, None]

        def stream(i):
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    choice = json.loads(line[6:])["choices"][0]
                    received[i] += len(choice["token_ids"])
                    after[i] += signalled.is_set()
                    if received[i] == 1:
                        started.wait()
                    finish[i] = choice["finish_reason"] or finish[i]

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        started.wait(timeout=60)  # every stream has its first token
        proc.send_signal(signal.SIGTERM)
        signalled.set()
        for t in threads:
            t.join(60)
        assert proc.wait(30) == -signal.SIGTERM, "".join(lines)  # uvicorn re-raises the signal once it has drained
        assert finish == ["length"] * 3 and sum(after) > 0
        assert all(n == 120 for n in received)  # every token of every request arrived
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")
    finally:
        proc.kill()
        proc.wait()


def test_a_llama_model_is_refused_with_a_pointer():
    from transformers import LlamaConfig, LlamaForCausalLM

    from wiola.errors import WiolaError
    from wiola.serve.engine import Engine

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(WiolaError, match="needs a Wiola model; this checkpoint is 'llama'"):
        Engine(llama, tokenizer=None)


def test_without_the_serve_extra_the_command_names_it(monkeypatch, capsys, tmp_path):
    import importlib.util

    from wiola.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["serve", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "wiola serve: error: wiola serve needs fastapi: pip install 'wiola[serve]'"


def test_streamed_text_is_the_decoded_tokens_cut_at_the_first_stop(model_dirs):
    """The incremental detokenizer (held-back partial characters and stop-string prefixes) against
    `tokenizer.decode` of all tokens, on random token soups full of split multi-byte characters."""
    import random

    from wiola.serve.engine import Engine, SamplingParams, Sequence
    from wiola.train.checkpoint import load_for_inference

    model, tok, _ = load_for_inference(model_dirs("all-off"), torch.device("cpu"))
    engine = Engine(model, tok, max_batch_size=1)
    rng = random.Random(0)
    words = tok("Ünïcödé ☺ 😀 the king — «quote» 日本語 😀😀 ab").input_ids
    for trial in range(300):
        tokens = [rng.choice(words) if rng.random() < 0.6 else rng.randrange(3, len(tok)) for _ in range(rng.randint(1, 30))]
        stops = [rng.choice(["ki", "😀", "ng", " the", "xyz"])] if trial % 2 else []
        events = []
        seq = Sequence(prompt=[5], params=SamplingParams(max_tokens=len(tokens), stop=stops, ignore_eos=True), sink=events.append)
        for t in tokens:
            if engine._emit(seq, t):
                break
        full = tok.decode(seq.tokens, skip_special_tokens=True)
        hits = [full.find(s) for s in stops if s in full]
        assert "".join(e.text for e in events) == (full[: min(hits)] if hits else full)
        assert events[-1].finish == ("stop" if hits else "length") and all(e.finish is None for e in events[:-1])


def test_a_stop_string_is_held_back_while_its_next_character_is_still_incomplete():
    """Streaming sends text as it settles, but never the start of a stop string that may still complete:
    after "...n" + the first byte of "í" (decoded as U+FFFD), the "n" of the stop "ní" must wait too."""
    from wiola.serve.engine import _held_back

    assert _held_back("the n\ufffd", ["ní"]) == 2  # "n" + the incomplete character
    assert _held_back("the n", ["ní"]) == 1
    assert _held_back("the x\ufffd", ["ní"]) == 1  # only the incomplete character
    assert _held_back("the x", ["ní"]) == 0 and _held_back("the n\ufffd", []) == 1
    assert _held_back("a st\ufffd", ["stop", "t\u00e9"]) == 3  # the longest prefix of any stop string wins
