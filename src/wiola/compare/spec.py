"""The comparison spec: its keys and component tables, `Spec`, `load_spec` and `prepare_data`.

The spec format itself is described in the docstring of the `wiola.compare` package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wiola.errors import MAX_SEED, WiolaError

COMPONENTS = {  # switch -> its LLaMA ("off") value
    "position_encoding": "rope",
    "attention_gate": "none",
    "cross_layer_context": "none",
    "token_merging": "none",
    "mlp": "swiglu",
    "norm": "rmsnorm",
}
BASELINES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "gpt2": "GPT2LMHeadModel"}
KINDS = ("wiola", *BASELINES)
WIDTH_FIELD = {"wiola": "intermediate_size", "llama": "intermediate_size", "mistral": "intermediate_size", "gpt2": "n_inner"}
SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "context", "dropout")
WIOLA_SHAPE_FIELDS = {
    "hidden_size": ("hidden_size",), "num_hidden_layers": ("num_hidden_layers",),
    "num_attention_heads": ("num_attention_heads",), "num_key_value_heads": ("num_key_value_heads",),
    "context": ("max_position_embeddings",), "dropout": ("hidden_dropout", "attention_dropout"),
}
SPEC_KEYS = ("data", "train", "shape", "budget", "ablation_widths", "keep_checkpoints", "seeds", "control", "same_budget_llama",
             "entrants")
DATA_KEYS = ("dir", "source", "tokenizer", "tokenizer_kind", "vocab_size", "val_fraction", "seed", "doc_separator", "column", "num_workers", "split_at")
ENTRANT_KEYS = {"wiola": ("name", "kind", "config", "budget", "ablations", "train")}
ENTRANT_KEYS.update({kind: ("name", "kind", "config", "budget", "train") for kind in BASELINES})
# the training options an entrant may set for itself (its `train:`): the optimizer's numbers, nothing that
# changes the token stream (steps, batch, sequence length and seed stay the comparison's)
ENTRANT_TRAIN_KEYS = ("lr", "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip")
# training options that change speed or bookkeeping but not what is learned: free to differ on resume
RUNTIME_OPTIONS = ("device", "compile", "tensorboard", "log_every", "save_every", "micro_batch_size", "threads")
BUDGET_TOLERANCE = 0.05
# an entrant more than this far from the control's parameter count gets a same-budget LLaMA (`same_budget_llama`),
# and a LLaMA within this much of an entrant's parameter count counts as that entrant's same-budget LLaMA
SAME_BUDGET_TOLERANCE = 0.02


# ---------------------------------------------------------------------------- the spec


@dataclass
class Spec:
    """A parsed comparison spec (see the docstring of the `wiola.compare` package)."""

    path: Path
    data: dict[str, Any]
    train: dict[str, Any]
    shape: dict[str, Any]
    budget: str | int | None
    keep_checkpoints: bool
    ablation_widths: str
    entrants: list[dict[str, Any]]
    seeds: list[int] | None = None  # every entrant once per seed (OUT/seed-S/); None: once, with train.seed
    control: str | None = None  # the entrant the others are tested against over the seeds
    same_budget_llama: bool = False  # generate `llama@NAME` for every Wiola entrant > 2% off the control's size


def _check_keys(what: str, mapping: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    import difflib

    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise WiolaError(f"{what} must be a mapping, got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise WiolaError(f"{what}: unknown key {key!r}{hint}; allowed: {', '.join(allowed)}")
    return dict(mapping)


def load_spec(path: str | Path, shape_overrides: dict[str, Any] | None = None) -> Spec:
    """Read and check a spec file; `shape_overrides` (from `--shape`) replace its shape values."""
    from wiola.train.config import read_config_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"comparison spec not found: {path}")
    raw = _check_keys(str(path), read_config_file(path), SPEC_KEYS)
    shape = _check_keys(f"{path}: shape", {**(raw.get("shape") or {}), **(shape_overrides or {})}, SHAPE_KEYS)
    for key, value in shape.items():
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if key == "dropout" else isinstance(value, int) and value > 0
        if not ok:
            raise WiolaError(f"{path}: shape {key} must be {'a number' if key == 'dropout' else 'a positive integer'}, got {value!r}")
    entrants = raw.get("entrants")
    if not isinstance(entrants, list) or not entrants:
        raise WiolaError(f"{path}: 'entrants' must be a non-empty list")
    if raw.get("ablation_widths", "keep") not in ("keep", "match"):
        raise WiolaError(f"{path}: ablation_widths must be keep or match, got {raw['ablation_widths']!r}")
    budget = raw.get("budget")
    if budget is not None and not isinstance(budget, (str, int)):
        raise WiolaError(f"{path}: budget must be an entrant name or a number of parameters, got {budget!r}")
    control = raw.get("control")
    if control is not None and not isinstance(control, str):
        raise WiolaError(f"{path}: control must be an entrant name, got {control!r}")
    same_budget = raw.get("same_budget_llama", False)
    if not isinstance(same_budget, bool):
        raise WiolaError(f"{path}: same_budget_llama must be true or false, got {same_budget!r}")
    if same_budget and control is None:
        raise WiolaError(f"{path}: same_budget_llama needs a 'control' entrant (the 2% rule compares parameter counts with it)")
    return Spec(
        path=path,
        data=_check_keys(f"{path}: data", raw.get("data"), DATA_KEYS),
        train=_check_keys(f"{path}: train", raw.get("train"), _train_option_names()),
        shape=shape,
        budget=budget,
        keep_checkpoints=bool(raw.get("keep_checkpoints", True)),
        ablation_widths=raw.get("ablation_widths", "keep"),
        entrants=entrants,
        seeds=check_seeds(raw.get("seeds"), f"{path}: seeds"),
        control=control,
        same_budget_llama=same_budget,
    )


def check_seeds(seeds: Any, what: str = "--seeds") -> list[int] | None:
    """None, or a non-empty list of distinct integers in 0 .. 2**32 - 1."""
    if seeds is None:
        return None
    if (not isinstance(seeds, list) or not seeds
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
        raise WiolaError(f"{what} must be a non-empty list of non-negative integers, got {seeds!r}")
    if max(seeds) > MAX_SEED:
        raise WiolaError(f"{what}: a seed must be at most 2**32 - 1 ({MAX_SEED}), got {max(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise WiolaError(f"{what} lists a seed twice: {seeds}")
    return list(seeds)


def _train_option_names() -> tuple[str, ...]:
    from dataclasses import fields

    from wiola.train.config import TrainConfig

    return tuple(f.name for f in fields(TrainConfig))


def prepare_data(spec: Spec, out: Path) -> Path:
    """The prepared data directory of the spec: `data.dir`, prepared from `data.source` when given."""
    data = dict(spec.data)
    target = Path(data.pop("dir", None) or out / "data")
    source = data.pop("source", None)
    if source is None:
        if data:
            raise WiolaError(f"{spec.path}: data options {sorted(data)} need a data 'source' to prepare")
        if not (target / "manifest.json").is_file():
            raise WiolaError(f"{spec.path}: data dir {target} holds no prepared data (manifest.json); give a data 'source'")
        return target
    from wiola.data.prepare import prepare

    source = str(source)
    if source != "shakespeare" and not source.startswith("hf:") and not any(ch in source for ch in "*?[") and not Path(source).exists():
        raise WiolaError(f"{spec.path}: data source {source} not found (relative paths are resolved from {Path.cwd()})")
    prepare(source, target, **data)
    return target
