"""CPU decoding engines side by side (docs/benchmarks.md, "CPU decoding engines"): on one shape and one
prompt, greedy tokens/s of

- Wiola's `StaticDecoder`: eager, compiled (inductor, freezing, C++ wrapper), int8 eager (PyTorch's
  kernels), int8 compiled (torchao; skipped without it);
- the default path of `wiola generate` (`StaticDecoder` with its defaults, `engine="auto"`,
  `compile="auto"`, the cache size `wiola generate` picks), as a new `wiola generate` process runs it —
  a fresh decoder per run (weights hashed, onnxruntime session loaded), nothing else carried over:
  "first run" with nothing cached (torch eager, by the rule of `StaticDecoder`), and "default (auto)" after
  the one-off ONNX export that `wiola export --to onnx` or a first `--engine onnx` run makes (timed,
  reported): then auto runs onnxruntime (`wiola.decode.onnx_backend`). The ONNX cache is a temporary folder for the
  script's run (shared by the batches of a shape);
- the ONNX engine of `StaticDecoder` by name (`engine="onnx"`): float32, and int8 / int4 block-wise weights
  (`quantize`, onnxruntime's MatMulNBits, `wiola.export.onnx_quant`; `wiola generate --quantize int8|int4`),
  the state in IO-bound buffers; one decoder per row (session loaded once), its one-off export (and
  quantization) in the untimed warm-up run and reported;
- the same ONNX engine (float32, int8, int4) on the LLaMA twin built as a Wiola model with every component off
  (`llama_baseline`, the same parameter budget; random weights): set against the Wiola rows and llama.cpp's, it splits
  the gap into what the engine costs and what Wiola's components cost in it;
- transformers' `generate()` of the same-shape `LlamaForCausalLM` (`wiola.bench.llama_twin`);
- CTranslate2 fp32 and int8 of that LLaMA twin (converted here; skipped with a message without
  ctranslate2);
- onnxruntime: the Wiola model itself exported with `wiola.export` (`wiola export --to onnx`), run by
  `wiola.export.onnx_run.onnx_generate` (skipped with a message without onnx/onnxruntime): the same
  export as the default path's when that row runs;
- llama.cpp F32, Q8_0 and Q4_0 of the LLaMA twin: the twin written as GGUF by `wiola.export.gguf.write_gguf`
  (what `wiola export --to gguf --gguf-type f32|q8_0|q4_0` writes; a token list of placeholders, since nothing
  is tokenized), timed by `llama-bench -pg PROMPT,NEW` (its prompt-then-generate test, as our rows: its tokens/s
  counts prompt and new tokens, converted here to new tokens / wall seconds). Needs a llama.cpp build
  (`bash scripts/build_llama_cpp.sh`, ~20-50 min once); skipped with that message without one.

    OMP_NUM_THREADS=2 python benchmarks/cpu_engines.py --threads 2 --shapes llama-nano wiola-nano wiola-120m \
        --batch 1 8 --prompt-len 32 --new-tokens 256 --rounds 3 --json cpu_engines.json
    python benchmarks/cpu_engines.py --tiny      # a tiny random shape, seconds: proves the script runs

The CPU model and its vector extensions are printed first (a figure from one CPU does not carry to another).
Weights are random (seed 0; speed does not depend on them); the prompt is random token ids (seed 1).
tokens/s = batch × new tokens / wall seconds, prefill included; best of `--rounds` timed runs after one
untimed warm-up run (which compiles). The compiled rows also give the compile seconds. Every ratio is
against CTranslate2 int8 of the same shape and batch. The script also checks that the fp32 Wiola paths
produced identical tokens and gives the int8 paths' greedy agreement with fp32 eager.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from wiola.bench import llama_twin
from wiola.configuration_wiola import WiolaConfig, llama_baseline
from wiola.decode import StaticDecoder
from wiola.generate import cache_slots
from wiola.quantize import torchao_available
from wiola.train.config import parse_overrides

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=512, max_position_embeddings=128)


def timed(run, rounds: int, warmup: bool = True) -> tuple[float, torch.Tensor]:
    """Best wall seconds of `rounds` runs of `run()` (after one untimed run when `warmup`) and the last output."""
    if warmup:
        run()
    best, out = float("inf"), None
    for _ in range(rounds):
        start = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - start)
    return best, out


def ct2_generator(llama, vocab_size: int, root: Path, compute_type: str, threads: int):
    """Convert the LLaMA twin with CTranslate2's transformers converter (tokens named <tN>) and load it."""
    import ctranslate2

    class Vocabulary:  # the converter reads the token list and special tokens from a tokenizer
        bos_token, eos_token, unk_token = "<t0>", "<t1>", None

        def get_vocab(self):
            return {f"<t{i}>": i for i in range(vocab_size)}

    class Converter(ctranslate2.converters.TransformersConverter):
        def load_tokenizer(self, *args, **kwargs):
            return Vocabulary()

    if not (root / "ct2" / "model.bin").exists():
        llama.save_pretrained(root / "hf")
        Converter(str(root / "hf")).convert(str(root / "ct2"), force=True)
    return ctranslate2.Generator(str(root / "ct2"), device="cpu", compute_type=compute_type, intra_threads=threads, inter_threads=1)


