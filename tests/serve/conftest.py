"""Fixtures for the server tests: tiny saved models and a real uvicorn server in a thread."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from .tinymodels import save_tiny_model, tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """family -> a saved tiny model directory (built on first use)."""
    root = tmp_path_factory.mktemp("serve-models")
    built: dict = {}

    def get(family: str):
        if family not in built:
            built[family] = save_tiny_model(root / family, family, tokenizer)
        return built[family]

    return get


@pytest.fixture(scope="session")
def long_model(tmp_path_factory, tokenizer):
    """A tiny seed-style model with a context of 1,024 tokens (long requests: disconnects, the soak)."""
    return save_tiny_model(tmp_path_factory.mktemp("serve-long") / "seed", "seed", tokenizer, context=1024)


@contextlib.contextmanager
def running_server(model_dir, app_options=None, wrap_tokenizer=None, **engine_options):
    """(base URL, engine) of `wiola serve`'s app on 127.0.0.1 (a free port), run by uvicorn in a thread.
    `app_options` go to `create_app`; `wrap_tokenizer(tok)` gives the app's tokenizer (the engine keeps `tok`)."""
    import torch
    import uvicorn

    from wiola.serve import listen
    from wiola.serve.app import create_app
    from wiola.serve.engine import Engine
    from wiola.train.checkpoint import load_for_inference

    model, tok, _ = load_for_inference(model_dir, torch.device("cpu"))
    engine = Engine(model, tok, **engine_options)
    sock = listen("127.0.0.1", 0)
    app = create_app(engine, wrap_tokenizer(tok) if wrap_tokenizer else tok, "tiny", **(app_options or {}))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    finally:
        server.should_exit = True
        thread.join(30)


def client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
