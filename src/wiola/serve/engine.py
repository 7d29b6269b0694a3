"""The serving engine: a request queue and one worker thread that decodes every running request
together, with continuous (iteration-level) batching on a preallocated `SlotCache`.

Each loop of the worker admits waiting requests while the batch has room (prefilling each prompt alone
on a `WiolaCache`, sampling its first token and placing its state into a free row), then runs one
decode step for the whole batch and samples every row with that request's own parameters. A request
leaves the batch the step it finishes (eos, a stop string, `max_tokens`, or cancelled by its client),
and the next waiting one takes its row: requests join and leave between steps, never waiting for a
whole batch to end.

Greedy rows take the argmax; sampled rows go through `wiola.decode.pick_next` with the request's
own seeded generator, so a seeded request draws the same tokens alone or in a batch. Left-padded rows
compute what they compute alone (positions, means and merged groups count real tokens only), so the
tokens of a request do not depend on what else runs.

This engine keeps its own loop and cache rather than `wiola.decode`'s `StaticDecoder` (which runs one batch
from a common prefill to its end): continuous batching needs rows that join and leave between steps, each with
its own prefill, sampling parameters and stop strings, on a `SlotCache` whose rows are filled one by one. Its
batched decode step runs on the engines `wiola generate` and `wiola chat` choose between, by the same rule
(`wiola.serve.steps`): on CPU, `engine="auto"` runs it on onnxruntime when this model's ONNX export is in the
engine cache and onnxruntime is installed — with the `SlotCache`'s own buffers bound as the graph's state, no
copy per step —, otherwise on torch eager; `engine="torch"`/`"onnx"` and `quantize` as in `wiola generate`.
Prompts are prefilled on the float32 torch model either way. It shares `pick_next`.

Output goes to each sequence's `sink` (any callable; the HTTP layer passes one that hops onto the
asyncio loop) as `Event`s carrying new text (held back while it may still become a stop string or an
incomplete UTF-8 character), the token id and, on the last one, the finish reason.
"""

from __future__ import annotations

import copy
import itertools
import queue
import secrets
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..cache_wiola import WiolaCache
from ..errors import WiolaError
from ..decode import pick_next
from .steps import make_step


class QueueFull(WiolaError):
    """The engine holds `max_batch_size + max_queue` sequences already (HTTP 503)."""


class NeverFits(WiolaError):
    """One request holds more sequences than `max_batch_size + max_queue`: it could never be queued (HTTP 400)."""


class EngineClosed(WiolaError):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