def measure_shape(name: str, config: WiolaConfig, batch: int, prompt_len: int, new_tokens: int, rounds: int, threads: int,
                  engines: list[str]) -> list[dict]:
    from transformers import LlamaForCausalLM

    from wiola.modeling_wiola import WiolaForCausalLM

    torch.manual_seed(0)
    model = WiolaForCausalLM(config).eval()
    ids = torch.randint(3, config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    slots = prompt_len + new_tokens
    rows: list[dict] = []

    def add(engine: str, seconds: float | None, tokens: torch.Tensor | None = None, **extra) -> None:
        row = dict(shape=name, batch=batch, engine=engine, **extra)
        if seconds is not None:
            row.update(seconds=seconds, tokens_per_s=batch * new_tokens / seconds)
        row["tokens"] = None if tokens is None else tokens.tolist()
        rows.append(row)
        shown = f"{row['tokens_per_s']:,.1f} tokens/s" if seconds is not None else extra.get("skipped", "")
        print(f"  {name} batch {batch} {engine}: {shown}", file=sys.stderr, flush=True)

    with torch.no_grad():
        for engine, kw in (("wiola eager", dict(compile=False)), ("wiola compiled", dict(compile=True)),
                           ("wiola int8 eager", dict(compile=False, quantize="int8")),
                           ("wiola int8 compiled", dict(compile=True, quantize="int8"))):
            if engine not in engines:
                continue
            if engine == "wiola int8 compiled" and not torchao_available():
                add(engine, None, skipped="skipped: torchao is not installed (pip install torchao)")
                continue
            torch._dynamo.reset()
            decoder = StaticDecoder(model, max_cache_len=slots, **kw)
            start = time.perf_counter()
            decoder.generate(ids, max_new_tokens=new_tokens)  # warm-up; compiles
            warm = time.perf_counter() - start
            seconds, out = timed(lambda: decoder.generate(ids, max_new_tokens=new_tokens), rounds, warmup=False)
            extra = dict(compile_s=decoder.compile_s, warmup_s=warm) if kw["compile"] else {}
            add(engine, seconds, out[:, prompt_len:], **extra)
            del decoder
        onnx_folder = None
        if "wiola default" in engines:  # what `wiola generate` runs: a fresh decoder per run, its defaults and cache size
            generate_slots = cache_slots(slots, config.max_position_embeddings)

            def fresh_run(**kw):
                decoder = StaticDecoder(model, max_cache_len=generate_slots, **kw)
                return decoder, decoder.generate(ids, max_new_tokens=new_tokens)

            torch._dynamo.reset()
            start = time.perf_counter()
            decoder, out = fresh_run()
            add("wiola generate first run (auto, nothing cached)", time.perf_counter() - start, out[:, prompt_len:], path=decoder.last_path)
            export_s = None
            if decoder.onnx is not None:
                first, _ = fresh_run(engine="onnx")  # the one-off export (when this shape has none yet), then one run
                export_s = first.onnx.export_s if first.onnx is not None else None
                onnx_folder = first.onnx.folder if first.onnx is not None else None
            last = {}

            def steady():
                last["decoder"], out = fresh_run()
                return out

            seconds, out = timed(steady, rounds, warmup=False)
            add("wiola generate default (auto)", seconds, out[:, prompt_len:], path=last["decoder"].last_path, export_s=export_s)
        twin_model = None
        for engine, quantize in (("wiola onnx", None), ("wiola onnx int8", "int8"), ("wiola onnx int4", "int4"),
                                 ("llama twin onnx", None), ("llama twin onnx int8", "int8"), ("llama twin onnx int4", "int4")):
            if engine not in engines:
                continue
            runs = model
            if engine.startswith("llama twin"):  # the same engine on the LLaMA twin: what Wiola's components cost in it
                if twin_model is None:
                    torch.manual_seed(0)
                    twin_model = WiolaForCausalLM(llama_baseline(config)).eval()
                runs = twin_model
            try:
                decoder = StaticDecoder(runs, max_cache_len=slots, engine="onnx", quantize=quantize)
            except Exception as exc:  # int4 without onnxruntime
                add(engine, None, skipped=f"skipped: {exc}")
                continue
            if decoder.onnx is None:
                add(engine, None, skipped="skipped: onnx/onnxruntime are not installed (pip install 'wiola[export]')")
                continue
            start = time.perf_counter()
            decoder.generate(ids, max_new_tokens=new_tokens)  # warm-up: the export (once per shape) and quantization
            warm = time.perf_counter() - start
            seconds, out = timed(lambda: decoder.generate(ids, max_new_tokens=new_tokens), rounds, warmup=False)
            add(engine, seconds, None if runs is not model else out[:, prompt_len:], path=decoder.last_path, warmup_s=warm,
                params=sum(p.numel() for p in runs.parameters()),
                export_s=decoder.onnx.export_s if decoder.onnx is not None else None)
            del decoder
        torch.manual_seed(0)
        llama = LlamaForCausalLM(llama_twin(config)).eval()
        if "hf generate" in engines:
            kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            seconds, out = timed(lambda: llama.generate(ids, attention_mask=torch.ones_like(ids), **kw), rounds)
            add("transformers generate() (llama twin)", seconds)
    for compute_type in ("float32", "int8"):
        engine = f"ctranslate2 {compute_type} (llama twin)"
        if f"ct2 {compute_type}" not in engines:
            continue
        try:
            import ctranslate2  # noqa: F401
        except ImportError:
            add(engine, None, skipped="skipped: ctranslate2 is not installed (pip install ctranslate2)")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            generator = ct2_generator(llama, config.vocab_size, Path(tmp), compute_type, threads)
            prompts = [[f"<t{i}>" for i in row] for row in ids.tolist()]
            kw = dict(max_length=new_tokens, min_length=new_tokens, sampling_topk=1, include_prompt_in_result=False, max_batch_size=batch)
            seconds, _ = timed(lambda: generator.generate_batch(prompts, **kw), rounds)
            add(engine, seconds)
    wanted = [kind for kind in ("f32", "q8_0", "q4_0") if f"llama.cpp {kind}" in engines]
    if wanted:
        if batch != 1:
            for kind in wanted:
                add(f"llama.cpp {kind} (llama twin)", None, skipped="skipped: llama-bench times batch 1 only")
        else:
            llama_cpp_rows(llama, config.vocab_size, prompt_len, new_tokens, rounds, threads, wanted, add)
    if "onnxruntime" in engines:
        try:
            import onnxruntime  # noqa: F401

            from wiola.export.onnx_run import OnnxStepSession, onnx_generate
            from wiola.export.to_onnx import export_onnx
        except ImportError:
            add("onnxruntime", None, skipped="skipped: onnx/onnxruntime are not installed (pip install 'wiola[export]')")
        else:
            with tempfile.TemporaryDirectory() as tmp:  # the Wiola model itself, exported as `wiola export --to onnx` does
                if onnx_folder is None:
                    onnx_folder = Path(tmp) / "onnx"
                    onnx_folder.mkdir()
                    export_onnx(model, Path(tmp), onnx_folder)
                session = OnnxStepSession(onnx_folder, threads=threads)
                seconds, out = timed(lambda: onnx_generate(session, ids.numpy(), max_new_tokens=new_tokens), rounds)
                add("onnxruntime (wiola export --to onnx)", seconds, torch.from_numpy(out))
    return rows


def llama_cpp_rows(llama, vocab_size: int, prompt_len: int, new_tokens: int, rounds: int, threads: int,
                   types: list[str], add) -> None:
    """llama-bench's prompt-then-generate test on the LLaMA twin written as GGUF in each of `types`."""
    from wiola.export import llama_cpp

    if llama_cpp.find_llama_cpp() is None:
        for kind in types:
            add(f"llama.cpp {kind} (llama twin)", None, skipped=f"skipped: {llama_cpp.missing_reason()}")
        return
    from wiola.export.gguf import write_gguf

    vocab = twin_vocabulary(vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in types:
            path = Path(tmp) / f"twin-{kind}.gguf"
            write_gguf(llama, vocab, path, kind, "llama twin", None)
            records = llama_cpp.llama_bench(path, new_tokens, prompt_len, threads=threads, repetitions=rounds)
            record = next(r for r in records if r["n_prompt"] == prompt_len and r["n_gen"] == new_tokens)
            best = max(record["samples_ts"])  # (prompt + new) tokens / s of the fastest repetition, as our best-of-rounds
            add(f"llama.cpp {kind} (llama twin)", (prompt_len + new_tokens) / best, build=llama_cpp.build_version())
            path.unlink()


def twin_vocabulary(vocab_size: int):
    """A GGUF vocabulary of `vocab_size` tokens for the random-weight twin: the byte-level alphabet, then <tN>."""
    from wiola.export.gguf import GgufVocabulary, byte_level_alphabet

    alphabet = list(byte_level_alphabet().values())
    tokens = (alphabet + [f"<t{i}>" for i in range(len(alphabet), vocab_size)])[:vocab_size]
    return GgufVocabulary("bpe", tokens, [1] * len(tokens), [f"{tokens[0]} {tokens[0]}"])


def cpu_model() -> str:
    """The CPU's model name and the vector extensions that matter here, from /proc/cpuinfo (else platform)."""
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile"]
    cores = len({line for line in info.splitlines() if line.startswith("processor")})
    return f"{name} ({cores} logical CPUs; {' '.join(f for f in wanted if f in flags) or 'no AVX2'})"


def llama_cpp_precision(engine: str) -> str:
    """The llama.cpp weight type of the same class as `engine`'s: int4 -> Q4_0, int8 -> Q8_0, else F32."""
    return "q4_0" if "int4" in engine else "q8_0" if "int8" in engine else "f32"


def report(rows: list[dict]) -> str:
    lines = ["| shape | batch | engine | tokens/s | × ctranslate2 int8 | × llama.cpp, same precision | note |",
             "|---|---:|---|---:|---:|---:|---|"]
    for (shape, batch) in dict.fromkeys((r["shape"], r["batch"]) for r in rows):
        group = [r for r in rows if r["shape"] == shape and r["batch"] == batch]
        base = next((r.get("tokens_per_s") for r in group if r["engine"].startswith("ctranslate2 int8")), None)
        fp32 = next((r["tokens"] for r in group if r["engine"] == "wiola eager"), None)
        anchors = {kind: next((r.get("tokens_per_s") for r in group if r["engine"] == f"llama.cpp {kind} (llama twin)"), None)
                   for kind in ("f32", "q8_0", "q4_0")}
        for r in group:
            speed = r.get("tokens_per_s")
            ratio = f"{speed / base:.2f}" if speed and base else ""
            anchor = anchors[llama_cpp_precision(r["engine"])]
            versus = f"{speed / anchor:.2f}" if speed and anchor and not r["engine"].startswith("llama.cpp") else ""
            notes = [r.get("skipped", "")]
            if r.get("compile_s") is not None:
                notes.append(f"compile {r['compile_s']:.0f} s")
            if r.get("export_s") is not None:
                notes.append(f"one-off ONNX export {r['export_s']:.0f} s" if r["export_s"] >= 1 else "one-off ONNX export under 1 s")
            if r.get("path"):
                notes.append(f"ran {r['path']}")
            if r.get("build"):
                notes.append(f"built from {r['build']}")
            if fp32 is not None and r.get("tokens") is not None and r["engine"] != "wiola eager":
                same = sum(a == b for x, y in zip(r["tokens"], fp32) for a, b in zip(x, y)) / sum(len(x) for x in fp32)
                notes.append("tokens = fp32 eager" if same == 1.0 else f"greedy agreement with fp32 eager {same:.1%}")
            lines.append(f"| {shape} | {batch} | {r['engine']} | {f'{speed:,.0f}' if speed else '—'} | {ratio} | {versus} | "
                         f"{'; '.join(n for n in notes if n)} |")
    return "\n".join(lines)


ENGINES = ["wiola eager", "wiola compiled", "wiola int8 eager", "wiola int8 compiled", "wiola default", "wiola onnx",
           "wiola onnx int8", "wiola onnx int4", "llama twin onnx", "llama twin onnx int8", "llama twin onnx int4", "hf generate",
           "ct2 float32", "ct2 int8", "onnxruntime", "llama.cpp f32", "llama.cpp q8_0", "llama.cpp q4_0"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["llama-nano", "wiola-nano", "wiola-120m"], help="Wiola presets")
    p.add_argument("--set", nargs="+", default=[], help="config overrides for every shape, key=value (e.g. vocab_size=8192)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3, help="timed runs per engine (the best is kept)")
    p.add_argument("--threads", type=int, default=None, help="torch and CTranslate2 threads (default: wiola's choice, physical cores)")
    p.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES)
    p.add_argument("--tiny", action="store_true", help="one tiny random shape, 16 new tokens, batch 1 and 2: proves the script runs")
    p.add_argument("--json", default=None, help="write the rows here")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    from wiola.cpu import cpu_threads

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = args.threads or cpu_threads()
    if args.tiny:
        shapes = {"tiny": WiolaConfig(**TINY)}
        args.batch, args.prompt_len, args.new_tokens, args.rounds = [1, 2], 8, 16, 1
    else:
        overrides = parse_overrides(args.set)
        shapes = {name: WiolaConfig.from_preset(name, **overrides) for name in args.shapes}
    print(f"# CPU decoding engines on {cpu_model()}: torch {torch.__version__}, {threads} threads, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy", flush=True)
    rows = []
    previous = os.environ.get("WIOLA_ONNX_CACHE")
    with tempfile.TemporaryDirectory() as onnx_cache:  # the default path's ONNX cache: this run's own
        os.environ["WIOLA_ONNX_CACHE"] = onnx_cache
        try:
            for name, config in shapes.items():
                for batch in args.batch:
                    rows += measure_shape(name, config, batch, args.prompt_len, args.new_tokens, args.rounds, threads, args.engines)
        finally:
            if previous is None:
                os.environ.pop("WIOLA_ONNX_CACHE", None)
            else:
                os.environ["WIOLA_ONNX_CACHE"] = previous
    print(report(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "torch": torch.__version__, "threads": threads, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
