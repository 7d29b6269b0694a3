"""`wiola serve` against careless and hostile clients (issue 26): a body-size limit answered with 413
before the body is parsed, tokenization off the event loop, prompts too long by their bytes refused
without tokenizing them, non-streaming requests cancelled when their client disconnects, text that
is not valid Unicode refused with a 400, strict JSON types, requests that can never fit, bad ports."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from .conftest import running_server


class RecordingTokenizer:
    """The app's tokenizer, recording the length of each text it is asked to tokenize; a text holding
    "slow" takes `delay` seconds (a stand-in for a tokenization that takes long)."""

    def __init__(self, tokenizer, delay: float = 0.0):
        self.tokenizer, self.delay, self.seen = tokenizer, delay, []

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def _record(self, text: str) -> None:
        self.seen.append(len(text))
        if "slow" in text:
            time.sleep(self.delay)

    def __call__(self, text, *args, **kwargs):
        self._record(text)
        return self.tokenizer(text, *args, **kwargs)

    def apply_chat_template(self, messages, *args, **kwargs):
        self._record("".join(m["content"] for m in messages))
        return self.tokenizer.apply_chat_template(messages, *args, **kwargs)


def recording(delay: float = 0.0):
    holder: dict = {}

    def wrap(tok):
        holder["tok"] = RecordingTokenizer(tok, delay)
        return holder["tok"]

    return holder, wrap


def error_of(r: httpx.Response) -> dict:
    assert r.headers["content-type"] == "application/json", (r.status_code, r.text[:200])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_a_body_over_the_limit_gets_413_before_it_is_parsed(model_dirs):
    holder, wrap = recording()
    with running_server(model_dirs("seed"), app_options={"max_request_bytes": 65536}, wrap_tokenizer=wrap,
                        max_batch_size=2, max_queue=2) as (url, _):
        big = {"prompt": "the king " * 10000, "max_tokens": 2}  # 90 KB, with Content-Length
        r = httpx.post(f"{url}/v1/completions", json=big)
        assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
        assert "limit of 65,536 bytes" in error_of(r)["message"] and "--max-request-bytes" in error_of(r)["message"]

        def chunks():  # no Content-Length: a chunked body, counted as it arrives
            yield b'{"prompt": "'
            for _ in range(12):
                yield b"the king " * 1000
            yield b'", "max_tokens": 2}'

        r = httpx.post(f"{url}/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
        assert holder["tok"].seen == []  # neither body reached the tokenizer
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "the king", "max_tokens": 2})  # under the limit: served
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_tokenization_runs_off_the_event_loop(model_dirs):
    holder, wrap = recording(delay=4.0)
    with running_server(model_dirs("seed"), wrap_tokenizer=wrap, max_batch_size=2, max_queue=2) as (url, _):
        slow = {}
        thread = threading.Thread(target=lambda: slow.update(r=httpx.post(f"{url}/v1/completions", timeout=60,
                                                                         json={"prompt": "slow king", "max_tokens": 2})))
        thread.start()
        deadline = time.monotonic() + 30
        while not holder["tok"].seen:  # the slow tokenization has begun
            assert time.monotonic() < deadline
            time.sleep(0.01)
        start = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=30).json()["status"] == "ok"
        assert time.monotonic() - start < 2.0  # not after the 4 s tokenization
        thread.join(60)
        assert slow["r"].status_code == 200


def test_a_prompt_too_long_by_its_bytes_is_refused_without_tokenizing_it(model_dirs):
    holder, wrap = recording()
    with running_server(model_dirs("seed"), app_options={"max_request_bytes": 4 * 2**20}, wrap_tokenizer=wrap,
                        max_batch_size=2, max_queue=2) as (url, _):
        huge = "the king speaks " * 60000  # 960 KB
        r = httpx.post(f"{url}/v1/completions", json={"prompt": huge}, timeout=60)
        assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded" and error_of(r)["param"] == "prompt"
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": huge}]}, timeout=60)
        assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded" and error_of(r)["param"] == "messages"
        assert max(holder["tok"].seen, default=0) < 10000  # the 960 KB never reached the tokenizer
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "the king speaks " * 40})  # 241 tokens: tokenized, then 400
        assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded" and max(holder["tok"].seen) == 640


def raw_request(url: str, path: str, body: dict) -> socket.socket:
    """A socket that has sent one POST (no response read); closing it is a client going away."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                 .encode() + data)
    return sock


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_non_streaming_request_stops_when_its_client_disconnects(long_model, path):
    body = {"max_tokens": 900, "ignore_eos": True, "temperature": 0}
    body.update({"prompt": "the king"} if "chat" not in path else {"messages": [{"role": "user", "content": "the king"}]})
    with running_server(long_model, max_batch_size=2, max_queue=2) as (url, engine):
        # running: the client leaves mid-generation; its row is freed before the next step
        sock = raw_request(url, path, body)
        wait_for(lambda: engine.stats()["running"] == 1 and engine.active and len(engine.active[0].tokens) > 2)
        engine.pause()
        time.sleep(0.05)  # (the step in flight ends)
        (seq,) = engine.active
        assert seq.finish is None
        sock.close()
        wait_for(lambda: seq.cancelled)
        steps = engine.stats()["steps"]
        engine.resume()
        wait_for(lambda: engine.stats()["running"] == 0)
        assert seq.finish == "cancelled" and len(seq.tokens) < 900 and engine.stats()["steps"] == steps
        # queued: the client leaves before its request starts; it never runs
        engine.pause()
        sock = raw_request(url, path, body)
        wait_for(lambda: engine.stats()["waiting"] == 1)
        (seq,) = engine.waiting
        sock.close()
        wait_for(lambda: seq.cancelled)
        engine.resume()
        wait_for(lambda: engine.stats()["waiting"] == 0 and engine.stats()["running"] == 0)
        stats = engine.stats()
        assert seq.finish == "cancelled" and seq.tokens == [] and stats["steps"] == steps
        assert stats["finished"]["cancelled"] == 2 and stats["tokens_after_cancel"] == 0
        r = httpx.post(f"{url}{path}", json={**body, "max_tokens": 3})  # the server goes on serving
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_text_that_is_not_valid_unicode_gets_a_400_naming_it(model_dirs):
    with running_server(model_dirs("seed"), max_batch_size=2, max_queue=2) as (url, _):
        cases = [("completions", {"prompt": "a\udcffb"}, "prompt"),
                 ("completions", {"prompt": ["ok", "\ud800"]}, "prompt"),
                 ("completions", {"prompt": "a", "stop": ["x\udcfe"]}, "stop"),
                 ("chat/completions", {"messages": [{"role": "user", "content": "a\udcffb"}]}, "messages[0].content"),
                 ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc80"}]}]},
                  "messages[0].content")]
        for path, body, param in cases:
            r = httpx.post(f"{url}/v1/{path}", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
            error = error_of(r)
            assert (r.status_code, error["param"]) == (400, param) and "lone surrogate" in error["message"], (path, body, error)
        for path in ("completions", "chat/completions"):  # raw bytes that are not UTF-8
            r = httpx.post(f"{url}/v1/{path}", content=b'{"prompt": "a\xff\xfeb", "messages": []}',
                           headers={"content-type": "application/json"})
            assert r.status_code == 400 and "not valid UTF-8: byte 0xff at offset 13" in error_of(r)["message"]
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "ünï ☺", "max_tokens": 2}).status_code == 200


