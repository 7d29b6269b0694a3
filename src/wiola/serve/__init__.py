"""`wiola serve`: an OpenAI-compatible HTTP server for a Wiola model, with continuous batching.

`engine` (the request queue and the batching worker), `slots` (the preallocated per-row cache),
`protocol` (request bodies and checks), `app` (FastAPI routes). FastAPI and uvicorn come with the
optional extra `wiola[serve]`; this module imports neither until the command runs.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path
from typing import Literal

from wiola.errors import WiolaError


_ENGINE_NAMES = {"onnx": "onnxruntime", "torch": "torch eager"}


def require_server_packages() -> None:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise WiolaError(f"wiola serve needs {' and '.join(missing)}: pip install 'wiola[serve]'")


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one), or a one-line error."""
    if not 0 <= port <= 65535:  # (the socket layer would take 70000 as 70000 % 65536)
        raise WiolaError(f"--port must be in 0..65535, got {port}")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)
    except OSError as exc:
        raise WiolaError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve_command(
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    max_batch_size: int = 8,
    max_queue: int = 64,
    max_model_len: int | None = None,
    device: str = "auto",
    shutdown_timeout: float | None = None,
    max_request_bytes: int = 2**20,
    allow_changed_base: bool = False,
    engine: Literal["auto", "torch", "onnx"] = "auto",
    quantize: Literal["none", "int8", "int4"] = "none",
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info",
) -> int:
    """Serve a model over HTTP with OpenAI's API (completions, chat completions, streaming).

    Concurrent requests decode together on one preallocated cache (continuous batching); see
    docs/serve.md. SIGTERM or Ctrl-C stops accepting connections, finishes the requests in flight,
    then exits.

    Args:
        checkpoint: a model directory (a training out/, one of its checkpoints/..., or any saved Wiola model).
        host: address to listen on (0.0.0.0 for every interface).
        port: TCP port (0: any free port; the address is printed).
        model_name: the name clients pass as `model` (default: the directory's name).
        max_batch_size: requests decoded together; the cache holds this many rows.
        max_queue: requests that may wait for a place in the batch; beyond that the server answers 503.
        max_model_len: cache slots per row, i.e. the most prompt + completion tokens of a request
            (default: the model's context).
        device: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.
        shutdown_timeout: on shutdown, seconds to wait for requests in flight before cancelling them (default: no limit).
        max_request_bytes: the largest request body accepted; a larger one gets HTTP 413 before it is read.
        allow_changed_base: serve a LoRA run although its --init-from base's weights changed since training.
        engine: what runs the batched decode step on CPU, by wiola generate's rule: auto = onnx when this model's
            export is in the engine cache (~/.cache/wiola/onnx; made at the end of wiola train on CPU, by wiola export
            --to onnx, or by an earlier --engine onnx or --quantize run) and onnxruntime is installed, else torch
            eager (auto never exports); onnx = the ONNX export under onnxruntime, exported into the cache first when
            missing; torch = PyTorch eager. Without onnxruntime or when the export fails: torch, with a note.
            Prompts are prefilled on the float32 torch model in every case.
        quantize: int8 / int4 weights for the decode steps on CPU, as wiola generate --quantize (int4: the onnx
            engine only); none = the model's own weights.
        log_level: uvicorn's log level (info logs every request).
    """
    require_server_packages()
    import uvicorn

    from wiola.data.chat import ensure_chat_template
    from wiola.train.checkpoint import load_for_inference

    from .app import create_app
    from .engine import Engine

    from wiola.generate import check_engine_options

    if max_request_bytes < 1:
        raise WiolaError(f"--max-request-bytes must be positive, got {max_request_bytes}")
    quantize, dev = check_engine_options(engine, quantize, "auto", "auto", device)
    sock = listen(host, port)
    model, tokenizer, model_dir = load_for_inference(checkpoint, dev, allow_changed_base=allow_changed_base)
    if ensure_chat_template(tokenizer):
        print(f"note: the tokenizer of {model_dir} has no chat template; /v1/chat/completions uses the default one (docs/finetune.md)",
              file=sys.stderr)
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue, capacity=max_model_len,
                    engine=engine, quantize=quantize, note=lambda text: print(f"wiola: {text}", file=sys.stderr, flush=True))
    name = model_name or Path(model_dir).resolve().name
    app = create_app(engine, tokenizer, name, max_request_bytes=max_request_bytes)
    bound = sock.getsockname()
    print(f"wiola serve: {name} on http://{bound[0]}:{bound[1]} ({dev}; batch {max_batch_size}, queue {max_queue}, "
          f"{engine.capacity} tokens per request, cache {engine.slots.bytes() / 2**20:.1f} MiB; decode steps on "
          f"{_ENGINE_NAMES[engine.engine]}{f' with {quantize} weights' if quantize else ''}: {engine.engine_reason})",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
    return 0
