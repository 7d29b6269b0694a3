"""`wiola eval`: loss, perplexity and bits per byte of a checkpoint on a prepared split, and benchmark tasks.

With `--tasks NAME[,NAME]` the checkpoint runs through lm-evaluation-harness (`wiola[eval]`): any lm-eval
task or group (mmlu, gsm8k, hellaswag, ... or a glob), the shipped offline task `wiola_shakespeare`
(`TASKS_DIR`), or YAML tasks in `--include-path` folders; results are saved as JSON beside the checkpoint
(`CHECKPOINT/lm_eval/`). The model is loaded once by wiola (LoRA runs and older layouts included) and handed
to lm-eval's `HFLM`, which gives the numbers `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`
gives (tests/test_eval_tasks.py).

The split is read in consecutive windows of `seq_len + 1` tokens (`wiola.data.loader`);
each window's last `seq_len` tokens are predicted from the ones before them. Bits per byte divide the total negative log-likelihood (in bits) by the UTF-8 length
of the predicted tokens, decoded with the data's tokenizer, so models with different
tokenizers compare on the same text. `evaluate_batches` is shared with the training loop's
validation and splits the batches over ranks when run under torchrun.
"""

from __future__ import annotations

import contextlib
import json as _json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal

import torch

from wiola.errors import WiolaError

TASKS_DIR = Path(__file__).with_name("eval_tasks")  # lm-eval YAML tasks shipped with wiola (wiola_shakespeare)


@torch.no_grad()
def evaluate_batches(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    dist: Any = None,
    tokenizer: Any = None,
    positions: Any = None,
) -> dict[str, float]:
    """Mean next-token loss over `(input_ids, labels)` batches (and the labels' UTF-8 bytes when a tokenizer is given).

    With a multi-process `dist`, rank r evaluates batches r, r+W, ...; every rank runs the
    same number of forward passes (a repeated batch with weight 0 pads the last round, as
    FSDP needs collective forwards) and the sums are all-reduced. `positions(ids)`, when given, returns
    extra forward arguments (the `position_ids` of --document-mask).
    """
    from wiola.train import distributed
    from wiola.train.batches import causal_lm_loss

    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    was_training = model.training
    model.eval()
    all_batches = list(batches)
    if not all_batches:
        raise WiolaError("no evaluation batches (the split is empty or max_batches is 0)")
    rounds = math.ceil(len(all_batches) / world)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    sums = torch.zeros(2, dtype=torch.float64)  # predicted tokens, bytes
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with autocast:
        for r in range(rounds):
            index = r * world + rank
            weight = 1.0 if index < len(all_batches) else 0.0
            ids, labels = (t.to(device) for t in all_batches[min(index, len(all_batches) - 1)])
            output = model(input_ids=ids, use_cache=False, **(positions(ids) if positions is not None else {}))
            count = int((labels != -100).sum())  # chat data: only assistant tokens are scored
            nll += weight * causal_lm_loss(output.logits, labels).double() * count
            sums[0] += weight * count
            if tokenizer is not None and weight:
                sums[1] += sum(len(tokenizer.decode([t for t in row if t >= 0]).encode("utf-8")) for row in labels.tolist())
    model.train(was_training)
    if dist is not None and dist.enabled:
        packed = torch.cat([nll.reshape(1), sums.to(device)])
        distributed.all_reduce_sum(packed, dist)
        nll, sums = packed[0], packed[1:].cpu()
    total_nll, tokens, n_bytes = float(nll), int(sums[0]), int(sums[1])
    loss = total_nll / max(tokens, 1)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}
    if tokenizer is not None:
        result["bytes"] = n_bytes
        result["bits_per_byte"] = total_nll / math.log(2) / max(n_bytes, 1)
    return result


