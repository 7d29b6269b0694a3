"""Stage 1 of `scripts/gpu_check.sh` (correctness on CUDA) and the figures of its closing summary.

    python scripts/gpu_check.py correctness --out OUT/correctness.json [--device cuda] [--tiny]
    python scripts/gpu_check.py summary OUT

`correctness` runs these checks in this order (most valuable first; each one is a row of the JSON file,
rewritten after every check so that a run cut off still leaves the rows it finished):

1. `flex fp32`, `flex bf16`: the FlexAttention ATM kernel (`atm_kernel="flex"`, SDPA elsewhere) against
   the eager reference (`atm_kernel="mask"`, `attn_implementation="eager"`) on the same weights, the
   `wiola-120m` shape with merging forced on (τ = −1, μ ≈ 0.5), a left-padded batch; logits on the real
   positions and, on CUDA, the gradients of every parameter. fp32: relative error ≤ 2e-4 (logits) and
   ≤ 1e-3 (gradients). bf16 autocast: both paths are measured against the fp32 reference, and the flex
   path may be at most 2× the eager path's bf16 error (+1e-3 logits, +1e-2 gradients).
2. `decode <preset>`: batch-1 greedy tokens of `StaticDecoder` with the step captured as a CUDA graph
   (`compile=True`: mode "reduce-overhead") equal those of the eager `StaticDecoder`, fp32 weights (bf16
   with random weights flips near-tied argmaxes, which says nothing about the graph), for `wiola-nano`,
   `wiola-120m` (ATM at its τ = 0.92) and `wiola-nano` with ATM forced on (τ = −1: the in-place
   merge of the static cache under graph replay). Two `generate` calls: capture, then replay.
3. `train bf16 <preset>`: one training step's loss and gradients under bf16 autocast against fp32 from
   the same weights and batch: both finite, loss within 1e-2 relative, gradient vector cosine ≥ 0.99
   and relative error ≤ 0.1.

Without CUDA (`--device cpu`, the dry run) the same code runs at toy sizes (`--tiny`); the parts that
need CUDA are SKIP rows that say so — the CUDA-graph comparison (the eager static decode still runs) and
the FlexAttention backward (none on CPU) — never faked. The exit status is 1 if any check FAILed.

`summary OUT` reads the JSON files that `gpu_check.sh` left in OUT (correctness, `wiola bench`) and
prints the headline figures as markdown; it imports neither torch nor wiola.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

# Shapes: the real presets on CUDA; toy versions of the same component mix with --tiny.
TINY = {
    "wiola-nano": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2, intermediate_size=64, vocab_size=256),
    "wiola-120m": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3, intermediate_size=64,
                       dsff_wide_size=128, vocab_size=256),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("correctness", help="stage 1: flex kernel, CUDA-graph decoding, bf16 training step")
    c.add_argument("--out", required=True, help="JSON file for the rows (rewritten after each check)")
    c.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    c.add_argument("--tiny", action="store_true", help="toy sizes (the CPU dry run)")
    c.add_argument("--seq-len", type=int, default=None, help="tokens per row of the flex and training checks (default 1024; tiny 64)")
    c.add_argument("--new-tokens", type=int, default=None, help="tokens decoded in the CUDA-graph checks (default 64; tiny 8)")
    s = sub.add_parser("summary", help="headline figures of a gpu_check.sh run, as markdown")
    s.add_argument("out", help="the folder gpu_check.sh wrote ($OUT)")
    return ap


# ---------------------------------------------------------------------------------------------- checks


class Report:
    """Rows of checks, printed as they finish and rewritten to `path` after each one."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header, self.rows = path, header, []
        self._write()

    def add(self, check: str, status: str, note: str = "", **figures) -> None:
        row = {"check": check, "status": status, "note": note, "figures": figures}
        self.rows.append(row)
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in figures.items())
        print(f"[{status}] {check}" + (f": {shown}" if shown else "") + (f" ({note})" if note else ""), flush=True)
        self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({**self.header, "checks": self.rows}, indent=1))


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _config(preset: str, tiny: bool, **overrides):
    from wiola import WiolaConfig

    shape = TINY[preset] if tiny else {}
    return WiolaConfig.from_preset(preset, **{**shape, **overrides})


def _model(config, device):
    import torch

    from wiola import WiolaForCausalLM

    torch.manual_seed(0)
    return WiolaForCausalLM(config).to(device)


