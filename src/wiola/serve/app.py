"""HTTP routes of `wiola serve` (FastAPI): `/v1/completions`, `/v1/chat/completions`, `/v1/models`,
`/health`, in OpenAI's format, with server-sent events for `stream: true`.

Handlers tokenize (the chat template renders conversations), check the request, and hand its
sequences (one per prompt × `n`) to the `Engine`; the engine's worker thread sends each sequence's
events onto the event loop, where they are streamed or collected. A client that disconnects cancels
its sequences. Errors answer with OpenAI's JSON body: 400 for a bad request (unknown parameter
values, a prompt too long for the context), 404 for an unknown model or path, 503 when the queue is
full or the server is shutting down. Shutdown (uvicorn's, on SIGTERM) stops accepting connections,
lets open requests finish, then stops the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import WiolaError
from .engine import Engine, EngineClosed, Event, QueueFull, SamplingParams
from .protocol import (APIError, ChatRequest, CompletionRequest, bad, chat_messages, check_chat_only, check_completion_only,
                       sampling_params)


class _Events:
    """(choice index, Event) pairs of one request's sequences, delivered on the event loop."""

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


def create_app(engine: Engine, tokenizer, model_name: str) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`; its lifespan starts and stops the engine."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)  # every request has been answered by now (uvicorn waits for them)

    app = FastAPI(title="wiola serve", summary="OpenAI-compatible server for a Wiola model", lifespan=lifespan)
    app.state.engine = engine
    capacity = engine.capacity
    vocab = engine.model.config.vocab_size
    created = int(time.time())

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
        except WiolaError as exc:
            raise bad(str(exc)) from None
        return events, seqs

    async def collect(events: _Events, seqs: list) -> tuple[list[str], list[list[int]], list[str]]:
        k = len(seqs)
        texts, tokens, finish = [""] * k, [[] for _ in range(k)], [None] * k
        try:
            while any(f is None for f in finish):
                i, event = await events.queue.get()
                texts[i] += event.text
                if event.token is not None:
                    tokens[i].append(event.token)
                if event.finish:
                    if event.error:
                        raise APIError(500, f"generation failed: {event.error}")
                    finish[i] = event.finish
        finally:
            engine.cancel(seqs)  # (no effect on finished sequences; stops the rest if this handler is cancelled)
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

    def encode(text: str) -> list[int]:
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

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req.model)
        check_completion_only(req)
        prompts = completion_prompts(req.prompt)
        max_tokens = req.max_tokens if req.max_tokens is not None else 16
        for p in prompts:
            check_fits(p, max_tokens, "prompt")
        params = sampling_params(req, max_tokens, engine.max_batch_size)
        echoes = [tokenizer.decode(p, skip_special_tokens=True) if req.echo else "" for p in prompts]
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
        texts, tokens, finish = await collect(events, seqs)
        choices = []
        for i in range(len(seqs)):
            choice = {"index": i, "text": echoes[i // req.n] + texts[i], "logprobs": None, "finish_reason": finish[i]}
            if req.return_token_ids:
                choice.update(prompt_token_ids=prompts[i // req.n], token_ids=tokens[i])
            choices.append(choice)
        return {"id": rid, "object": "text_completion", "created": now, "model": model_name, "choices": choices,
                "usage": usage(prompts, req.n, sum(map(len, tokens)))}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        check_model(req.model)
        check_chat_only(req)
        messages = chat_messages(req)
        try:
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        except Exception as exc:  # noqa: BLE001 - template errors (e.g. a role order the template refuses)
            raise bad(f"the chat template cannot render these messages: {exc}", "messages") from None
        prompt = list(prompt)
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
        texts, tokens, finish = await collect(events, seqs)
        choices = []
        for i in range(len(seqs)):
            choice = {"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None, "finish_reason": finish[i]}
            if req.return_token_ids:
                choice.update(prompt_token_ids=prompt, token_ids=tokens[i])
            choices.append(choice)
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_name, "choices": choices,
                "usage": usage([prompt], req.n, sum(map(len, tokens)))}

    return app