def eval_command(
    checkpoint: str,
    data: Annotated[str | None, "positional"] = None,
    tasks: str | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    include_path: list[str] | None = None,
    output: str | None = None,
    split: str = "val",
    batch_size: int = 8,
    seq_len: int | None = None,
    max_batches: int | None = None,
    device: str = "auto",
    dtype: Literal["fp32", "bf16"] = "fp32",
    json: bool = False,
    allow_tokenizer_mismatch: bool = False,
    f3n_level: str | None = None,
    allow_changed_base: bool = False,
) -> dict[str, float]:
    """Evaluate a model: loss, perplexity and bits per byte on a prepared split (DATA), and/or lm-eval tasks (--tasks).

    Args:
        checkpoint: a model directory (a training `out/`, or one of its checkpoints/...).
        data: directory written by `wiola prepare` (optional with --tasks).
        tasks: comma-separated lm-evaluation-harness tasks or groups (e.g. mmlu, gsm8k, hellaswag; globs work),
            or wiola_shakespeare, the offline task shipped with wiola. Needs `pip install 'wiola[eval]'`.
        num_fewshot: few-shot examples per question for --tasks (default: each task's own setting, usually 0).
        limit: evaluate only this many examples per task (a fraction below 1: that share of them).
        include_path: extra folders of lm-eval YAML tasks for --tasks.
        output: where to save the --tasks results as JSON (default CHECKPOINT/lm_eval/TASKS[_Nshot][_limitN].json).
        split: which split to read.
        batch_size: sequences per forward pass.
        seq_len: tokens per sequence (default the model's max_position_embeddings).
        max_batches: evaluate at most this many batches (default the whole split).
        device: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.
        dtype: fp32, or bf16 autocast.
        json: print one JSON object instead of a table.
        allow_tokenizer_mismatch: evaluate even when the model's tokenizer.json differs from the one the
            data was prepared with (the numbers are then meaningless; a warning is printed).
        f3n_level: F3N models: the granularity to evaluate — one level (`2`), one per layer (`1,2,4,4`), or
            `all` (every level in turn); each result also gives the inference FLOPs per token.
        allow_changed_base: LoRA runs: use the adapter even though its base model's weights changed since it was
            trained (normally refused: the outputs are then not the trained model's; a warning is printed).
    """
    from wiola.data.manifest import file_sha256, verify
    from wiola.train import batches as batch_io
    from wiola.train.checkpoint import load_for_inference
    from wiola.train.distributed import resolve_device

    if dtype not in ("fp32", "bf16"):
        raise WiolaError(f"--dtype must be fp32 or bf16, got {dtype!r}")
    if batch_size <= 0 or (max_batches is not None and max_batches <= 0):
        raise WiolaError("--batch-size and --max-batches must be positive")
    if seq_len is not None and seq_len <= 0:
        raise WiolaError(f"--seq-len must be positive, got {seq_len}")
    if data is None and tasks is None:
        raise WiolaError("give DATA (a prepared data directory: loss, perplexity, bits per byte) and/or --tasks (lm-eval tasks)")
    if data is None and f3n_level is not None:
        raise WiolaError("--f3n-level evaluates on a prepared split: give DATA")
    if tasks is not None:
        split_result = None
        if data is not None:
            split_result = eval_command(checkpoint, data, split=split, batch_size=batch_size, seq_len=seq_len,
                                        max_batches=max_batches, device=device, dtype=dtype, json=json,
                                        allow_tokenizer_mismatch=allow_tokenizer_mismatch, f3n_level=f3n_level,
                                        allow_changed_base=allow_changed_base)
        result = eval_tasks(checkpoint, tasks, num_fewshot=num_fewshot, limit=limit, include_path=include_path,
                            output=output, batch_size=batch_size, device=device, dtype=dtype, json=json,
                            allow_changed_base=allow_changed_base)
        return {**result, "split": split_result} if split_result is not None else result
    dev = resolve_device(device)
    manifest = batch_io.read_manifest(data)
    verify(data, manifest)  # split sizes and the tokenizer's hash, cheaply
    model, _, model_dir = load_for_inference(checkpoint, dev, allow_changed_base=allow_changed_base)
    if model.config.vocab_size < manifest["vocab_size"]:
        raise WiolaError(f"the data's vocabulary ({manifest['vocab_size']}) is larger than the model's ({model.config.vocab_size})")
    context = model.config.max_position_embeddings
    seq_len = seq_len or context
    if seq_len > context:
        raise WiolaError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {context}")
    tok_dir = batch_io.tokenizer_dir(data)
    if tok_dir is None:
        raise WiolaError(f"{data} has no tokenizer/ directory, needed to count bytes")
    model_tok = model_dir / "tokenizer.json"
    if model_tok.is_file() and file_sha256(model_tok) != file_sha256(tok_dir / "tokenizer.json"):
        message = (f"{model_dir} was trained with another tokenizer than the one {data} was prepared with"
                   " (their tokenizer.json differ), so token ids mean different things")
        if not allow_tokenizer_mismatch:
            raise WiolaError(message + "; prepare the data with the model's tokenizer (or pass --allow-tokenizer-mismatch)")
        print(f"wiola eval: warning: {message}; the numbers below are not comparable", file=sys.stderr)
    settings = f3n_settings(model.config, f3n_level)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    batches = list(batch_io.eval_batches(data, split, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches))
    if settings is not None:
        return _eval_f3n_levels(model, settings, batches, dev, torch.bfloat16 if dtype == "bf16" else None, tokenizer,
                                {"checkpoint": str(model_dir), "split": split, "seq_len": seq_len}, json)
    result = evaluate_batches(model, batches, dev, torch.bfloat16 if dtype == "bf16" else None, tokenizer=tokenizer)
    result = {"checkpoint": str(model_dir), "split": split, "seq_len": seq_len, **result}
    if json:
        print(_json.dumps(result))
    else:
        print(f"{model_dir} on {split} ({result['tokens']:,} tokens, {result['bytes']:,} bytes, seq_len {seq_len})")
        print(f"  loss           {result['loss']:.4f}")
        print(f"  perplexity     {result['perplexity']:.3f}")
        print(f"  bits per byte  {result['bits_per_byte']:.4f}")
    return result