def _ids(vocab: int, batch: int, seq: int, device, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=gen).to(device)


def _rel(a, b) -> float:
    """max |a − b| / max |b| (logits) — a single number that is scale-free."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def _rel_norm(a, b) -> float:
    """‖a − b‖ / ‖b‖ (gradient vectors)."""
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_flex(report: Report, device, tiny: bool, seq: int) -> None:
    """Flex kernel vs eager reference, fp32 then bf16 (two rows)."""
    import torch

    cuda = device.type == "cuda"
    flex = _model(_config("wiola-120m", tiny, atm_kernel="flex", atm_threshold=-1.0, max_position_embeddings=max(seq, 64)), device).eval()
    ref = _model(_config("wiola-120m", tiny, atm_kernel="mask", atm_threshold=-1.0, max_position_embeddings=max(seq, 64)), device).eval()
    ref.load_state_dict(flex.state_dict())
    ref.set_attn_implementation("eager")
    batch = 2
    ids = _ids(flex.config.vocab_size, batch, seq, device)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # a left-padded row: padding never merges and is never seen
    real = mask.bool()
    probe = torch.randn(seq, flex.config.vocab_size, generator=torch.Generator().manual_seed(1)).to(device)
    where = f"wiola-120m shape{' (tiny)' if tiny else ''}, τ=−1, {batch}×{seq}, layers {flex.config.merge_layers}"

    def run(model, bf16: bool):
        """Logits at real positions and (CUDA) the flat gradient of a fixed linear probe of the logits."""
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(cuda), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids, attention_mask=mask).logits.float()
        grads = None
        if cuda:
            (logits * probe * real[..., None]).sum().backward()
            grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
            model.zero_grad(set_to_none=True)
        return logits.detach()[real], grads

    ref32, gref32 = run(ref, False)
    got32, g32 = run(flex, False)
    ratios = getattr(flex.model, "last_merge_ratios", None) or {}
    mu = float(next(iter(ratios.values()))) if ratios else None
    figs = dict(logits_rel=_rel(got32, ref32))
    if g32 is not None:
        figs["grads_rel"] = _rel_norm(g32, gref32)
    if mu is not None:
        figs["mu"] = mu
    ok = figs["logits_rel"] <= 2e-4 and figs.get("grads_rel", 0.0) <= 1e-3 and bool(torch.isfinite(got32).all())
    report.add("flex fp32", "PASS" if ok else "FAIL", where + ("" if cuda else "; backward skipped: FlexAttention has no CPU backward"), **figs)

    got16, g16 = run(flex, True)
    ref16, gref16 = run(ref, True)
    figs = dict(logits_rel_flex=_rel(got16, ref32), logits_rel_eager=_rel(ref16, ref32))
    ok = figs["logits_rel_flex"] <= 2 * figs["logits_rel_eager"] + 1e-3 and bool(torch.isfinite(got16).all())
    if g16 is not None:
        figs.update(grads_rel_flex=_rel_norm(g16, gref32), grads_rel_eager=_rel_norm(gref16, gref32))
        ok = ok and bool(torch.isfinite(g16).all()) and figs["grads_rel_flex"] <= 2 * figs["grads_rel_eager"] + 1e-2
    report.add("flex bf16", "PASS" if ok else "FAIL",
               "errors against the fp32 reference; " + where + ("" if cuda else "; backward skipped: FlexAttention has no CPU backward"), **figs)


def check_decode(report: Report, label: str, config, device, prompt_len: int, new_tokens: int) -> None:
    """CUDA-graph static decoding tokens == eager static decoding tokens (batch 1, greedy, fp32)."""
    from wiola.decode import StaticDecoder

    model = _model(config, device).eval()
    ids = _ids(config.vocab_size, 1, prompt_len, device, seed=2)
    cap = prompt_len + new_tokens
    start = time.perf_counter()
    eager = StaticDecoder(model, max_cache_len=cap).generate(ids, max_new_tokens=new_tokens)[0, prompt_len:].tolist()
    eager_s = time.perf_counter() - start
    if device.type != "cuda":
        report.add(f"decode {label}", "SKIP", f"CUDA graphs need a CUDA device; the eager static decode ran ({len(eager)} tokens)")
        return
    decoder = StaticDecoder(model, max_cache_len=cap, compile=True)
    if not decoder.step.graphs:
        report.add(f"decode {label}", "FAIL", "the compiled step is not in CUDA-graph mode")
        return
    start = time.perf_counter()
    first = decoder.generate(ids, max_new_tokens=new_tokens)[0, prompt_len:].tolist()  # compiles and captures
    capture_s = time.perf_counter() - start
    start = time.perf_counter()
    second = decoder.generate(ids, max_new_tokens=new_tokens)[0, prompt_len:].tolist()  # replays
    replay_s = time.perf_counter() - start
    diverge = next((i for i, (a, b, c) in enumerate(zip(eager, first, second)) if not a == b == c), None)
    ok = first == eager and second == eager
    report.add(f"decode {label}", "PASS" if ok else "FAIL",
               f"fp32, batch 1, {prompt_len}-token prompt" + ("" if ok else f"; first differing token at {diverge}"),
               tokens=len(eager), eager_s=eager_s, capture_s=capture_s, replay_s=replay_s)


def check_train(report: Report, label: str, config, device, seq: int) -> None:
    """One training step, bf16 autocast vs fp32, same weights and batch."""
    import torch

    model = _model(config, device).train()
    ids = _ids(config.vocab_size, 2, seq, device, seed=3)

    def step(bf16: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
        return float(loss.detach()), grads

    loss32, g32 = step(False)
    loss16, g16 = step(True)
    finite = all(map(lambda x: x == x and abs(x) != float("inf"), (loss16, loss32))) and all(bool(torch.isfinite(g).all()) for g in g16.values())
    names = sorted(set(g32) & set(g16))
    a, b = torch.cat([g16[n].flatten() for n in names]), torch.cat([g32[n].flatten() for n in names])
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    per = [float(torch.nn.functional.cosine_similarity(g16[n].flatten(), g32[n].flatten(), dim=0)) for n in names if g32[n].norm() > 0]
    figs = dict(loss_fp32=loss32, loss_bf16=loss16, grad_cos=cos, grad_rel=_rel_norm(a, b), worst_tensor_cos=min(per) if per else float("nan"))
    ok = finite and set(g32) == set(g16) and abs(loss16 - loss32) <= 1e-2 * abs(loss32) and cos >= 0.99 and figs["grad_rel"] <= 0.1
    kernel = "flex" if device.type == "cuda" and config.merge_layers else "mask" if config.merge_layers else "no ATM"
    report.add(f"train bf16 {label}", "PASS" if ok else "FAIL", f"2×{seq}, ATM kernel: {kernel}" + ("" if finite else "; NON-FINITE"), **figs)


def correctness(args) -> int:
    import torch
    import transformers

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check.py: --device cuda but torch.cuda.is_available() is False (use --device cpu --tiny on CPU)", file=sys.stderr)
        return 2
    tiny = args.tiny
    seq = args.seq_len or (64 if tiny else 1024)
    new_tokens = args.new_tokens or (8 if tiny else 64)
    prompt_len = 8 if tiny else 32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = Report(Path(args.out), {"device": name, "torch": torch.__version__, "transformers": transformers.__version__, "tiny": tiny})
    print(f"# correctness on {name}, torch {torch.__version__}, transformers {transformers.__version__}{' (tiny)' if tiny else ''}", flush=True)
    checks = [
        ("flex", lambda: check_flex(report, device, tiny, seq)),
        ("decode wiola-nano", lambda: check_decode(report, "wiola-nano", _config("wiola-nano", tiny), device, prompt_len, new_tokens)),
        ("train bf16 wiola-120m", lambda: check_train(report, "wiola-120m", _config("wiola-120m", tiny, max_position_embeddings=max(seq, 64)), device, seq)),
        ("decode wiola-120m", lambda: check_decode(report, "wiola-120m", _config("wiola-120m", tiny), device, prompt_len, new_tokens)),
        ("train bf16 wiola-nano", lambda: check_train(report, "wiola-nano", _config("wiola-nano", tiny, max_position_embeddings=max(seq, 64)), device, seq)),
        ("decode wiola-nano+ATM τ=−1", lambda: check_decode(report, "wiola-nano+ATM τ=−1", _config("wiola-nano", tiny, token_merging="atm", atm_threshold=-1.0),
                                                            device, prompt_len, new_tokens)),
    ]
    for label, run in checks:
        try:
            run()
        except Exception as exc:  # one broken check must not hide the others
            traceback.print_exc()
            report.add(label, "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    counts = {s: sum(r["status"] == s for r in report.rows) for s in ("PASS", "FAIL", "SKIP")}
    print(f"# correctness: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped", flush=True)
    return 1 if counts["FAIL"] else 0


# --------------------------------------------------------------------------------------------- summary


def _bench_rows(path: Path) -> list[str]:
    """Headline lines of one `wiola bench --out` JSON: training (eager, compiled) and batch-1 decoding."""
    data = json.loads(path.read_text())
    rows = data["rows"]
    config = data.get("config", path.stem)

    def pick(model, what, compiled, batch=None):
        return next((r for r in rows if r["model"] == model and r["what"] == what and r["compiled"] == compiled
                     and (batch is None or r["batch"] == batch)), None)

    lines = []
    for compiled in (False, True):
        w, ll = pick("wiola", "train", compiled), pick("llama", "train", compiled)
        if not (w and ll):
            continue
        mode = "compiled" if compiled else "eager"
        lines.append(f"| {config} | train {mode} tokens/s (batch {w['batch']}×{w['seq_len']}) | {w['tokens_per_s']:,.0f} | {ll['tokens_per_s']:,.0f} | {w['tokens_per_s'] / ll['tokens_per_s']:.2f} |")
        if "mfu" in w and "mfu" in ll:
            lines.append(f"| {config} | train {mode} MFU | {w['mfu']:.1%} | {ll['mfu']:.1%} | {w['mfu'] / ll['mfu']:.2f} |")
        if "peak_gb" in w and "peak_gb" in ll:
            lines.append(f"| {config} | train {mode} peak memory (GB) | {w['peak_gb']:.2f} | {ll['peak_gb']:.2f} | {w['peak_gb'] / ll['peak_gb']:.2f} |")
    fast = pick("wiola", "decode static loop", True, 1) or pick("wiola", "decode static loop", False, 1)
    if fast:
        path_name = "static loop, CUDA graph" if fast["compiled"] else "static loop, eager"
        for label, base in (("llama generate()", pick("llama", "decode generate()", False, 1)),
                            ("llama static loop, CUDA graph", pick("llama", "decode static loop", True, 1))):
            if base:
                lines.append(f"| {config} | decode batch 1 tokens/s: wiola {path_name} vs {label} | {fast['tokens_per_s']:,.0f} | {base['tokens_per_s']:,.0f} | {fast['tokens_per_s'] / base['tokens_per_s']:.2f} |")
    seqs = [r["tokens"] for r in rows if r["model"] == "wiola" and r["what"].startswith("decode") and r.get("tokens")]
    if len(seqs) > 1:
        same = all(s == seqs[0] for s in seqs)
        lines.append(f"| {config} | wiola batch-1 tokens identical across decode paths (bf16 on CUDA, random weights: informative only) | {'yes' if same else 'no'} | | |")
    return lines


def summary(out: Path) -> str:
    parts = []
    corr = out / "correctness.json"
    if corr.is_file():
        data = json.loads(corr.read_text())
        parts.append(f"## Correctness on {data.get('device')} (torch {data.get('torch')}, transformers {data.get('transformers')})\n")
        parts.append("| check | status | figures | note |\n|---|---|---|---|")
        for r in data["checks"]:
            figs = ", ".join(f"{k} {_fmt(v)}" for k, v in r["figures"].items())
            parts.append(f"| {r['check']} | {r['status']} | {figs} | {r['note']} |")
    bench = sorted(out.glob("bench_*.json"))
    lines = []
    for path in bench:
        try:
            lines += _bench_rows(path)
        except (ValueError, KeyError) as exc:
            lines.append(f"| {path.name} | unreadable: {exc} | | | |")
    if lines:
        device = json.loads(bench[0].read_text()).get("device", "?") if bench else "?"
        parts.append(f"\n## wiola bench on {device}: Wiola vs LlamaForCausalLM of the same shape\n")
        parts.append("| config | measurement | wiola | llama | wiola/llama |\n|---|---|---:|---:|---:|")
        parts += lines
    return "\n".join(parts) if parts else "(no correctness or bench results in this folder)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "summary":
        print(summary(Path(args.out)))
        return 0
    return correctness(args)


if __name__ == "__main__":
    sys.exit(main())
