"""Decoding speed of one model on three engines, same shape: PyTorch eager (`StaticDecoder`, what `wiola generate`
runs on CPU), onnxruntime (`wiola export --to onnx` + `wiola.export.onnx_run`) and, for a model that is exactly
LLaMA, CTranslate2 (`wiola export --to llama` + `ct2-transformers-converter`).

Batch-1 (or --batch) greedy decoding of --new-tokens after a --prompt-len prompt; tokens/s = new tokens over all
rows / wall time, prefill included; each engine runs --rounds times, alternating, and keeps its best round.
Every engine's tokens are compared with PyTorch's. A randomly initialised model of --config (a preset, default
llama-nano: the all-off twin of wiola-nano) is used unless --model names a saved one.

    OMP_NUM_THREADS=2 python scripts/bench_export.py --config llama-nano --threads 2 --rounds 5
    OMP_NUM_THREADS=2 python scripts/bench_export.py --config wiola-nano --threads 2 --rounds 5   # no CTranslate2 row
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_model(args, root: Path) -> Path:
    """A saved model folder (with a tokenizer) for --model or --config."""
    if args.model:
        return Path(args.model)
    from wiola import WiolaConfig, WiolaForCausalLM
    from wiola.data.tokenizer import save_tokenizer, train_tokenizer

    overrides = dict(kv.split("=", 1) for kv in args.set)
    overrides = {k: json.loads(v) if v[:1] in "-0123456789[{tn" else v for k, v in overrides.items()}
    config = WiolaConfig.from_preset(args.config, **{"vocab_size": 8192, **overrides})
    torch.manual_seed(0)
    model = WiolaForCausalLM(config).eval()
    folder = root / "model"
    model.save_pretrained(folder)
    text = "".join(chr(c) for c in range(32, 127)) * 4  # a character tokenizer; the vocabulary is padded to vocab_size
    save_tokenizer(train_tokenizer([text], kind="char"), folder)
    return folder


def timed(fn, rounds: int):
    best, out = float("inf"), None
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a saved Wiola model folder (default: a random model of --config)")
    parser.add_argument("--config", default="llama-nano")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides KEY=VALUE")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", help="keep the exports here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from wiola.export import export_model
    from wiola.export.llama import llama_blockers
    from wiola.export.onnx_run import OnnxStepSession, onnx_generate
    from wiola.decode import StaticDecoder
    from wiola.train.checkpoint import load_for_inference

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-export-"))
    root.mkdir(parents=True, exist_ok=True)
    src = make_model(args, root)
    model, _, _ = load_for_inference(src, torch.device("cpu"))
    model.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(model.config.vocab_size, 90), (args.batch, args.prompt_len), generator=g)
    n = args.new_tokens
    engines = {}

    decoder = StaticDecoder(model, max_cache_len=args.prompt_len + n)
    with torch.no_grad():
        engines["pytorch eager (StaticDecoder)"] = lambda: decoder.generate(ids, max_new_tokens=n)[:, args.prompt_len:].numpy()

    if not (root / "onnx").is_dir():
        export_model(src, root / "onnx", "onnx")
    session = OnnxStepSession(root / "onnx", threads=args.threads)
    engines["onnxruntime (wiola export --to onnx)"] = lambda: onnx_generate(session, ids.numpy(), max_new_tokens=n)

    if not llama_blockers(model.config, model.state_dict()):
        try:
            import ctranslate2
            from ctranslate2.converters import TransformersConverter
        except ImportError:
            print("ctranslate2 is not installed: no CTranslate2 row")
        else:
            if not (root / "llama").is_dir():
                export_model(src, root / "llama", "llama")
                TransformersConverter(str(root / "llama")).convert(str(root / "ct2"))
            generator = ctranslate2.Generator(str(root / "ct2"), device="cpu", compute_type="float32", intra_threads=args.threads)
            from transformers import AutoTokenizer

            tokens = AutoTokenizer.from_pretrained(root / "llama").convert_ids_to_tokens
            starts = [tokens(row.tolist()) for row in ids]

            def ct2():
                results = generator.generate_batch(starts, max_length=n, sampling_topk=1, end_token=[], include_prompt_in_result=False)
                return np.array([r.sequences_ids[0] for r in results])

            engines["CTranslate2 fp32 (wiola export --to llama)"] = ct2

    for fn in engines.values():  # warm-up
        fn()
    results = {name: [float("inf"), None] for name in engines}
    for _ in range(args.rounds):  # alternate, so that drift of a shared machine falls on every engine
        for name, fn in engines.items():
            seconds, out = timed(fn, 1)
            results[name] = [min(results[name][0], seconds), out]
    reference = results["pytorch eager (StaticDecoder)"][1]
    rows = []
    print(f"# {args.config if not args.model else args.model}: batch {args.batch}, prompt {args.prompt_len}, {n} new tokens, "
          f"{args.threads} thread(s), best of {args.rounds}; torch {torch.__version__}")
    print("| engine | tokens/s | vs eager | tokens equal to eager |\n|---|---:|---:|---|")
    base = args.batch * n / results["pytorch eager (StaticDecoder)"][0]
    for name, (seconds, out) in results.items():
        rate = args.batch * n / seconds
        same = bool(np.array_equal(out, reference))
        rows.append({"engine": name, "tokens_per_s": rate, "seconds": seconds, "tokens_equal": same})
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {'yes' if same else 'NO'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