def f3n_settings(config: Any, spec: str | None) -> list[list[int]] | None:
    """The per-layer F3N levels `--f3n-level` asks for: `all` (each level 1..G), one level, or one per layer."""
    if spec is None:
        return None
    if getattr(config, "mlp", None) != "f3n":
        raise WiolaError(f"--f3n-level needs an F3N model (mlp=f3n); this one has mlp={getattr(config, 'mlp', None)}")
    n, g = config.num_hidden_layers, config.f3n_levels
    if spec.strip() == "all":
        return [[level] * n for level in range(1, g + 1)]
    try:
        levels = [int(v) for v in spec.split(",")]
    except ValueError:
        raise WiolaError(f"--f3n-level takes 'all', a level, or one level per layer (comma-separated), got {spec!r}") from None
    if len(levels) == 1:
        levels = levels * n
    if len(levels) != n or not all(1 <= v <= g for v in levels):
        raise WiolaError(f"--f3n-level {spec!r}: give 'all', one level in 1..{g}, or {n} comma-separated levels in 1..{g}")
    return [levels]


def _eval_f3n_levels(model, settings, batches, dev, amp_dtype, tokenizer, head: dict, as_json: bool) -> list[dict]:
    from wiola.configuration_wiola import flops_per_token

    layers = [m for m in model.modules() if hasattr(m, "set_level")]
    results = []
    for levels in settings:
        for mlp, level in zip(layers, levels):
            mlp.set_level(level)
        result = evaluate_batches(model, batches, dev, amp_dtype, tokenizer=tokenizer)
        flops = flops_per_token(model.config, context=head["seq_len"], f3n_level=levels)
        results.append({**head, "f3n_level": levels, "flops_per_token": flops, **result})
    if as_json:
        print(_json.dumps(results))
    else:
        print(f"{head['checkpoint']} on {head['split']} (seq_len {head['seq_len']}), F3N widths {model.config.f3n_widths()}")
        print(f"  {'level':<16} {'loss':>8} {'bits/byte':>10} {'MFLOPs/token':>13}")
        for r in results:
            level = str(r["f3n_level"][0]) if len(set(r["f3n_level"])) == 1 else ",".join(map(str, r["f3n_level"]))
            print(f"  {level:<16} {r['loss']:>8.4f} {r['bits_per_byte']:>10.4f} {r['flops_per_token'] / 1e6:>13.2f}")


# ----------------------------------------------------------------------------- lm-evaluation-harness


class _KnownNoise(logging.Filter):
    """Drops lm-eval's warnings about what wiola does on purpose: handing HFLM a loaded model, and a task
    whose data comes from a Python loader (the shipped wiola_shakespeare)."""

    NOISE = ("model kwarg is not of type `str`", "neither marked as CausalLM", "already-initialized model through",
             "Custom kwargs can be passed to `--metadata`")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.NOISE)


@contextlib.contextmanager
def _quiet_git_lookup():
    """lm-eval records the git commit of the working directory by running `git describe` with git's stderr
    left on the terminal, so outside a repository (the usual case) it printed "fatal: not a git repository".
    Within this block it runs the same lookup with only that command's stderr discarded (the recorded
    `git_hash` is unchanged; lm-eval's own warnings and errors still print)."""
    import os
    import subprocess

    import lm_eval.evaluator as evaluator

    original = getattr(evaluator, "get_git_commit_hash", None)
    if original is None:  # another lm-eval layout: leave it alone
        yield
        return

    def quiet_git_commit_hash():
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, FileNotFoundError):  # not a repository, or no git
            try:
                from lm_eval.loggers.utils import get_commit_from_path
            except ImportError:
                return None
            return get_commit_from_path(os.getcwd())

    evaluator.get_git_commit_hash = quiet_git_commit_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise WiolaError("--tasks needs lm-evaluation-harness: pip install 'wiola[eval]'") from None
    return TaskManager


