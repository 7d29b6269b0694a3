"""A batch-1 generate on the ONNX engine split into its prompt and its steps, for a preset and its LLaMA twin,
beside llama.cpp's prompt and steps on the twin (docs/benchmarks.md, "Prompt and steps apart").

`benchmarks/cpu_engines.py` times whole generates (prompt included). This says where a gap comes from: the
prompt (one any-length step over the prompt), the per-token step, or the components. For each weight type, the
Wiola model and its twin (`llama_baseline`: every component off, the same parameter budget) each get a
`StaticDecoder(engine="onnx")`; the two are timed in turn, round after round, and each keeps its best:
`generate(max_new_tokens=1)` is the prompt (and one pick), `generate(max_new_tokens=N)` the whole; a step is
(whole - prompt) / (N - 1). llama.cpp (when built: `bash scripts/build_llama_cpp.sh`) runs `llama-bench`'s tgN
(steps only) and pgP,N (prompt then steps) on the twin written as GGUF (Q4_0 for int4, Q8_0 for int8, F32 for
fp32), the best repetition of each. Random weights; the CPU model is printed first.

    python benchmarks/decode_split.py --preset wiola-120m --set vocab_size=8192 --threads 2 --quantize int4 int8
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

if "WIOLA_ONNX_CACHE" not in os.environ:  # this run's own ONNX cache, removed at exit (a 120M export is ~1 GB);
    import atexit, shutil  # set WIOLA_ONNX_CACHE to a folder of your own to keep the exports and reuse them
    os.environ["WIOLA_ONNX_CACHE"] = tempfile.mkdtemp(prefix="wiola-bench-onnx-")
    atexit.register(shutil.rmtree, os.environ["WIOLA_ONNX_CACHE"], True)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_engines import cpu_model, twin_vocabulary  # noqa: E402

from wiola.configuration_wiola import WiolaConfig, llama_baseline  # noqa: E402
from wiola.decode.decoder import StaticDecoder  # noqa: E402
from wiola.modeling_wiola import WiolaForCausalLM  # noqa: E402
from wiola.train.config import parse_overrides  # noqa: E402

GGUF_TYPE = {"int4": "q4_0", "int8": "q8_0", "fp32": "f32"}

cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
cli.add_argument("--preset", default="wiola-120m")
cli.add_argument("--set", nargs="+", default=[], help="config overrides, key=value (e.g. vocab_size=8192)")
cli.add_argument("--quantize", nargs="+", default=["int4", "int8"], choices=["fp32", "int8", "int4"])
cli.add_argument("--threads", type=int, default=2)
cli.add_argument("--prompt-len", type=int, default=32)
cli.add_argument("--new-tokens", type=int, default=128)
cli.add_argument("--rounds", type=int, default=3)
cli.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp's rows")
args = cli.parse_args()
torch.set_num_threads(args.threads)
print(f"CPU: {cpu_model()}; {args.threads} threads; torch {torch.__version__}", flush=True)
config = WiolaConfig.from_preset(args.preset, **parse_overrides(args.set))
models = {}
for name, cfg in ((args.preset, config), ("llama twin", llama_baseline(config))):
    torch.manual_seed(0)
    models[name] = WiolaForCausalLM(cfg).eval()
ids = torch.randint(3, config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
N = args.new_tokens
rows = []
with torch.no_grad():
    for quantize in args.quantize:
        decoders = {name: StaticDecoder(m, max_cache_len=args.prompt_len + N, engine="onnx", quantize=None if quantize == "fp32" else quantize)
                    for name, m in models.items()}
        for d in decoders.values():
            d.generate(ids, max_new_tokens=N)  # the export (once per model and weight type), the session's warm-up
        best = {name: [1e9, 1e9] for name in decoders}
        for _ in range(args.rounds):
            for name, d in decoders.items():
                for i, n in enumerate((1, N)):
                    start = time.perf_counter()
                    d.generate(ids, max_new_tokens=n)
                    best[name][i] = min(best[name][i], time.perf_counter() - start)
        for name, (prompt, whole) in best.items():
            rows.append(dict(engine=f"onnx {quantize}", model=name, params=sum(p.numel() for p in models[name].parameters()),
                             prompt_ms=round(prompt * 1000, 1), step_ms=round((whole - prompt) / (N - 1) * 1000, 3),
                             tokens_per_s=round(N / whole, 1)))
            print(json.dumps(rows[-1]), flush=True)
        del decoders
    if not args.no_llama_cpp:
        from transformers import LlamaForCausalLM

        from wiola.bench import llama_twin
        from wiola.export import llama_cpp
        from wiola.export.gguf import write_gguf

        if llama_cpp.find_llama_cpp() is None:
            print(f"llama.cpp: skipped: {llama_cpp.missing_reason()}", flush=True)
        else:
            torch.manual_seed(0)
            llama = LlamaForCausalLM(llama_twin(config)).eval()
            vocab = twin_vocabulary(config.vocab_size)
            with tempfile.TemporaryDirectory() as tmp:
                for quantize in args.quantize:
                    path = Path(tmp) / f"twin-{GGUF_TYPE[quantize]}.gguf"
                    write_gguf(llama, vocab, path, GGUF_TYPE[quantize], "llama twin", None)
                    records = llama_cpp.llama_bench(path, N, args.prompt_len, threads=args.threads, repetitions=args.rounds)
                    steps = 1 / max(next(r for r in records if r["n_prompt"] == 0)["samples_ts"])  # s per new token, tgN
                    whole = (args.prompt_len + N) / max(next(r for r in records if r["n_prompt"] == args.prompt_len)["samples_ts"])
                    rows.append(dict(engine=f"llama.cpp {GGUF_TYPE[quantize]}", model="llama twin", build=llama_cpp.build_version(),
                                     prompt_ms=round((whole - N * steps) * 1000, 1), step_ms=round(steps * 1000, 3),
                                     tokens_per_s=round(N / whole, 1)))
                    print(json.dumps(rows[-1]), flush=True)
                    path.unlink()
