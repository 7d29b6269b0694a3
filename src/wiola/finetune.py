"""Fine-tuning: start from trained weights, train LoRA adapters (PEFT), merge them back.

* `--init-from DIR` (`wiola train`): the model starts from the weights of DIR (a training
  `out/`, one of its `checkpoints/...`, or any saved Wiola/LLaMA-style model directory) with a
  fresh optimizer, schedule and step count. `--resume` instead continues an interrupted run
  of the same `out/` exactly (optimizer, schedule, data position and RNG included).
* `--lora`: the weights of `--init-from` stay frozen and PEFT LoRA adapters are trained on the
  linear layers named by `--lora-targets` (default: every attention and MLP projection the model
  has, `DEFAULT_TARGETS`). Checkpoints of a LoRA run hold the adapter (`adapter_config.json`,
  `adapter_model.safetensors`, which names the base directory), the base model's `config.json`,
  the tokenizer and the trainer state; `--resume` rebuilds the base from `--init-from` and loads
  the adapter and optimizer state.
* `wiola merge RUN OUT`: the base weights plus the merged adapter, saved as a plain model
  directory that loads with `AutoModelForCausalLM.from_pretrained` (and `trust_remote_code=True`).
* A LoRA checkpoint also records its base (`wiola_base.json`: the directory and the sha256 of its
  weight files). An adapter only means something on the weights it was trained on, so loading it
  (`wiola generate`, `eval`, `chat`, `merge`) and `--resume` refuse a base whose weights changed since
  (a base run resumed in place, say), unless `--allow-changed-base` says to go on anyway.
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wiola.errors import WiolaError
from wiola.train import checkpoint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_RECORD = "wiola_base.json"  # {"path": base directory, "weights_sha256": weights_sha256(base)}

# Linear layers that get adapters by default, by the last part of their name (docs/layout.md):
# attention q/k/v/o and the GCLA output gate; SwiGLU gate/up/down, butterfly bypass, DSFF wide
# stream and fusion. LLaMA models have the attention and SwiGLU names. GCLA's context
# projections, GSA's gate MLP and the LM head are left frozen.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "output_gate_proj",
                   "gate_proj", "up_proj", "down_proj", "bypass_proj", "wide_up_proj", "wide_down_proj", "fusion_proj")


def _require_peft():
    try:
        import peft
    except ImportError as exc:
        raise WiolaError("LoRA needs the peft package: pip install 'wiola[finetune]'") from exc
    return peft


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def init_model_dir(path: str | Path) -> Path:
    """The absolute model directory that --init-from DIR names (DIR itself, or a run's final/latest checkpoint)."""
    model_dir = checkpoint.find_model_dir(Path(path).expanduser())
    if is_adapter_dir(model_dir):
        raise WiolaError(f"--init-from {path}: {model_dir} holds a LoRA adapter, not full weights; "
                         f"merge it first (wiola merge {path} MERGED) and start from MERGED")
    return model_dir.resolve()


_HASHES: dict[tuple, str] = {}  # (file names, sizes, mtimes) -> hash: each base is read once per process


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 over the names and contents of the `*.safetensors` files of `model_dir`: the base a LoRA run records."""
    from wiola.data.manifest import file_sha256

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise WiolaError(f"{model_dir}: no *.safetensors weights")
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _HASHES:
        digest = hashlib.sha256()
        for file in files:
            digest.update(f"{file.name}\0{file_sha256(file)}\n".encode())
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def base_record(base_dir: str | Path) -> dict[str, str]:
    return {"path": str(base_dir), "weights_sha256": weights_sha256(base_dir)}


def check_base(adapter_dir: Path, base_dir: str | Path, allow_changed_base: bool = False) -> dict[str, Any] | None:
    """Refuse (one line) a base whose weights differ from the ones the adapter in `adapter_dir` was trained on.

    Returns None when they are the same, or when the adapter predates base records (nothing to check);
    with `allow_changed_base` a changed base gets a warning and {"recorded": ..., "now": ...} back."""
    file = Path(adapter_dir) / BASE_RECORD
    if not file.is_file():
        return None
    try:
        recorded = json.loads(file.read_text())["weights_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise WiolaError(f"{file} is damaged (not a JSON record of the base's weights_sha256)") from None
    now = weights_sha256(base_dir)
    if now == recorded:
        return None
    message = (f"the base model {base_dir} is not the one the LoRA adapter in {adapter_dir} was trained on: its weights changed"
               f" since (sha256 {now[:12]}, recorded {str(recorded)[:12]}), so the adapter would give other outputs")
    if not allow_changed_base:
        raise WiolaError(message + "; restore that base, or pass --allow-changed-base to use it anyway")
    print(f"wiola: warning: {message}; going on (--allow-changed-base)", file=sys.stderr)
    return {"recorded": recorded, "now": now}


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's nn.Linear layers, the LM head excepted."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name.split(".")[-1] != "lm_head"]


def default_targets(model: nn.Module) -> list[str]:
    """The `DEFAULT_TARGETS` that name at least one linear layer of `model`, in that order."""
    present = {name.split(".")[-1] for name in linear_names(model)}
    targets = [t for t in DEFAULT_TARGETS if t in present]
    if not targets:
        raise WiolaError(f"no default LoRA targets in this model; choose from its linear layers with --lora-targets: "
                         f"{', '.join(sorted(present))}")
    return targets


def check_targets(model: nn.Module, targets: list[str]) -> None:
    names = linear_names(model)
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            present = sorted({n.split(".")[-1] for n in names})
            raise WiolaError(f"--lora-targets {target!r} names no linear layer of this model; it has: {', '.join(present)}")


def add_lora(model: nn.Module, cfg: Any, base: dict[str, str] | None = None) -> nn.Module:
    """Wrap `model` (already holding the base weights of cfg.init_from) in a PEFT model with fresh LoRA adapters;
    its checkpoints record `base` (`base_record(cfg.init_from)` unless given)."""
    peft = _require_peft()
    targets = list(cfg.lora_targets) if cfg.lora_targets else default_targets(model)
    check_targets(model, targets)
    model.name_or_path = str(cfg.init_from)  # recorded as base_model_name_or_path in adapter_config.json
    config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                             target_modules=targets, task_type="CAUSAL_LM", base_model_name_or_path=str(cfg.init_from))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapped = peft.get_peft_model(model, config)
    # checkpoints of a LoRA run: the adapter plus the base config (so resume checks and `find_model_dir` work)
    # and the record of the base's weights
    wrapped.wiola_base = base if base is not None else base_record(cfg.init_from)
    wrapped.save_pretrained = types.MethodType(_save_lora_checkpoint, wrapped)
    return wrapped


def _save_lora_checkpoint(self, save_directory, state_dict=None, **kwargs) -> None:
    from peft import PeftModel

    PeftModel.save_pretrained(self, save_directory, state_dict=state_dict, **kwargs)
    self.get_base_model().config.save_pretrained(save_directory)
    (Path(save_directory) / BASE_RECORD).write_text(json.dumps(self.wiola_base, indent=2) + "\n")


def load_adapter(model: nn.Module, ckpt_dir: Path) -> None:
    """Load the adapter weights of LoRA checkpoint `ckpt_dir` into PEFT model `model`; every adapter tensor must fit."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = Path(ckpt_dir) / ADAPTER_WEIGHTS
    if not file.is_file():
        raise WiolaError(f"{ckpt_dir}: no {ADAPTER_WEIGHTS}; this is not a checkpoint of a --lora run")
    result = set_peft_model_state_dict(model, load_file(file))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise WiolaError(f"{ckpt_dir}: adapter does not fit the model (missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]})")


def load_init_weights(model: nn.Module, init_from: str | Path) -> None:
    """Load the weights of --init-from into `model`; every tensor must exist with the same shape."""
    model_dir = init_model_dir(init_from)
    own = model.state_dict()
    theirs = checkpoint.load_weights(model_dir)
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in theirs.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise WiolaError(f"--init-from {init_from}: weights do not fit the model of CONFIG ({len(wrong)} tensor(s) differ in shape, "
                         f"e.g. {wrong[0]}); pass the same directory as CONFIG")
    checkpoint.load_weights_into(model, model_dir)


def starting_model(model: nn.Module, cfg: Any, resume_from: Path | None) -> nn.Module:
    """Give a freshly built `model` its starting weights: the resumed checkpoint's, --init-from's, and/or LoRA adapters."""
    if cfg.lora:
        base = base_record(cfg.init_from)  # hashed before reading, so the record is never newer than the weights
        load_init_weights(model, cfg.init_from)
        model = add_lora(model, cfg, base)
        if resume_from is not None:
            load_adapter(model, resume_from)
    elif resume_from is not None:
        checkpoint.load_weights_into(model, resume_from)
    elif cfg.init_from:
        load_init_weights(model, cfg.init_from)
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------- merge


def find_adapter_dir(path: str | Path) -> Path:
    """The LoRA adapter at `path`: the directory itself, or a run's checkpoints/final or latest."""
    path = Path(path).expanduser()
    if is_adapter_dir(path):
        return path
    for name in ("final", "latest"):
        candidate = checkpoint.resolve(path / "checkpoints" / name)
        if is_adapter_dir(candidate):
            return candidate
    if not path.exists():
        raise FileNotFoundError(f"adapter run not found: {path}")
    raise WiolaError(f"{path} holds no LoRA adapter ({ADAPTER_CONFIG}); is it a `wiola train --lora` run?")


def load_lora_model(path: str | Path, dtype: torch.dtype = torch.float32, allow_changed_base: bool = False):
    """(PEFT model = base weights + adapter, adapter dir) for a LoRA run or adapter directory; a base whose
    weights changed since training is refused (`check_base`) unless `allow_changed_base`."""
    peft = _require_peft()
    from transformers import AutoModelForCausalLM

    import wiola  # noqa: F401  (registers the wiola model type)
    from wiola.compat_wiola import NO_HUB_KERNELS

    adapter_dir = find_adapter_dir(path)
    base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise WiolaError(f"{adapter_dir}: the base model {base!r} named in {ADAPTER_CONFIG} is not a model directory (moved or deleted?)")
    check_base(adapter_dir, base, allow_changed_base)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, **NO_HUB_KERNELS)
    with warnings.catch_warnings():  # peft asks the deprecated `is_gradient_checkpointing` of transformers 5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = peft.PeftModel.from_pretrained(base_model, str(adapter_dir))
    return model.eval(), adapter_dir


