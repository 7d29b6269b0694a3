"""How long `wiola export --to onnx` takes (docs/export.md, "A one-token body"): `to_onnx.export_onnx` on a preset
with random weights, the one-token body traced in a forked child (the default on Linux with two cores or more)
against both traces in this process one after the other (`WIOLA_ONNX_PARALLEL_TRACE=0`), alternated, each
`--rounds` times; prints the CPU, each export's seconds, and whether the two graphs hold the same operators and
the same file size.

    python benchmarks/onnx_export_time.py                       # wiola-nano, vocabulary 8,192
    python benchmarks/onnx_export_time.py --preset wiola-120m --rounds 1
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_engines import cpu_model  # noqa: E402

from wiola.configuration_wiola import WiolaConfig  # noqa: E402
from wiola.export import to_onnx  # noqa: E402
from wiola.export.onnx_branch import bodies  # noqa: E402
from wiola.modeling_wiola import WiolaForCausalLM  # noqa: E402
from wiola.train.config import parse_overrides  # noqa: E402

cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
cli.add_argument("--preset", default="wiola-nano")
cli.add_argument("--set", nargs="+", default=["vocab_size=8192"], help="config overrides, key=value")
cli.add_argument("--rounds", type=int, default=2)
args = cli.parse_args()

import onnx  # noqa: E402

os.environ["WIOLA_ONNX_ONE_TOKEN_BODY"] = "1"
torch.manual_seed(0)
model = WiolaForCausalLM(WiolaConfig.from_preset(args.preset, **parse_overrides(args.set))).eval()
print(f"# wiola export --to onnx, {args.preset} {' '.join(args.set)}, on {cpu_model()}, torch {torch.__version__}", flush=True)
seen = {}
for _ in range(args.rounds):
    for mode, label in (("0", "both traces in this process"), ("1", "one-token trace in a forked child")):
        os.environ[to_onnx.PARALLEL_TRACE_ENV] = mode
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            to_onnx.export_onnx(model, Path(out) / "none", Path(out))
            seconds = time.perf_counter() - start
            graph = onnx.load(str(Path(out) / "model.onnx"), load_external_data=False)
            seen[mode] = ([[n.op_type for n in body.node] for body in bodies(graph)], (Path(out) / "model.onnx").stat().st_size)
        print(f"{label}: {seconds:.1f} s", flush=True)
print("same operators:", seen["0"][0] == seen["1"][0], "| file sizes:", seen["0"][1], seen["1"][1])
