"""Load test and soak of `wiola serve` on loopback: N concurrent clients, requests/s, latency, tokens/s.

Starts `wiola serve MODEL` on a free port (or uses a running server with --url), then for each
concurrency level sends --requests streamed completions from that many clients at once (each client
sends its next request when the last one ends) and prints one row per level: requests/s, p50/p95
latency of a whole request, p50 time to the first token, generated tokens/s, and the mean batch the
engine decoded (from /health). Every request asks for exactly --max-tokens tokens (`ignore_eos`), so
levels compare like for like.

    python benchmarks/serve_load.py --model runs/main-job --concurrency 1,4,8,16 --requests 64 --max-tokens 128

Prompts are windows of --prompt-words words from --corpus (default: a built-in passage).

`--soak SECONDS` runs a bounded soak instead (`serve_soak.py` next to this file): --clients clients send a
seeded mix of streamed and non-streamed completions and chats, clients that disconnect mid-request,
bodies over the size limit (with and without Content-Length) and malformed requests, for that long
after a warm-up; it prints requests/s, p50/p99 latency, the server's RSS after the warm-up and at the
end, and outcomes by kind, and exits 1 unless: no 5xx, RSS growth under 10%, and no request served
after its client left (see serve_soak.py).

    python benchmarks/serve_load.py --model runs/main-job --soak 150 --clients 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time

import httpx

PASSAGE = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows "
           "of outrageous fortune, or to take arms against a sea of troubles and by opposing end them. To die, to sleep, no "
           "more; and by a sleep to say we end the heart-ache and the thousand natural shocks that flesh is heir to.")


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "wiola", "serve", args.model, "--port", "0", "--max-batch-size", str(args.max_batch_size),
           "--max-queue", str(args.max_queue), "--log-level", "warning", "--device", args.device,
           "--max-request-bytes", str(args.max_request_bytes), "--engine", args.engine, "--quantize", args.quantize]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    while True:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit(f"the server did not start: {' '.join(cmd)}")
        print(line.rstrip(), file=sys.stderr)
        if line.startswith("wiola serve:"):
            threading.Thread(target=lambda: [sys.stderr.write(l) for l in proc.stderr], daemon=True).start()
            return proc, line.split(" on ")[1].split()[0]


def prompts(args) -> list[str]:
    words = (open(args.corpus, encoding="utf-8").read() if args.corpus else PASSAGE).split()
    rng = random.Random(0)
    out = []
    for _ in range(args.requests):
        start = rng.randrange(max(1, len(words) - args.prompt_words))
        out.append(" ".join(words[start:start + args.prompt_words]))
    return out


async def one(client: httpx.AsyncClient, url: str, prompt: str, args) -> tuple[float, float, int]:
    body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": args.temperature, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}  # (a chunk per token)
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return time.perf_counter() - start, first or 0.0, tokens


async def level(url: str, concurrency: int, texts: list[str], args) -> dict:
    health = httpx.get(f"{url}/health").json()
    queue: asyncio.Queue = asyncio.Queue()
    for t in texts:
        queue.put_nowait(t)
    results = []
    limits = httpx.Limits(max_connections=concurrency + 4)

    async def worker(client):
        while not queue.empty():
            results.append(await one(client, url, queue.get_nowait(), args))

    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        await one(client, url, texts[0], args)  # warm-up
        health = httpx.get(f"{url}/health").json()
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    after = httpx.get(f"{url}/health").json()
    latency = sorted(r[0] for r in results)
    steps = after["steps"] - health["steps"]
    return {"concurrency": concurrency, "requests": len(results), "seconds": wall, "requests_per_s": len(results) / wall,
            "p50_latency_s": statistics.median(latency), "p95_latency_s": latency[min(len(latency) - 1, int(0.95 * len(latency)))],
            "p50_first_token_s": statistics.median(r[1] for r in results), "tokens_per_s": sum(r[2] for r in results) / wall,
            "mean_batch": (after["batched_rows"] - health["batched_rows"]) / steps if steps else 0.0}


async def check_exact(url: str, texts: list[str], args) -> tuple[int, int]:
    """Greedy tokens of each prompt sent alone, one after another, against all of them sent at once."""
    bodies = [{"prompt": " ".join(t.split()[: 2 + (i * 5) % args.prompt_words]), "temperature": 0, "return_token_ids": True,
               "max_tokens": args.max_tokens - (i * 13) % args.max_tokens} for i, t in enumerate(texts)]  # ragged on purpose
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=len(texts) + 4)) as client:
        alone = [(await client.post(f"{url}/v1/completions", json=b)).json()["choices"][0]["token_ids"] for b in bodies]
        together = await asyncio.gather(*(client.post(f"{url}/v1/completions", json=b) for b in bodies))
    together = [r.json()["choices"][0]["token_ids"] for r in together]
    return sum(a == b for a, b in zip(alone, together)), len(texts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model directory: start `wiola serve` on it")
    p.add_argument("--url", help="a running server instead, e.g. http://127.0.0.1:8000")
    p.add_argument("--concurrency", default="1,8", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=32, help="requests per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=24)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--corpus", help="text file to draw prompts from")
    p.add_argument("--max-batch-size", type=int, default=8, help="(with --model) the server's batch")
    p.add_argument("--max-queue", type=int, default=256, help="(with --model) the server's queue")
    p.add_argument("--device", default="auto", help="(with --model) the server's device")
    p.add_argument("--max-model-len", type=int, help="(with --model) the server's slots per request (default: the model's context)")
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "onnx"], help="(with --model) the server's decode engine")
    p.add_argument("--quantize", default="none", choices=["none", "int8", "int4"], help="(with --model) the server's decode weights")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--check-exact", type=int, default=0, metavar="K",
                   help="first send K prompts one by one, then all K at once (greedy), and count identical token sequences")
    p.add_argument("--soak", type=float, default=0, metavar="SECONDS", help="run the soak (see above) for this long instead")
    p.add_argument("--clients", type=int, default=16, help="(--soak) concurrent clients")
    p.add_argument("--warmup", type=float, default=None,
                   help="(--soak) seconds of the same mix before RSS is first read (default: 10%%, 2-15 s)")
    p.add_argument("--max-request-bytes", type=int, default=2**20, help="the server's body limit (with --model: set; with --url: as set)")
    p.add_argument("--pid", type=int, help="(--soak with --url) the server's process id, to read its RSS")
    p.add_argument("--seed", type=int, default=0, help="(--soak) seed of the mix")
    args = p.parse_args()
    if bool(args.model) == bool(args.url):
        p.error("give --model DIR or --url URL")
    if args.soak:
        from serve_soak import run_soak

        sys.exit(run_soak(args, start_server))
    proc, url = start_server(args) if args.model else (None, args.url.rstrip("/"))
    try:
        texts = prompts(args)
        if args.check_exact:
            same, total = asyncio.run(check_exact(url, (texts * args.check_exact)[: args.check_exact], args))
            print(f"exactness: {same}/{total} requests got the same greedy tokens sent together as sent alone", flush=True)
        rows = [asyncio.run(level(url, int(c), texts, args)) for c in args.concurrency.split(",")]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    print(f"\n{args.requests} requests per level, {args.prompt_words}-word prompts, {args.max_tokens} tokens each, "
          f"temperature {args.temperature}, on {os.uname().nodename} ({os.cpu_count()} CPUs)")
    print("| clients | requests/s | p50 latency | p95 latency | p50 first token | tokens/s | mean batch |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests_per_s']:.2f} | {r['p50_latency_s']:.3f} s | {r['p95_latency_s']:.3f} s | "
              f"{r['p50_first_token_s']:.3f} s | {r['tokens_per_s']:.0f} | {r['mean_batch']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
