"""Where one decode step's time goes on the ONNX engine (docs/benchmarks.md, "One ONNX step, profiled"):
a preset (default llama-nano), random weights, batch 1, a 32-token prompt then 128 steps, 1 thread, for fp32,
int8 and int4 weights, with and without IO binding: the step's wall time, the time inside onnxruntime's run and
the Python around it; then the graph's node count after onnxruntime's optimizations and onnxruntime's own profile
(kernel time per operator type per step).

    OMP_NUM_THREADS=1 python benchmarks/onnx_step_profile.py
    OMP_NUM_THREADS=1 python benchmarks/onnx_step_profile.py --preset wiola-120m --set vocab_size=8192 --quantize int4

With `--twin`, the same on the preset's LLaMA twin (every Wiola component off, the same parameter budget): run
both to split a step's time into the engine's and the components'.

With `--format-ab`, instead: the decode step on the export (graph format 3: the one-token body under an `If`)
against the same export's any-length body alone (what graph format 2 ran for every step), on one session each,
interleaved, best of 3 rounds of --steps steps, and whether both decode the same tokens.

With `--block-ab` (int8 / int4), instead: the decode step with the weights in today's blocks (`onnx_quant.BLOCK_SIZE`,
128 where K >= 128) against the same float32 export quantized in blocks of 32 everywhere (llama.cpp's Q8_0 / Q4_0
block), timed the same way (the tokens may differ: the weights do).

With `--atm-ab`, instead: the decode step with ATM layers' keys/values updated in place (today) against the
same session with them ping-ponging between two buffers (before), at a cache of `--capacity` slots, timed the same
way, and whether both decode the same tokens.
"""
import argparse, json, os, sys, time, tempfile, collections
import torch
import atexit, shutil
tempfile.tempdir = tempfile.mkdtemp(prefix="wiola-bench-")  # every temporary file of this run, removed at exit (a 120M
atexit.register(shutil.rmtree, tempfile.tempdir, True)  # export and its optimized copy are ~1 GB each)
# the run's own ONNX cache; set WIOLA_ONNX_CACHE to a folder of your own to keep the exports and reuse them
os.environ.setdefault("WIOLA_ONNX_CACHE", tempfile.mkdtemp())
from wiola.configuration_wiola import WiolaConfig
from wiola.modeling_wiola import WiolaForCausalLM
from wiola.decode import onnx_backend
from wiola.decode import pick_next
from wiola.train.config import parse_overrides
cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
cli.add_argument("--preset", default="llama-nano")
cli.add_argument("--set", nargs="+", default=[], help="config overrides, key=value (e.g. vocab_size=8192)")
cli.add_argument("--quantize", nargs="+", default=["fp32", "int8", "int4"], choices=["fp32", "int8", "int4"])
cli.add_argument("--threads", type=int, default=1)
cli.add_argument("--steps", type=int, default=128)
cli.add_argument("--format-ab", action="store_true", help="time the joined graph against its any-length body alone")
cli.add_argument("--block-ab", action="store_true", help="time today's weight blocks against blocks of 32 (int8 / int4)")
cli.add_argument("--atm-ab", action="store_true", help="time ATM keys/values updated in place against ping-pong")
cli.add_argument("--twin", action="store_true", help="profile the preset's LLaMA twin (every component off, the same "
                 "parameter budget: `llama_baseline`) instead of the preset itself")
cli.add_argument("--capacity", type=int, default=None, help="cache slots for --atm-ab (default: prompt + steps)")
args = cli.parse_args()
torch.set_num_threads(args.threads)
config = WiolaConfig.from_preset(args.preset, **parse_overrides(args.set))
if args.twin:
    from wiola.configuration_wiola import llama_baseline
    config = llama_baseline(config)