def merge(adapter_run: str | Path, out: str | Path, allow_changed_base: bool = False) -> Path:
    """Merge the LoRA adapter of `adapter_run` into its base weights and save a plain model (+ tokenizer) to `out`."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise WiolaError(f"{out} exists and is not empty; choose a new output directory")
    model, adapter_dir = load_lora_model(adapter_run, allow_changed_base=allow_changed_base)
    merged = model.merge_and_unload()
    merged.config._name_or_path = ""
    try:
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    except (OSError, ValueError, TypeError):
        tokenizer = None

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    checkpoint.atomic_write_dir(out, write)
    return out


def merge_command(run: str, out: str, allow_changed_base: bool = False) -> int:
    """Merge a LoRA run's adapter into its base weights, saving a plain model directory.

    The base model is the --init-from directory recorded in the adapter; OUT loads with
    AutoModelForCausalLM.from_pretrained (Wiola models also with trust_remote_code=True), and
    works with wiola eval, generate and chat, or as --init-from of another run. A base whose
    weights changed since the adapter was trained is refused.

    Args:
        run: a `wiola train --lora` output directory, one of its checkpoints, or an adapter directory.
        out: new directory for the merged model.
        allow_changed_base: merge even though the base's weights changed since the adapter was trained
            (the recorded sha256 differs; a warning is printed).
    """
    path = merge(run, out, allow_changed_base=allow_changed_base)
    print(f"merged {find_adapter_dir(run)} into its base model; saved to {path}", file=sys.stderr)
    return 0