STRICT = [  # JSON values of the wrong type that pydantic's lax mode would coerce
    ("completions", {"prompt": "a", "max_tokens": True}, "max_tokens"),
    ("completions", {"prompt": "a", "max_tokens": "5"}, "max_tokens"),
    ("completions", {"prompt": "a", "n": True}, "n"),
    ("completions", {"prompt": "a", "seed": False}, "seed"),
    ("completions", {"prompt": "a", "temperature": True}, "temperature"),
    ("completions", {"prompt": "a", "stream": 1}, "stream"),
    ("completions", {"prompt": [1, True, 3]}, "prompt"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": True}, "max_completion_tokens"),
]


def test_booleans_are_no_integers_and_strings_no_numbers(model_dirs):
    with running_server(model_dirs("seed"), max_batch_size=2, max_queue=1) as (url, _):
        for path, body, param in STRICT:
            r = httpx.post(f"{url}/v1/{path}", json=body)
            assert (r.status_code, error_of(r)["param"]) == (400, param), (body, r.text)
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 2, "temperature": 1}).status_code == 200


def test_a_request_that_can_never_fit_is_a_400_not_retry_later(model_dirs):
    with running_server(model_dirs("seed"), max_batch_size=2, max_queue=1) as (url, _):
        # 2 prompts × n=2 = 4 sequences, more than batch 2 + queue 1 can ever hold: not "retry later"
        r = httpx.post(f"{url}/v1/completions", json={"prompt": ["a", "b"], "n": 2, "max_tokens": 2})
        assert r.status_code == 400 and error_of(r)["param"] == "n" and "more than this server ever holds" in error_of(r)["message"]
        r = httpx.post(f"{url}/v1/completions", json={"prompt": ["a", "b", "c", "d"], "max_tokens": 2})
        assert r.status_code == 400 and error_of(r)["param"] == "prompt"
        r = httpx.post(f"{url}/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 2})  # 3 fit
        assert r.status_code == 200 and len(r.json()["choices"]) == 3


def test_a_port_outside_0_to_65535_is_refused(capsys, tmp_path):
    from wiola.cli import main
    from wiola.errors import WiolaError
    from wiola.serve import listen

    for port in (70000, 65536, -1):
        with pytest.raises(WiolaError, match=f"--port must be in 0..65535, got {port}"):
            listen("127.0.0.1", port).close()
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip() == "wiola serve: error: --port must be in 0..65535, got 70000"