@dataclass
class SamplingParams:
    """Per-request decoding options (validated by the HTTP layer). temperature 0 is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Event:
    """New text of one sequence; `finish` ("stop", "length", "cancelled" or "error") on its last event."""

    text: str
    token: int | None
    finish: str | None = None
    error: str | None = None


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already emitted
    # incremental detokenization: `settled` is the text of tokens[:settled_at] (it ended on a whole
    # character); the text after it is decoded from tokens[context_at:], context_at the previous settled point
    context_at: int = 0
    settled_at: int = 0
    settled: str = ""
    finish: str | None = None
    cancelled: bool = False
    tokens_at_cancel: int = 0  # len(tokens) when the client went away
    start: int = 0  # first plain-layer slot of the row
    generator: torch.Generator | None = None
    counted: bool = False  # holds a batch place in the engine's count (from admission to its last event)

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - len(self.tokens)


class Engine:
    """Continuous batching of a `WiolaForCausalLM` (see the module docstring).

    `max_batch_size` requests decode together on a cache of `capacity` slots per row (default: the
    model's context); up to `max_queue` more wait. `submit` raises `QueueFull` beyond that."""

    def __init__(self, model, tokenizer, max_batch_size: int = 8, max_queue: int = 64, capacity: int | None = None,
                 engine: str = "auto", quantize: str | None = None, note: Callable[[str], None] | None = None):
        if getattr(model.config, "model_type", None) != "wiola":
            raise WiolaError(f"wiola serve needs a Wiola model; this checkpoint is {model.config.model_type!r} "
                             "(a LLaMA model serves with any OpenAI-compatible engine, e.g. vLLM)")
        if max_batch_size < 1 or max_queue < 0:
            raise WiolaError(f"--max-batch-size must be >= 1 and --max-queue >= 0 (got {max_batch_size}, {max_queue})")
        context = model.config.max_position_embeddings
        self.capacity = int(capacity or context)
        if not 2 <= self.capacity <= context:
            raise WiolaError(f"--max-model-len must be in [2, {context}] (the model's context), got {self.capacity}")
        # the worker decodes with its own copy: a fast tokenizer used from two threads can fail ("Already borrowed")
        self.model, self.tokenizer = model.eval(), copy.deepcopy(tokenizer)
        self.device = next(model.parameters()).device
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        eos = {tokenizer.eos_token_id, *_as_list(getattr(model.generation_config, "eos_token_id", None))}
        self.eos_ids = {int(t) for t in eos if t is not None}
        # the decode step's engine by `wiola generate`'s rule (`steps.make_step`); `note` hears its fallbacks
        self.slots, self.decode_step, self.engine_reason = make_step(model, max_batch_size, self.capacity, engine, quantize, note)
        self.position = 0  # mirror of slots.position (the shared write slot)
        self.active: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self._lock = threading.Condition()
        self._n_active = 0
        self._closing = False
        self._paused = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run
        self.batched_rows = 0  # sum of the batch size over the steps
        self.shifts = 0  # rows moved right for a longer prompt, or left to reclaim slots
        self.finished = {"stop": 0, "length": 0, "cancelled": 0, "error": 0}  # sequences ended, by finish reason
        self.tokens_after_cancel = 0  # tokens cancelled sequences got after their client went away (the step in flight)

    @property
    def engine(self) -> str:
        """What runs the decode steps: "onnx" (onnxruntime) or "torch"."""
        return self.decode_step.name

    # ------------------------------------------------------------------ public API (any thread)
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="wiola-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish every submitted sequence, then end the worker (new submissions are refused)."""
        with self._lock:
            self._closing = True
            self._paused = False
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def pause(self) -> None:
        """Hold the worker between steps (sequences stay queued); for tests and maintenance."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._lock.notify_all()

    def stats(self) -> dict:
        with self._lock:
            return {"engine": self.engine, "running": self._n_active, "waiting": len(self.waiting), "max_batch_size": self.max_batch_size,
                    "max_queue": self.max_queue, "steps": self.steps,
                    "batched_rows": self.batched_rows,
                    "mean_batch": round(self.batched_rows / self.steps, 3) if self.steps else 0.0, "shifts": self.shifts,
                    "finished": dict(self.finished), "tokens_after_cancel": self.tokens_after_cancel}

    def submit(self, requests: list[tuple[list[int], SamplingParams, Callable[[Event], None]]]) -> list[Sequence]:
        """Queue sequences (all or none): `(prompt ids, params, sink)` each. Raises `QueueFull`, `NeverFits` or `EngineClosed`."""
        if len(requests) > self.max_batch_size + self.max_queue:
            raise NeverFits(f"this request needs {len(requests)} sequences (prompts × n), more than this server ever holds "
                            f"(--max-batch-size {self.max_batch_size} + --max-queue {self.max_queue}); send fewer prompts "
                            "or a smaller n")
        for prompt, params, _ in requests:
            if not prompt or len(prompt) + params.max_tokens > self.capacity:
                raise WiolaError(f"{len(prompt)} prompt tokens + {params.max_tokens} new tokens do not fit {self.capacity} slots")
        seqs = [Sequence(prompt=list(p), params=params, sink=sink) for p, params, sink in requests]
        for seq in seqs:
            if not seq.params.greedy:
                seq.generator = torch.Generator(device=self.device)
                # (an unseeded request draws a fresh seed; torch.seed() would also reseed the global generator)
                seq.generator.manual_seed(seq.params.seed if seq.params.seed is not None else secrets.randbits(63))
        with self._lock:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            held = self._n_active + len(self.waiting)
            if held + len(seqs) > self.max_batch_size + self.max_queue:
                raise QueueFull(f"the server is at capacity ({held} requests running or queued; --max-batch-size "
                                f"{self.max_batch_size} + --max-queue {self.max_queue}); retry later")
            self.waiting.extend(seqs)
            self._lock.notify_all()
        return seqs

    def cancel(self, seqs: list[Sequence]) -> None:
        """Stop sequences whose client went away (takes effect before the next step)."""
        for seq in seqs:
            if not seq.cancelled:
                seq.tokens_at_cancel = len(seq.tokens)
                seq.cancelled = True

    def generate(self, prompt: list[int], params: SamplingParams, timeout: float | None = None) -> tuple[list[int], str, str]:
        """Blocking convenience: (token ids, text, finish reason) of one sequence."""
        events: queue.Queue = queue.Queue()
        (seq,) = self.submit([(prompt, params, events.put)])
        text = []
        while True:
            event = events.get(timeout=timeout)
            text.append(event.text)
            if event.finish:
                if event.error:
                    raise RuntimeError(event.error)
                break
        return list(seq.tokens), "".join(text), event.finish

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        while True:
            with self._lock:
                while self._paused or (not self.waiting and not self.active and not self._closing):
                    self._lock.wait()
                if self._closing and not self.waiting and not self.active:
                    return
            try:
                self._drop_cancelled()
                self._admit()
                if self.active:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, never the server
                traceback.print_exc(file=sys.stderr)
                self._fail_all(f"{type(exc).__name__}: {exc}")

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self.active))):
            if self.active[i].cancelled:
                self._finish(self.active[i], Event("", None, "cancelled"))
                self._remove(i)

    def _remove(self, row: int) -> None:
        last = len(self.active) - 1
        self.slots.move(last, row)
        self.active[row] = self.active[last]
        self.active.pop()
        if not self.active:
            self.position = 0
            self.slots.set_position(0)

    def _admit(self) -> None:
        while len(self.active) < self.max_batch_size:
            with self._lock:  # only this thread removes from `waiting`; submitters append
                if not self.waiting:
                    return
                seq = self.waiting[0]
            if not seq.cancelled and not self._make_room(len(seq.prompt), seq.params.max_tokens - 1):
                return
            with self._lock:
                self.waiting.popleft()
                seq.counted = True  # running from here on (submit's capacity check)
                self._n_active += 1
            if seq.cancelled:
                self._finish(seq, Event("", None, "cancelled"))
                continue
            try:
                self._prefill(seq)
            except Exception as exc:  # noqa: BLE001 - fails this request only
                traceback.print_exc(file=sys.stderr)
                self._finish(seq, Event("", None, "error", f"{type(exc).__name__}: {exc}"))

    def _make_room(self, n: int, steps: int) -> bool:
        """Can a prompt of n tokens needing `steps` more decode steps join now? Shifts rows if needed."""
        if not self.active:
            return True
        for attempt in range(2):
            target = max(self.position, n)
            if target + steps <= self.capacity and all(target + s.remaining <= self.capacity for s in self.active):
                if target > self.position:
                    self.slots.shift(len(self.active), target - self.position, self.position)
                    self.shifts += 1
                    for s in self.active:
                        s.start += target - self.position
                    self.position = target
                    self.slots.set_position(target)
                return True
            free = min(s.start for s in self.active)  # slots before every running row: reclaim them once
            if attempt or free == 0:
                return False
            self.slots.shift(len(self.active), -free, self.position)
            self.shifts += 1
            for s in self.active:
                s.start -= free
            self.position -= free
            self.slots.set_position(self.position)
        return False

    @torch.no_grad()
    def _prefill(self, seq: Sequence) -> None:
        dynamic = WiolaCache(self.model.config)
        ids = torch.tensor([seq.prompt], dtype=torch.long, device=self.device)
        logits = self.model(input_ids=ids, cache=dynamic, use_cache=True, logits_to_keep=1).logits[:, -1]
        token = self._sample(logits, [seq])[0]
        if self._emit(seq, token):
            return
        n = len(seq.prompt)
        if not self.active:
            self.position = n
            self.slots.set_position(n)
        self.slots.place(len(self.active), dynamic, self.position)
        seq.start = self.position - n
        self.active.append(seq)

    @torch.no_grad()
    def _step(self) -> None:
        batch = len(self.active)
        logits = self.decode_step([s.tokens[-1] for s in self.active])
        self.position += 1
        self.steps += 1
        self.batched_rows += batch
        picked = self._sample(logits, self.active)
        done = [i for i, (seq, token) in enumerate(zip(self.active, picked)) if self._emit(seq, token)]
        for i in reversed(done):
            self._remove(i)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        greedy = logits.argmax(dim=-1).tolist() if any(s.params.greedy for s in seqs) else None
        out = []
        for i, s in enumerate(seqs):
            if s.params.greedy:
                out.append(greedy[i])
            else:
                p = s.params
                out.append(int(pick_next(logits[i:i + 1], True, p.temperature, p.top_k or None, p.top_p, s.generator)[0]))
        return out

    def _text(self, seq: Sequence) -> str:
        """`tokenizer.decode(seq.tokens)`, decoding only the tokens since the last point where the text
        ended on a whole character (and the ones before that point, as context for tokenizers that
        place spaces by their neighbours)."""
        decode, tokens = self.tokenizer.decode, seq.tokens
        before = decode(tokens[seq.context_at:seq.settled_at], skip_special_tokens=True) if seq.settled_at else ""
        tail = decode(tokens[seq.context_at:], skip_special_tokens=True)[len(before):]
        text = seq.settled + tail
        if tail and not tail.endswith("\ufffd"):  # a whole character: settle here
            seq.settled, seq.context_at, seq.settled_at = text, seq.settled_at, len(tokens)
        return text

    def _emit(self, seq: Sequence, token: int) -> bool:
        """Record a new token and send its text; True when the sequence finished."""
        seq.tokens.append(token)
        params = seq.params
        finish = "stop" if token in self.eos_ids and not params.ignore_eos else None
        text = self._text(seq)
        if params.stop:
            hits = [i for i in (text.find(s, max(0, seq.sent - len(s) + 1)) for s in params.stop) if i >= 0]
            if hits:
                text, finish = text[:min(hits)], "stop"
        if finish is None and seq.remaining <= 0:
            finish = "length"
        end = len(text) if finish else len(text) - _held_back(text, params.stop)
        new = text[seq.sent:end] if end > seq.sent else ""
        seq.sent += len(new)
        if finish:
            self._finish(seq, Event(new, token, finish))
            return True
        seq.sink(Event(new, token))
        return False

    def _finish(self, seq: Sequence, event: Event) -> None:
        seq.finish = event.finish
        with self._lock:  # free the place before the client hears of the end (it may send the next request at once)
            if seq.counted:
                seq.counted = False
                self._n_active -= 1
            self.finished[event.finish] = self.finished.get(event.finish, 0) + 1
            if event.finish == "cancelled":
                self.tokens_after_cancel += len(seq.tokens) - seq.tokens_at_cancel
        seq.sink(event)

    def _fail_all(self, message: str) -> None:
        for seq in self.active:
            self._finish(seq, Event("", None, "error", message))
        self.active.clear()
        self.position = 0
        self.slots.set_position(0)


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` not to send yet: a last U+FFFD (the bytes of a character still
    incomplete decode as one; more bytes may complete it), or the start of a stop string."""
    incomplete = text.endswith("\ufffd")
    hold = int(incomplete)
    for stop in stops:
        hold = max(hold, _stop_prefix(text, stop))
        if incomplete:  # it may complete the stop string's next character: hold the prefix before it too
            prefix = _stop_prefix(text[:-1], stop)
            if prefix:
                hold = max(hold, prefix + 1)
    return hold


def _stop_prefix(text: str, stop: str) -> int:
    """Length of the longest proper start of `stop` that `text` ends with (0 when none)."""
    return next((k for k in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:k])), 0)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