def resolve_tasks(names: list[str], include_path: list[str] | None = None):
    """(task names, lm-eval TaskManager): the shipped and --include-path tasks first, lm-eval's own
    (thousands, slower to index) only when a name needs them; unknown names are a one-line error."""
    TaskManager = _lm_eval()
    paths = [str(TASKS_DIR)]
    for folder in include_path or []:
        if not Path(folder).is_dir():
            raise WiolaError(f"--include-path {folder}: no such directory")
        paths.append(str(Path(folder).resolve()))

    def known(manager, name: str) -> bool:
        return name in manager.all_tasks or Path(name).is_file() or bool(manager.match_tasks([name]))

    manager = TaskManager(include_path=paths, include_defaults=False)
    if not all(known(manager, n) for n in names):
        manager = TaskManager(include_path=paths)
    unknown = [n for n in names if not known(manager, n)]
    if unknown:
        raise WiolaError(f"unknown lm-eval task(s): {', '.join(unknown)} (`lm-eval ls tasks` lists them;"
                         " --include-path adds a folder of YAML tasks)")
    expanded: list[str] = []
    for name in names:
        exact = name in manager.all_tasks or Path(name).is_file()
        expanded += [name] if exact else [m for m in manager.match_tasks([name]) if m not in expanded]
    return expanded, manager


def default_output(model_dir: Path, names: list[str], num_fewshot: int | None, limit: float | None) -> Path:
    stem = re.sub(r"[^\w.+-]+", "-", "+".join(Path(n).stem if n.endswith((".yaml", ".yml")) else n for n in names))[:120]
    shots = "" if num_fewshot is None else f"_{num_fewshot}shot"
    part = "" if limit is None else f"_limit{limit:g}"
    return model_dir / "lm_eval" / f"{stem}{shots}{part}.json"


def eval_tasks(checkpoint: str, tasks: str, *, num_fewshot: int | None = None, limit: float | None = None,
               include_path: list[str] | None = None, output: str | None = None, batch_size: int = 8,
               device: str = "auto", dtype: str = "fp32", json: bool = False,
               allow_changed_base: bool = False) -> dict[str, Any]:
    """Run lm-eval tasks on a checkpoint; save and print the results. Returns lm-eval's results dict (no samples)."""
    from wiola.train.checkpoint import load_for_inference
    from wiola.train.distributed import resolve_device

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise WiolaError("--tasks is empty; give task names separated by commas")
    if num_fewshot is not None and num_fewshot < 0:
        raise WiolaError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    if limit is not None and not (limit > 0 and math.isfinite(limit)):
        raise WiolaError(f"--limit must be positive, got {limit}")
    names, manager = resolve_tasks(names, include_path)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_non_serializable, make_table

    for name in ("lm_eval.models.huggingface", "lm_eval.api.task"):
        if not any(isinstance(f, _KnownNoise) for f in logging.getLogger(name).filters):
            logging.getLogger(name).addFilter(_KnownNoise())
    model, tokenizer, model_dir = load_for_inference(checkpoint, resolve_device(device), allow_changed_base=allow_changed_base)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    limit_arg = int(limit) if limit is not None and limit >= 1 and float(limit).is_integer() else limit
    try:
        with _quiet_git_lookup():
            results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit_arg,
                                              task_manager=manager, log_samples=False)
    except (KeyError, ValueError, FileNotFoundError, ConnectionError) as exc:
        raise WiolaError(f"lm-eval could not run {', '.join(names)}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
                         " (tasks other than wiola_shakespeare download their data from the Hub once)") from None
    results = {k: v for k, v in results.items() if k != "samples"}
    results["wiola"] = {"checkpoint": str(model_dir), "tasks": names, "num_fewshot": num_fewshot, "limit": limit_arg}
    path = Path(output) if output else default_output(model_dir, names, num_fewshot, limit)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    if json:
        print(_json.dumps({"results": results["results"], "saved": str(path)}, default=handle_non_serializable))
    else:
        print(make_table(results))
        if results.get("groups"):
            print(make_table(results, "groups"))
        print(f"results saved to {path}")
    return results
