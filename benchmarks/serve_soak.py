"""Bounded soak of `wiola serve` over loopback (`serve_load.py --soak SECONDS`).

--clients clients each send one request after another, drawn from a seeded mix:

| kind | request | expected |
|---|---|---|
| stream, complete, chat, chat_stream | a short completion or chat (`n` 2 sometimes), streamed or not | 200 |
| leave_stream | a long streamed completion; the client leaves after its first chunk | (left) |
| leave_wait | a long non-streamed completion; the client gives up after 0.05-0.3 s | (left), or 200 if it came first |
| oversize | a body over the server's limit, with Content-Length | 413 |
| oversize_chunked | the same streamed in chunks, without Content-Length | 413 |
| malformed | bad JSON, bytes that are not UTF-8, a lone surrogate, `max_tokens: true`, more prompts than the server ever holds, a prompt too long by its bytes | 400 |

A warm-up of the same mix runs first (then the server is left to go idle), so that the RSS read after
it excludes one-time allocations. The soak then runs for SECONDS; clients finish the request in hand,
and the server must be idle again within 10 s. Checks (exit status 1 when one fails):

* **no 5xx**, and every request got its expected answer (`unexpected` counts the others, by kind);
* **RSS growth under 10%** from after the warm-up to the end (`/proc/PID/status`);
* **no request served after its client left**: every sequence the server finished by `stop` or
  `length` (its `/health` `finished` counts) was received by a client that stayed, so a request whose
  client left was cancelled, not decoded to its end; and cancelled sequences got at most 2 tokens each
  after the server noticed (the step in flight, `tokens_after_cancel`).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

NORMAL = ("stream", "complete", "chat", "chat_stream")
MIX = {"stream": 4, "complete": 4, "chat": 2, "chat_stream": 2, "leave_stream": 2, "leave_wait": 2, "oversize": 1,
       "oversize_chunked": 1, "malformed": 2}
WORDS = ("to be or not to be that is the question whether tis nobler in the mind to suffer the slings and arrows of "
         "outrageous fortune or to take arms against a sea of troubles").split()


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)  # (kind, outcome) -> count
    unexpected: Counter = field(default_factory=Counter)
    latency: list = field(default_factory=list)  # seconds, whole requests of the normal kinds
    finishes: Counter = field(default_factory=Counter)  # finish reasons the clients received
    left: int = 0  # requests whose client went away before the answer

    def record(self, kind: str, outcome: str, expected: str) -> None:
        """Count an outcome; `expected` may name several, "left|200"."""
        self.outcomes[(kind, outcome)] += 1
        if outcome not in expected.split("|"):
            self.unexpected[(kind, outcome)] += 1


def rss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


class Soak:
    def __init__(self, url: str, limit: int):
        self.url, self.limit = url, limit
        health = httpx.get(f"{url}/health", timeout=30).json()
        model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]
        self.model, self.capacity = model["id"], model["max_model_len"]
        self.holds = health["max_batch_size"] + health["max_queue"]

    def prompt(self, rng: random.Random) -> str:
        start = rng.randrange(len(WORDS) - 12)
        return " ".join(WORDS[start:start + rng.randint(2, 12)])

    def body(self, kind: str, rng: random.Random) -> dict:
        common = {"model": self.model, "temperature": rng.choice([0, 0.8]), "seed": rng.randrange(1000)}
        if kind.startswith("leave"):  # long enough to be in flight when the client leaves
            return {**common, "prompt": self.prompt(rng), "max_tokens": self.capacity - 64, "ignore_eos": True,
                    "stream": kind == "leave_stream"}
        short = {**common, "max_tokens": rng.randint(4, 48), "stream": kind in ("stream", "chat_stream")}
        if kind.startswith("chat"):
            return {**short, "messages": [{"role": "user", "content": self.prompt(rng)}]}
        return {**short, "prompt": self.prompt(rng), "n": 2 if rng.random() < 0.25 else 1}

    def malformed(self, rng: random.Random) -> tuple[str, bytes]:
        choice = rng.randrange(7)
        if choice == 0:
            return "completions", b'{"prompt": "a", '
        if choice == 1:
            return "completions", b'{"prompt": "a\xff\xfeb"}'
        if choice == 2:
            return "completions", json.dumps({"prompt": "a\udcffb"}).encode()
        if choice == 3:
            return "chat/completions", json.dumps({"messages": [{"role": "user", "content": "x\ud800"}]}).encode()
        if choice == 4:
            return "completions", json.dumps({"prompt": "a", "max_tokens": True}).encode()
        if choice == 5:
            return "completions", json.dumps({"prompt": ["a"] * (self.holds + 1), "max_tokens": 2}).encode()
        return "completions", json.dumps({"prompt": "the king " * min(self.limit // 20, self.capacity * 40)}).encode()

    async def one(self, client: httpx.AsyncClient, kind: str, rng: random.Random, tally: Tally) -> None:
        json_headers = {"content-type": "application/json"}
        if kind == "malformed":
            path, content = self.malformed(rng)
            r = await client.post(f"{self.url}/v1/{path}", content=content, headers=json_headers)
            return tally.record(kind, str(r.status_code), "400")
        if kind == "oversize":
            r = await client.post(f"{self.url}/v1/completions", json={"prompt": "x" * (self.limit + rng.randint(1, 4096))})
            return tally.record(kind, str(r.status_code), "413")
        if kind == "oversize_chunked":
            async def chunks():
                yield b'{"prompt": "'
                for _ in range(self.limit // 16384 + 2):
                    yield b"y" * 16384
                yield b'"}'
            r = await client.post(f"{self.url}/v1/completions", content=chunks(), headers=json_headers)
            return tally.record(kind, str(r.status_code), "413")
        body = self.body(kind, rng)
        path = "chat/completions" if kind.startswith("chat") else "completions"
        start = time.perf_counter()
        if body["stream"]:
            finishes: dict = {}
            async with client.stream("POST", f"{self.url}/v1/{path}", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    return tally.record(kind, str(r.status_code), "left" if kind.startswith("leave") else "200")
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    for choice in json.loads(line[6:]).get("choices", []):
                        if choice.get("finish_reason"):
                            finishes[choice["index"]] = choice["finish_reason"]
                    if kind == "leave_stream":
                        break  # leaving the block closes the connection mid-stream
            tally.finishes.update(finishes.values())
            if kind == "leave_stream":
                tally.left += not finishes
                return tally.record(kind, "left" if not finishes else "200", "left")
        else:
            try:
                r = await client.post(f"{self.url}/v1/{path}", json=body,
                                      timeout=rng.uniform(0.05, 0.3) if kind == "leave_wait" else 120)
            except httpx.TimeoutException:
                if kind != "leave_wait":
                    raise
                tally.left += 1
                return tally.record(kind, "left", "left")
            if r.status_code != 200:
                return tally.record(kind, str(r.status_code), "left|200" if kind == "leave_wait" else "200")
            tally.finishes.update(c["finish_reason"] for c in r.json()["choices"])
            if kind == "leave_wait":  # (the whole answer came before the client gave up)
                return tally.record(kind, "200", "left|200")
        tally.latency.append(time.perf_counter() - start)
        tally.record(kind, "200", "200")

    async def clients(self, n: int, seconds: float, tally: Tally, seed: int) -> float:
        deadline = time.monotonic() + seconds
        kinds, weights = list(MIX), list(MIX.values())

        async def loop(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            async with httpx.AsyncClient(timeout=120) as client:
                while time.monotonic() < deadline:
                    kind = rng.choices(kinds, weights)[0]
                    try:
                        await self.one(client, kind, rng, tally)
                    except httpx.HTTPError as exc:
                        tally.record(kind, type(exc).__name__, "-")

        start = time.perf_counter()
        await asyncio.gather(*(loop(i) for i in range(n)))
        return time.perf_counter() - start

    def idle(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            health = httpx.get(f"{self.url}/health", timeout=30).json()
            if (health["running"] == 0 and health["waiting"] == 0) or time.monotonic() > deadline:
                return health
            time.sleep(0.05)


def run_soak(args, start_server) -> int:
    """The soak of `serve_load.py --soak`; prints the report (and --json) and returns the exit status."""
    proc, url = start_server(args) if args.model else (None, args.url.rstrip("/"))
    pid = proc.pid if proc is not None else args.pid
    try:
        soak = Soak(url, args.max_request_bytes)
        rss_launch = rss_bytes(pid)
        warm = Tally()
        warmup = args.warmup if args.warmup is not None else min(15.0, max(2.0, args.soak / 10))
        asyncio.run(soak.clients(args.clients, warmup, warm, args.seed + 1))
        before = soak.idle(30)
        rss_start = rss_bytes(pid)
        tally = Tally()
        wall = asyncio.run(soak.clients(args.clients, args.soak, tally, args.seed))
        after = soak.idle(10)
        rss_end = rss_bytes(pid)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    served = sum(after["finished"][k] - before["finished"][k] for k in ("stop", "length"))
    cancelled = after["finished"]["cancelled"] - before["finished"]["cancelled"]
    late_tokens = after["tokens_after_cancel"] - before["tokens_after_cancel"]
    received = tally.finishes["stop"] + tally.finishes["length"]
    fivexx = {k: v for t in (warm, tally) for k, v in t.outcomes.items() if k[1].isdigit() and int(k[1]) >= 500}
    latency = sorted(tally.latency)
    requests = sum(tally.outcomes.values())
    report = {
        "seconds": wall, "clients": args.clients, "requests": requests, "requests_per_s": requests / wall,
        "p50_latency_s": statistics.median(latency) if latency else None,
        "p99_latency_s": latency[min(len(latency) - 1, int(0.99 * len(latency)))] if latency else None,
        "rss_launch_mib": rss_launch / 2**20 if rss_launch else None, "rss_start_mib": rss_start / 2**20 if rss_start else None,
        "rss_end_mib": rss_end / 2**20 if rss_end else None,
        "rss_growth": (rss_end - rss_start) / rss_start if rss_start and rss_end else None,
        "outcomes": {f"{k} {o}": v for (k, o), v in sorted(tally.outcomes.items())},
        "unexpected": {f"{k} {o}": v for (k, o), v in sorted((warm.unexpected + tally.unexpected).items())},
        "left": tally.left, "cancelled": cancelled, "tokens_after_cancel": late_tokens,
        "finished_by_server": served, "finishes_received": received, "idle_at_end": after["running"] == 0 and after["waiting"] == 0,
    }
    report["checks"] = {
        "no 5xx": not fivexx,
        "every request got its expected answer": not report["unexpected"],
        "RSS growth under 10%": report["rss_growth"] is None or report["rss_growth"] < 0.10,
        "no request served after its client left": served == received and late_tokens <= 2 * cancelled and report["idle_at_end"],
    }
    report["passed"] = all(report["checks"].values())
    print_report(report, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if report["passed"] else 1


def print_report(r: dict, args) -> None:
    mib = lambda v: f"{v:,.0f} MiB" if v is not None else "n/a"  # noqa: E731
    print(f"\nsoak: {r['clients']} clients, {r['seconds']:.0f} s (after a warm-up), limit {args.max_request_bytes:,} bytes")
    print(f"{r['requests']} requests, {r['requests_per_s']:.1f} requests/s; p50 {r['p50_latency_s'] or 0:.3f} s, "
          f"p99 {r['p99_latency_s'] or 0:.3f} s (whole requests of the normal kinds)")
    growth = f"{100 * r['rss_growth']:+.1f}%" if r["rss_growth"] is not None else "n/a"
    print(f"server RSS: {mib(r['rss_launch_mib'])} at launch, {mib(r['rss_start_mib'])} after the warm-up, "
          f"{mib(r['rss_end_mib'])} at the end ({growth})")
    print(f"clients that left: {r['left']}; sequences cancelled: {r['cancelled']} (tokens after cancel: "
          f"{r['tokens_after_cancel']}); finished by the server: {r['finished_by_server']}, received: {r['finishes_received']}")
    print("outcomes: " + ", ".join(f"{k}: {v}" for k, v in r["outcomes"].items()))
    if r["unexpected"]:
        print("UNEXPECTED: " + ", ".join(f"{k}: {v}" for k, v in r["unexpected"].items()))
    for name, ok in r["checks"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
