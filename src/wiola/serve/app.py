"""HTTP routes of `wiola serve` (FastAPI): `/v1/completions`, `/v1/chat/completions`, `/v1/models`,
`/health`, in OpenAI's format, with server-sent events for `stream: true`.

A body over `max_request_bytes` gets 413 before it is parsed (`guard.BodyGuard`). Handlers check the
request, tokenize it on one worker thread of their own (the chat template renders conversations;
the event loop stays free for other clients, and one tokenization at a time bounds its memory), and
hand its sequences (one per prompt × `n`) to the `Engine`; the engine's worker thread sends each
sequence's events onto the event loop, where they are streamed or collected. A prompt whose UTF-8
bytes alone prove it longer than the context (byte-level BPE: a token covers at most the bytes of the
longest vocabulary entry) is refused without tokenizing it. A client that disconnects cancels its
sequences, streamed or not (a non-streaming handler watches the connection while it waits). Errors
answer with OpenAI's JSON body: 400 for a bad request (unknown parameter values, text that is not
valid Unicode, a prompt too long for the context, more prompts × `n` than the server can ever hold),
404 for an unknown model or path, 413 for a body over the limit, 503 when the queue is full or the
server is shutting down. Shutdown (uvicorn's, on SIGTERM) stops accepting connections, lets open
requests finish, then stops the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import WiolaError
from .engine import Engine, EngineClosed, Event, NeverFits, QueueFull, SamplingParams
from .guard import BodyGuard
from .protocol import (APIError, ChatRequest, CompletionRequest, bad, chat_messages, check_chat_only, check_completion_only,
                       check_text, sampling_params)

MAX_REQUEST_BYTES = 2**20  # default body limit (wiola serve --max-request-bytes)
GONE = -1  # the index of the event that says the client disconnected


class _Events:
    """(choice index, Event) pairs of one request's sequences, delivered on the event loop; (GONE, None)
    when the client disconnects."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def sink(self, index: int):
        def put(event: Event) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
            except RuntimeError:  # the loop has closed: nobody is listening any more
                pass
        return put

    async def watch(self, request: Request) -> None:
        """Wait for the client's disconnect (the body has been read), then say so on the queue."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.queue.put_nowait((GONE, None))


def longest_token_bytes(tokenizer) -> int | None:
    """The most UTF-8 bytes of text one token can stand for, when the tokenizer bounds it: a byte-level
    BPE without a normalizer (each token spells bytes of the text, or is an added token's content).
    None for other tokenizers (their normalizers and pre-tokenizers may drop characters)."""
    try:
        from tokenizers import models, pre_tokenizers

        backend = tokenizer.backend_tokenizer
        if backend.normalizer is not None or not isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel) \
                or not isinstance(backend.model, models.BPE):
            return None
        return max(len(token.encode("utf-8")) for token in tokenizer.get_vocab())
    except (AttributeError, ImportError, ValueError):
        return None


def create_app(engine: Engine, tokenizer, model_name: str, max_request_bytes: int = MAX_REQUEST_BYTES) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`; its lifespan starts and stops the engine.
    Request bodies over `max_request_bytes` get 413."""
    tokenizing = ThreadPoolExecutor(1, thread_name_prefix="wiola-tokenize")  # (a fast tokenizer is not for two threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)  # every request has been answered by now (uvicorn waits for them)
        tokenizing.shutdown(wait=False)

    app = FastAPI(title="wiola serve", summary="OpenAI-compatible server for a Wiola model", lifespan=lifespan)
    app.add_middleware(BodyGuard, limit=max_request_bytes)
    app.state.engine = engine
    capacity = engine.capacity
    vocab = engine.model.config.vocab_size
    created = int(time.time())
    token_bytes = longest_token_bytes(tokenizer)

    async def off_loop(fn, *args):
        """`fn(*args)` on the tokenizer's thread (its exceptions, e.g. APIError, come back here)."""
        return await asyncio.get_running_loop().run_in_executor(tokenizing, fn, *args)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        loc = [str(p) for p in first.get("loc", ())[1:]]
        if first.get("type") == "json_invalid":
            error = bad(f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})")
        elif not loc:
            error = bad("the request body must be a JSON object (Content-Type: application/json)")
        else:  # param: the top-level field; the message names the whole path (e.g. messages.0.role)
            error = bad(f"{'.'.join(loc)}: {first.get('msg', 'invalid value')}", loc[0])
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{model_name}`", "model", "model_not_found")

    def check_fits(prompt: list[int], max_tokens: int | None, where: str) -> int:
        n = len(prompt)
        if max_tokens is None:
            max_tokens = capacity - n
        if n + max(max_tokens, 1) > capacity:
            raise bad(f"This model's maximum context length is {capacity} tokens. However, you requested "
                      f"{n + max_tokens} tokens ({n} in the {where}, {max_tokens} for the completion). "
                      f"Please reduce the length of the {where} or the completion.", "max_tokens" if n < capacity else where,
                      "context_length_exceeded")
        return max_tokens

    def start(prompts: list[list[int]], params: SamplingParams, n: int) -> tuple[_Events, list]:
        events = _Events()
        requests = []
        for prompt in prompts:
            for j in range(n):
                choice = params if params.seed is None else dataclasses.replace(params, seed=params.seed + j)
                requests.append((prompt, choice, events.sink(len(requests))))
        try:
            seqs = engine.submit(requests)
        except (QueueFull, EngineClosed) as exc:
            raise APIError(503, str(exc), code="overloaded" if isinstance(exc, QueueFull) else "shutting_down") from None
        except NeverFits as exc:
            raise bad(str(exc), "n" if n > 1 else "prompt") from None
        except WiolaError as exc:
            raise bad(str(exc)) from None
        return events, seqs

    async def collect(events: _Events, seqs: list, request: Request) -> tuple[list[str], list[list[int]], list[str]] | None:
        """Texts, token ids and finish reasons of a non-streamed request; None when its client left (which
        cancels its sequences)."""
        k = len(seqs)
        texts, tokens, finish = [""] * k, [[] for _ in range(k)], [None] * k
        watcher = asyncio.ensure_future(events.watch(request))
        try:
            while any(f is None for f in finish):
                i, event = await events.queue.get()
                if i == GONE:
                    return None
                texts[i] += event.text
                if event.token is not None:
                    tokens[i].append(event.token)
                if event.finish:
                    if event.error:
                        raise APIError(500, f"generation failed: {event.error}")
                    finish[i] = event.finish
        finally:
            watcher.cancel()
            engine.cancel(seqs)  # (no effect on finished sequences; stops the rest if the client left or this handler is cancelled)
        return texts, tokens, finish

    def usage(prompts: list[list[int]], n: int, completion: int) -> dict:
        prompt_tokens = sum(len(p) for p in prompts) * n
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}

    async def sse(chunks: AsyncIterator[dict], seqs: list) -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False, separators=(',', ':'))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            engine.cancel(seqs)

    async def stream_events(events: _Events, seqs: list, make_chunk, prompts, n, include_usage: bool, token_ids: bool, first=()):
        """Chunks of a streamed response: `first`, one per event with text (or a finish), then usage if asked."""
        for chunk in first:
            if include_usage:
                chunk["usage"] = None
            yield chunk
        k, done = len(seqs), 0
        counts = [0] * k
        while done < k:
            i, event = await events.queue.get()
            if event.error:
                yield {"error": {"message": f"generation failed: {event.error}", "type": "server_error", "param": None, "code": None}}
                return
            counts[i] += event.token is not None
            done += event.finish is not None
            if event.text or event.finish or (token_ids and event.token is not None):  # (with ids: a chunk per token)
                chunk = make_chunk(i, event.text, event.finish)
                if token_ids and event.token is not None:
                    chunk["choices"][0]["token_ids"] = [event.token]
                if include_usage:
                    chunk["usage"] = None
                yield chunk
        if include_usage:
            final = make_chunk(0, "", None)
            final["choices"] = []
            final["usage"] = usage(prompts, n, sum(counts))
            yield final

    def check_length(nbytes: int, where: str) -> None:
        """A 400 for text whose UTF-8 bytes alone prove it longer than the context (see `longest_token_bytes`)."""
        if token_bytes and nbytes > capacity * token_bytes:
            raise bad(f"This model's maximum context length is {capacity} tokens. However, the {where} is {nbytes:,} bytes, "
                      f"more than {capacity} tokens can spell (at most {token_bytes} bytes each). Please reduce the length "
                      f"of the {where}.", where, "context_length_exceeded")

    def encode(text: str) -> list[int]:
        check_length(len(check_text(text, "prompt")), "prompt")
        ids = tokenizer(text).input_ids
        if not ids:  # an empty prompt starts from BOS (or EOS), as `wiola generate` does
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            if start is None:
                raise bad("the prompt is empty and the tokenizer has no BOS or EOS token to start from", "prompt")
            ids = [start]
        return ids

    def completion_prompts(prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            return [encode(prompt)]
        if not prompt:
            raise bad("prompt must not be empty", "prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for p in prompt:
            ids = encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise bad("a prompt of token ids must not be empty", "prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise bad(f"token ids must be in [0, {vocab})", "prompt")
            out.append(ids)
        return out

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.stats()}

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "wiola", "max_model_len": capacity}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return model_card()

    def echo_texts(prompts: list[list[int]]) -> list[str]:
        return [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]

    def render(messages: list[dict[str, str]]) -> list[int]:
        check_length(sum(len(m["content"].encode("utf-8")) for m in messages), "messages")
        try:
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        except Exception as exc:  # noqa: BLE001 - template errors (e.g. a role order the template refuses)
            raise bad(f"the chat template cannot render these messages: {exc}", "messages") from None
        return list(prompt)

    def gone() -> Response:
        """The answer to a client that left (nobody reads it; 499 in the access log, as nginx logs it)."""
        return Response(status_code=499)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        check_completion_only(req)
        prompts = await off_loop(completion_prompts, req.prompt)
        max_tokens = req.max_tokens if req.max_tokens is not None else 16
        for p in prompts:
            check_fits(p, max_tokens, "prompt")
        params = sampling_params(req, max_tokens, engine.max_batch_size)
        echoes = await off_loop(echo_texts, prompts) if req.echo else [""] * len(prompts)
        events, seqs = start(prompts, params, req.n)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(i: int, text: str, finish: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                    "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            first = [chunk(i, echoes[i // req.n], None) for i in range(len(seqs)) if echoes[i // req.n]]
            chunks = stream_events(events, seqs, chunk, prompts, req.n, bool((req.stream_options or {}).get("include_usage")),
                                   req.return_token_ids, first)
            return StreamingResponse(sse(chunks, seqs), media_type="text/event-stream")
        collected = await collect(events, seqs, request)
        if collected is None:
            return gone()
        texts, tokens, finish = collected
        choices = []
        for i in range(len(seqs)):
            choice = {"index": i, "text": echoes[i // req.n] + texts[i], "logprobs": None, "finish_reason": finish[i]}
            if req.return_token_ids:
                choice.update(prompt_token_ids=prompts[i // req.n], token_ids=tokens[i])
            choices.append(choice)
        return {"id": rid, "object": "text_completion", "created": now, "model": model_name, "choices": choices,
                "usage": usage(prompts, req.n, sum(map(len, tokens)))}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        check_model(req.model)
        check_chat_only(req)
        messages = chat_messages(req)
        prompt = await off_loop(render, messages)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = check_fits(prompt, requested, "messages")
        params = sampling_params(req, max_tokens, engine.max_batch_size)
        events, seqs = start([prompt], params, req.n)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(i: int, text: str, finish: str | None) -> dict:
            delta = {"content": text} if text else {}
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                    "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            first = [chunk(i, "", None) for i in range(len(seqs))]
            for c in first:
                c["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            chunks = stream_events(events, seqs, chunk, [prompt], req.n, bool((req.stream_options or {}).get("include_usage")),
                                   req.return_token_ids, first)
            return StreamingResponse(sse(chunks, seqs), media_type="text/event-stream")
        collected = await collect(events, seqs, request)
        if collected is None:
            return gone()
        texts, tokens, finish = collected
        choices = []
        for i in range(len(seqs)):
            choice = {"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None, "finish_reason": finish[i]}
            if req.return_token_ids:
                choice.update(prompt_token_ids=prompt, token_ids=tokens[i])
            choices.append(choice)
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_name, "choices": choices,
                "usage": usage([prompt], req.n, sum(map(len, tokens)))}

    return app
