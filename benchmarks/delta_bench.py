"""Delta Attention figures (docs/delta.md): sparse prefill quality and speed, re-prefill of edited prompts,
assisted decoding.

    OMP_NUM_THREADS=2 python benchmarks/delta_bench.py --checkpoint runs/main-job --data data/shakespeare \
        --draft runs/draft [--sections quality prefill reprefill assisted] [--json out.json]
    python benchmarks/delta_bench.py --tiny          # random tiny models, seconds: proves the script runs

Sections:
- quality: on validation text, per (S, W, λ) and for the uncorrected sinks + window control: KL(sparse ‖ dense)
  of the next-token distributions of a T-token prompt (mean over the positions the sparse pattern changes,
  i.e. ≥ S + W, and at the last position), top-1 agreement there, and greedy agreement over `--gen` tokens
  generated after a `T − gen`-token prompt (share of equal tokens; position of the first difference).
- prefill: seconds per prefill of one T-token prompt (best of `--rounds`), dense vs each setting, T = 1024
  and 2048. The model's limit (max_position_embeddings 1024 for wiola-nano) is raised for T = 2048: its
  RoPE-type positions extend to any length (the weights were trained to 1024: speed only, not quality).
- reprefill: a T-token prompt edited at 10 %, 50 %, 90 %: `wiola.reprefill` from a cache with
  history="full" against a full prefill of the edited prompt; and the cost of recording that history.
- assisted: greedy `generate` of `--new` tokens after a validation prompt, plain vs `assistant_model=draft`
  (constant `--draft-tokens` per round) vs `prompt_lookup_num_tokens`; tokens/s, speed-up, acceptance
  rate (accepted / proposed draft tokens, counted from the target's verification forwards), and whether
  the tokens equal plain greedy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import wiola
from wiola import WiolaCache, WiolaConfig, WiolaForCausalLM

SETTINGS = [(64, 256, 64), (16, 128, 32), (16, 64, 16)]  # (S, W, λ)


def load(path, **overrides) -> WiolaForCausalLM:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return WiolaForCausalLM.from_pretrained(path, dtype=torch.float32, **overrides).eval()


def val_prompts(data: str | None, n: int, length: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    """`n` windows of `length` tokens from the prepared validation split (random tokens without data)."""
    g = np.random.default_rng(seed)
    if data is None:
        return [torch.from_numpy(g.integers(3, vocab, length)).long()[None] for _ in range(n)]
    manifest = json.loads((Path(data) / "manifest.json").read_text())
    tokens = np.memmap(Path(data) / manifest["splits"]["val"]["file"], dtype=manifest["dtype"], mode="r")
    starts = np.linspace(0, len(tokens) - length - 1, n).astype(int)
    return [torch.from_numpy(tokens[s:s + length].astype(np.int64))[None] for s in starts]


def best_time(fn, rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def quality(args, variants) -> list[dict]:
    dense = variants("dense")
    rows = []
    prompts = val_prompts(args.data, args.prompts, args.length, dense.config.vocab_size)
    gen_prompts = [p[:, : args.length - args.gen] for p in prompts]
    dense_logits = [dense(p).logits[0].float() for p in prompts]
    dense_gen = [dense.generate(p, max_new_tokens=args.gen, do_sample=False, min_new_tokens=args.gen)[0, p.shape[1]:] for p in gen_prompts]
    for mode in ("delta", "window"):
        for sink, window, stride in args.settings:
            model = variants(mode, sink, window, stride)
            kl_mean, kl_last, top1, agree, first = [], [], [], [], []
            for p, ref, ref_gen, gp in zip(prompts, dense_logits, dense_gen, gen_prompts):
                logits = model(p).logits[0].float()
                lo = min(sink + window, p.shape[1] - 1)
                kl = F.kl_div(F.log_softmax(ref, -1), F.log_softmax(logits, -1), log_target=True, reduction="none").sum(-1)  # KL(sparse ‖ dense)
                kl_mean.append(float(kl[lo:].mean()))
                kl_last.append(float(kl[-1]))
                top1.append(float((logits[lo:].argmax(-1) == ref[lo:].argmax(-1)).float().mean()))
                out = model.generate(gp, max_new_tokens=args.gen, do_sample=False, min_new_tokens=args.gen)[0, gp.shape[1]:]
                same = out == ref_gen
                agree.append(float(same.float().mean()))
                first.append(int((~same).long().argmax()) if not bool(same.all()) else len(same))
            row = dict(section="quality", mode=mode, S=sink, W=window, stride=stride, T=args.length, prompts=len(prompts),
                       kl_mean=float(np.mean(kl_mean)), kl_last=float(np.mean(kl_last)), top1=float(np.mean(top1)),
                       greedy_agreement=float(np.mean(agree)), first_difference=int(np.min(first)), gen=args.gen)
            print(f"quality {mode:6} S={sink:<3} W={window:<4} λ={stride:<3} KL mean {row['kl_mean']:.4f}  KL last {row['kl_last']:.4f}  "
                  f"top-1 {row['top1']:.3f}  greedy agreement {row['greedy_agreement']:.3f} (first difference at {row['first_difference']})")
            rows.append(row)
    return rows


@torch.no_grad()
def prefill(args, variants) -> list[dict]:
    rows = []
    for length in args.prefill_lengths:
        ids = val_prompts(None, 1, length, variants("dense").config.vocab_size)[0]
        base = None
        for mode, setting in [("dense", (0, 0, 0))] + [(m, s) for m in ("delta", "window") for s in args.settings]:
            model = variants(mode, *setting, limit=length)
            seconds = best_time(lambda: model(ids), args.rounds)
            base = seconds if mode == "dense" else base
            rows.append(dict(section="prefill", T=length, mode=mode, S=setting[0], W=setting[1], stride=setting[2], seconds=seconds, speedup=base / seconds))
            print(f"prefill T={length:<5} {mode:6} S={setting[0]:<3} W={setting[1]:<4} λ={setting[2]:<3} {seconds * 1e3:9.1f} ms  x{base / seconds:.2f}")
    return rows


@torch.no_grad()
def reprefill(args, variants) -> list[dict]:
    model = variants("dense")
    old = val_prompts(args.data, 1, args.length, model.config.vocab_size, seed=1)[0]
    rows = []
    for history in ("none", "full"):
        seconds = best_time(lambda: model(old, cache=WiolaCache(model.config, history=history)), args.rounds)
        rows.append(dict(section="reprefill", what=f"prefill, history={history}", seconds=seconds))
        print(f"reprefill: full prefill of {args.length} tokens, history={history}: {seconds * 1e3:.1f} ms")
    full = rows[0]["seconds"]
    for share in (0.1, 0.5, 0.9):
        at = int(share * args.length)
        new = old.clone()
        new[0, at] = (new[0, at] + 1) % model.config.vocab_size
        cache = WiolaCache(model.config, history="full")
        model(old, cache=cache)
        snapshot = [cache]

        def run():  # each round edits a fresh copy of the cache of the old prompt
            c = WiolaCache(model.config, history="full")
            model(old, cache=c)
            snapshot[0] = c

        def edit():
            wiola.reprefill(model, snapshot[0], old, new)

        times = []
        for _ in range(args.rounds + 1):
            run()
            start = time.perf_counter()
            edit()
            times.append(time.perf_counter() - start)
        seconds = min(times[1:])
        scratch = model(new).logits[0, -1]
        c = WiolaCache(model.config, history="full")
        model(old, cache=c)
        out, _ = wiola.reprefill(model, c, old, new)
        err = float((out.logits[0, -1] - scratch).abs().max())
        rows.append(dict(section="reprefill", what=f"edit at {int(share * 100)}%", seconds=seconds, speedup=full / seconds, max_abs_diff=err))
        print(f"reprefill: edit at {int(share * 100):2d}% ({args.length - at} tokens rerun): {seconds * 1e3:.1f} ms, x{full / seconds:.2f} vs full prefill; "
              f"last logits vs scratch max |diff| {err:.1e}")
    return rows


@torch.no_grad()
def assisted(args, variants, draft) -> list[dict]:
    target = variants("dense")
    prompts = val_prompts(args.data, args.prompts, args.assist_prompt, target.config.vocab_size, seed=2)
    calls: list[int] = []
    hook = target.register_forward_pre_hook(lambda mod, a, kw: calls.append((kw.get("input_ids") if kw.get("input_ids") is not None else a[0]).shape[1]), with_kwargs=True)
    rows = []
    kw = dict(max_new_tokens=args.new, do_sample=False)
    runs = {"plain": {}, "assisted": dict(assistant_model=draft, num_assistant_tokens=args.draft_tokens, num_assistant_tokens_schedule="constant"),
            "prompt lookup": dict(prompt_lookup_num_tokens=args.draft_tokens)}
    reference = {}
    base = None
    for name, extra in runs.items():
        seconds, proposed, accepted, equal, made = 0.0, 0, 0, True, 0
        for i, p in enumerate(prompts):
            target.generate(p, **kw, **extra)  # warm-up
            calls.clear()
            start = time.perf_counter()
            out = target.generate(p, **kw, **extra)
            seconds += time.perf_counter() - start
            new = out[0, p.shape[1]:]
            made += len(new)
            if name == "plain":
                reference[i] = new
            equal &= torch.equal(new, reference[i])
            if name != "plain":  # each verification forward carries candidates + 1 tokens (the first also the prompt)
                cand = [calls[0] - p.shape[1]] + [c - 1 for c in calls[1:]]
                proposed += sum(cand)
                accepted += len(new) - len(calls)
        tps = made / seconds
        base = tps if name == "plain" else base
        rate = accepted / proposed if proposed else None
        rows.append(dict(section="assisted", run=name, tokens_per_s=tps, speedup=tps / base, acceptance=rate, equal_to_greedy=equal,
                         draft_tokens=args.draft_tokens, new=args.new))
        print(f"assisted: {name:13} {tps:8.1f} tok/s  x{tps / base:.2f}  acceptance {'-' if rate is None else f'{rate:.3f}'}  tokens == greedy: {equal}")
    hook.remove()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="target model directory (e.g. runs/main-job)")
    parser.add_argument("--data", help="prepared data directory (validation prompts); random tokens without it")
    parser.add_argument("--draft", help="draft model directory for the assisted section")
    parser.add_argument("--tiny", action="store_true", help="random tiny models and sizes: a few seconds, proves the script runs")
    parser.add_argument("--sections", nargs="+", default=["quality", "prefill", "reprefill", "assisted"])
    parser.add_argument("--length", type=int, default=1024, help="prompt length T for quality and reprefill")
    parser.add_argument("--gen", type=int, default=256, help="greedy tokens generated for the agreement figure")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prefill-lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new", type=int, default=128, help="tokens generated per prompt in the assisted section")
    parser.add_argument("--assist-prompt", type=int, default=128)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    args.settings = SETTINGS
    if args.tiny:
        tiny = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    position_encoding="spiral", attention_gate="gsa", mlp="butterfly", max_position_embeddings=256)
        torch.manual_seed(0)
        root = Path("/tmp") / "wiola-delta-bench-tiny"
        WiolaForCausalLM(WiolaConfig(**tiny)).save_pretrained(root / "target")
        WiolaForCausalLM(WiolaConfig(**dict(tiny, num_hidden_layers=1))).save_pretrained(root / "draft")
        args.checkpoint, args.draft, args.data = root / "target", root / "draft", None
        args.length, args.gen, args.prompts, args.prefill_lengths, args.rounds, args.new, args.assist_prompt = 96, 16, 2, [96, 192], 1, 12, 24
        args.settings = [(4, 16, 8)]
    if args.checkpoint is None:
        parser.error("--checkpoint is required (or --tiny)")

    def variants(mode, sink=0, window=1, stride=1, limit=None):
        overrides = {} if mode == "dense" else dict(prefill_attention=mode, delta_sink=sink, delta_window=window, delta_stride=stride)
        if limit is not None:
            overrides["max_position_embeddings"] = max(limit, WiolaConfig.from_pretrained(args.checkpoint).max_position_embeddings)
        return load(args.checkpoint, **overrides)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, checkpoint {args.checkpoint}")
    rows = []
    if "quality" in args.sections:
        rows += quality(args, variants)
    if "prefill" in args.sections:
        rows += prefill(args, variants)
    if "reprefill" in args.sections:
        rows += reprefill(args, variants)
    if "assisted" in args.sections:
        if args.draft is None:
            parser.error("the assisted section needs --draft")
        rows += assisted(args, variants, load(args.draft))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