torch.manual_seed(0)
model = WiolaForCausalLM(config).eval()
ids = torch.randint(3, config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
STEPS = args.steps


def time_pair(folders: dict, quantize, capacity=None, ping_pong=()) -> None:
    """Decode steps on two exported folders, one session each, interleaved, best of 3 rounds; prints one JSON line.
    Runs named in `ping_pong` keep ATM layers' keys/values in two buffers (as before they were updated in place)."""
    from wiola.export.onnx_run import OnnxStepSession
    runs = {name: onnx_backend.OnnxRun(OnnxStepSession(folder, threads=args.threads), 1, capacity or 32 + 4 + 3 * STEPS + 1)
            for name, folder in folders.items()}
    for name in ping_pong:
        runs[name].late = []
    tokens, best = {}, {}
    for name, run in runs.items():
        logits, seq = run.prefill(ids, None), []
        for _ in range(4):
            seq.append(int(pick_next(logits, False)))
            logits = run(torch.tensor([seq[-1]]))
        tokens[name] = seq
    for _ in range(3):
        for name, run in runs.items():
            token, start = torch.tensor([5]), time.perf_counter()
            for _ in range(STEPS):
                run(token)
            best[name] = min(best.get(name, 1e9), (time.perf_counter() - start) / STEPS * 1000)
    before, after = best.values()
    print(json.dumps(dict(quantize=quantize or "fp32", threads=args.threads, **{k + " ms": round(v, 2) for k, v in best.items()},
                          speedup=round(before / after, 3), same_tokens=len(set(map(tuple, tokens.values()))) == 1)), flush=True)


def format_ab(engine, quantize):
    """Decode steps on the joined graph and on its any-length body alone (see the docstring)."""
    import shutil
    import onnx
    from wiola.export.onnx_branch import split
    alone = os.path.join(tempfile.mkdtemp(), "any-length-body")
    shutil.copytree(engine.folder, alone)
    onnx.save_model(split(onnx.load(str(engine.folder / "model.onnx")))[0], os.path.join(alone, "model.onnx"))
    time_pair({"any-length body alone": alone, "joined (one-token body)": engine.folder}, quantize)


def block_ab(engine, quantize):
    """Decode steps with blocks of 32 everywhere and with today's blocks (see the docstring)."""
    from wiola.export import onnx_quant
    if not quantize:
        return
    plain = onnx_backend.OnnxEngine(model)  # the float32 export (cached beside the quantized one)
    small = os.path.join(tempfile.mkdtemp(), "blocks-of-32")
    today, onnx_quant.BLOCK_SIZE = onnx_quant.BLOCK_SIZE, onnx_quant.SMALL_BLOCK
    try:
        onnx_quant.quantize_folder(plain.folder, small, quantize)
    finally:
        onnx_quant.BLOCK_SIZE = today
    time_pair({"blocks of 32": small, f"blocks of {today} (32 where K < {today})": engine.folder}, quantize)


def atm_ab(engine, quantize):
    """Decode steps with ATM keys/values ping-ponging and updated in place (see the docstring)."""
    time_pair({"ATM ping-pong": engine.folder, "ATM in place": engine.folder}, quantize, args.capacity, ping_pong=["ATM ping-pong"])


for quantize in [None if q == "fp32" else q for q in args.quantize]:
    engine = onnx_backend.OnnxEngine(model, quantize)
    engine.export()
    if args.format_ab or args.block_ab or args.atm_ab:
        (format_ab if args.format_ab else block_ab if args.block_ab else atm_ab)(engine, quantize)
        continue
    for bind in (True, False):
        onnx_backend.IO_BINDING = bind
        run = engine.start(1, 32 + STEPS + 1)
        logits = run.prefill(ids, torch.ones_like(ids))
        inner = 0.0
        sess = engine._session.session
        real_run, real_bound = sess.run, sess.run_with_iobinding
        def timed_run(*a, **k):
            global inner
            t = time.perf_counter(); r = real_run(*a, **k); inner += time.perf_counter() - t; return r
        def timed_bound(*a, **k):
            global inner
            t = time.perf_counter(); r = real_bound(*a, **k); inner += time.perf_counter() - t; return r
        sess.run, sess.run_with_iobinding = timed_run, timed_bound
        start = time.perf_counter()
        for _ in range(STEPS):
            token = pick_next(logits, False)
            logits = run(token[:, None])
        total = time.perf_counter() - start
        del sess.run, sess.run_with_iobinding
        print(json.dumps(dict(quantize=quantize or "fp32", io_binding=bind, step_ms=round(total / STEPS * 1000, 3),
                              session_ms=round(inner / STEPS * 1000, 3), python_ms=round((total - inner) / STEPS * 1000, 3))), flush=True)
    # onnxruntime's own profile of the steps: time by operator type
    import onnxruntime as ort
    options = ort.SessionOptions(); options.intra_op_num_threads = args.threads; options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "p")
    meta = json.loads((engine.folder / "wiola_onnx.json").read_text())
    from wiola.export.onnx_run import OnnxStepSession
    optimized = os.path.join(tempfile.mkdtemp(), "optimized.onnx")
    counting = ort.SessionOptions(); counting.intra_op_num_threads = args.threads; counting.optimized_model_filepath = optimized
    counting.log_severity_level = 3  # (a warning that the saved graph is specific to this CPU)
    ort.InferenceSession(str(engine.folder / "model.onnx"), counting, providers=["CPUExecutionProvider"])
    import onnx
    from wiola.export.onnx_branch import bodies
    for body, graph in zip(("any-length body", "one-token body"), bodies(onnx.load(optimized))):
        nodes = collections.Counter(n.op_type for n in graph.node)
        print(quantize or "fp32", body, "nodes after onnxruntime's optimizations:", sum(nodes.values()), dict(nodes.most_common(10)), flush=True)
    s = OnnxStepSession(engine.folder, threads=args.threads); s.session = ort.InferenceSession(str(engine.folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    state = s.empty_state(1, 32 + STEPS + 1)
    out, state = s(ids.numpy(), torch.ones_like(ids).numpy(), state)
    for _ in range(STEPS):
        out, state = s(out[:, -1:].argmax(-1), [[1]], state)
    path = s.session.end_profiling()
    events = json.load(open(path))
    by = collections.Counter()
    runs = 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["args"]["op_name"] != "If":  # (If: its body's total)
            by[e["args"]["op_name"]] += e["dur"]
        if e.get("cat") == "Session" and e["name"] == "model_run":
            runs += 1
    total = sum(by.values())
    print(quantize or "fp32", "ops per step (us):", {k: round(v / runs) for k, v in by.most_common(8)}, "all ops", round(total / runs), flush=True)
