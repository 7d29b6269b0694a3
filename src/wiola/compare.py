"""`wiola compare`: train several models on the same token stream and report them side by side.

Every entrant is trained one after another by the trainer's `train()` with the same data
directory, steps, batch, sequence length, optimizer, schedule and seed. A comparison is a spec
file (YAML or JSON; see `configs/compare/`):

    data:     `dir`, a `wiola prepare` directory, and/or `source` plus prepare options
              (`tokenizer_kind`, `vocab_size`, `val_fraction`, `seed`, `tokenizer`, `doc_separator`,
              `column`, `num_workers`); a source is prepared into `dir` (default OUT/data).
    train:    training options shared by every entrant (the option names of `wiola train`).
    shape:    `hidden_size`, `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`
              (default: `num_attention_heads`), `context`, `dropout`: applied to every entrant.
              The vocabulary and special-token ids always come from the data.
    budget:   default parameter budget of the baselines: an entrant name or a number
              (default: the first `wiola` entrant).
    ablation_widths: `keep` (default: an ablation keeps every width of its base, except that a
              switched MLP is re-matched to the base's parameter count) or `match` (every ablation's
              MLP width is re-matched to the base's parameter count).
    keep_checkpoints: false deletes an entrant's checkpoints/ once it is finished (default true).
    entrants: a list of mappings with a `name` and a `kind`:
      wiola   `config`: a preset name, a config file, or a mapping of WiolaConfig fields (may name
              a `preset`; a preset's MLP widths keep their ratio to hidden_size under `shape`).
              `budget` (optional): match the MLP width (`intermediate_size`) to that budget.
              `ablations`: `all` (each novel component switched off, one at a time) or a list of
              `component` (switch it off) and `component=value` (switch it to value, e.g. on).
              An ablation is named `BASE:component=value` (see `ablation_widths` for its widths).
      llama | mistral | gpt2
              `LlamaForCausalLM`, `MistralForCausalLM` (sliding window = context // 2 unless set)
              or `GPT2LMHeadModel` of the budget entrant's shape (d, L, H, H_kv, context, dropout;
              embeddings tied as in Wiola), MLP width (`intermediate_size`, GPT-2 `n_inner`)
              matched to the budget (a multiple of 8). `config` (optional): extra config fields.

Output in OUT: `runs/NAME/` (one `wiola train` output directory per entrant, with `entrant.json`
and, once finished, `result.json`), `configs/NAME.json` (the model config handed to the trainer),
`results.json`, `results.md` and `val_loss.png`, rewritten after every entrant. A second run
of the same command resumes: finished entrants are skipped, a partial run continues from its
`checkpoints/latest`. A changed setting or entrant config is refused rather than mixed in.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from wiola.errors import WiolaError

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
SPEC_KEYS = ("data", "train", "shape", "budget", "ablation_widths", "keep_checkpoints", "entrants")
DATA_KEYS = ("dir", "source", "tokenizer", "tokenizer_kind", "vocab_size", "val_fraction", "seed", "doc_separator", "column", "num_workers", "split_at")
ENTRANT_KEYS = {"wiola": ("name", "kind", "config", "budget", "ablations")}
ENTRANT_KEYS.update({kind: ("name", "kind", "config", "budget") for kind in BASELINES})
# training options that change speed or bookkeeping but not what is learned: free to differ on resume
RUNTIME_OPTIONS = ("device", "compile", "tensorboard", "log_every", "save_every", "micro_batch_size")
BUDGET_TOLERANCE = 0.05


# ---------------------------------------------------------------------------- the spec


@dataclass
class Spec:
    """A parsed comparison spec (see the module docstring)."""

    path: Path
    data: dict[str, Any]
    train: dict[str, Any]
    shape: dict[str, Any]
    budget: str | int | None
    keep_checkpoints: bool
    ablation_widths: str
    entrants: list[dict[str, Any]]


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
    return Spec(
        path=path,
        data=_check_keys(f"{path}: data", raw.get("data"), DATA_KEYS),
        train=_check_keys(f"{path}: train", raw.get("train"), _train_option_names()),
        shape=shape,
        budget=budget,
        keep_checkpoints=bool(raw.get("keep_checkpoints", True)),
        ablation_widths=raw.get("ablation_widths", "keep"),
        entrants=entrants,
    )


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


# ---------------------------------------------------------------------------- entrants


@dataclass
class Entrant:
    """One model of the comparison: the config fields handed to the trainer and what they build."""

    name: str
    kind: str  # wiola, ablation, llama, mistral, gpt2
    fields: dict[str, Any]
    parameters: int  # counted on the built model
    shape: dict[str, Any]
    budget: int | None = None  # the parameter budget its MLP width was matched to
    note: str = ""

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.name).strip("_") or "entrant"


def built_parameters(fields: dict[str, Any]) -> int:
    """Parameters of the model `fields` builds (tied weights once), counted on a meta-device model."""
    import torch
    from transformers import AutoModelForCausalLM

    import wiola  # noqa: F401  (registers model_type "wiola")
    from wiola.train.config import make_model_config

    config = make_model_config(fields, {})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def match_width(fields: dict[str, Any], key: str, target: int, multiple: int = 8) -> tuple[dict[str, Any], int]:
    """Set `fields[key]` (an MLP width, a multiple of `multiple`) so the model has about `target` parameters.

    The parameter count is affine in the width, so two probe builds give the slope. A Wiola DSFF
    MLP keeps the ratio of its wide to its narrow stream (4, the paper's, unless the fields set both).
    """
    ratio = None
    if key == "intermediate_size" and _wiola_value(fields, "mlp") == "dsff":
        narrow, wide = _wiola_value(fields, "intermediate_size"), _wiola_value(fields, "dsff_wide_size")
        ratio = wide / narrow if narrow and wide else 4

    def with_width(w: int) -> dict[str, Any]:
        return {**fields, key: w, **({"dsff_wide_size": max(1, round(ratio * w))} if ratio else {})}

    low = built_parameters(with_width(multiple))
    slope = (built_parameters(with_width(2 * multiple)) - low) / multiple
    width = multiple + multiple * round((target - low) / slope / multiple) if slope > 0 else multiple
    fields = with_width(max(multiple, width))
    return fields, built_parameters(fields)


def _wiola_value(fields: dict[str, Any], key: str) -> Any:
    """A WiolaConfig field as `fields` set it: given, else from the named preset, else the default."""
    from wiola.configuration_wiola import PRESETS, WiolaConfig

    if key in fields:
        return fields[key]
    preset = PRESETS.get(fields.get("preset") or "", {})
    return preset[key] if key in preset else getattr(WiolaConfig, key, None)


def _data_fields(data_dir: Path) -> dict[str, Any]:
    from wiola.train.batches import read_manifest, special_token_ids

    manifest = read_manifest(data_dir)
    return {"vocab_size": manifest["vocab_size"], **{k: v for k, v in special_token_ids(data_dir, manifest).items() if v is not None}}


class _Resolver:
    """Turns the spec's entrant list into `Entrant`s; budgets may refer to other entrants by name."""

    def __init__(self, spec: Spec, data_fields: dict[str, Any]):
        self.spec, self.data_fields = spec, data_fields
        self.raw: dict[str, dict[str, Any]] = {}
        for i, entry in enumerate(spec.entrants):
            if not isinstance(entry, dict):
                raise WiolaError(f"{spec.path}: entrant {i + 1} must be a mapping, got {entry!r}")
            kind = entry.get("kind", "wiola")
            if kind not in KINDS:
                raise WiolaError(f"{spec.path}: entrant {entry.get('name', i + 1)!r} has unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
            name = entry.get("name") or (kind if kind in BASELINES else None)
            if not isinstance(name, str) or not name.strip():
                raise WiolaError(f"{spec.path}: entrant {i + 1} needs a 'name'")
            _check_keys(f"{spec.path}: entrant {name!r}", entry, ENTRANT_KEYS[kind])
            if name in self.raw:
                raise WiolaError(f"{spec.path}: two entrants are named {name!r}")
            self.raw[name] = {**entry, "kind": kind}
        self.done: dict[str, Entrant] = {}
        self.active: list[str] = []

    def all(self) -> list[Entrant]:
        ordered: list[Entrant] = []
        for name, entry in self.raw.items():
            base = self.get(name)
            ordered.append(base)
            if entry.get("ablations") is not None:
                ordered.extend(self.ablations(base, entry["ablations"]))
        slugs: dict[str, str] = {}
        for e in ordered:
            if e.slug in slugs and slugs[e.slug] != e.name:
                raise WiolaError(f"{self.spec.path}: entrants {slugs[e.slug]!r} and {e.name!r} would share the run directory {e.slug!r}; rename one")
            slugs[e.slug] = e.name
        return ordered

    def get(self, name: str) -> Entrant:
        if name in self.done:
            return self.done[name]
        if name in self.active:
            raise WiolaError(f"{self.spec.path}: budgets refer to each other in a loop: {' -> '.join(self.active + [name])}")
        self.active.append(name)
        entry = self.raw[name]
        entrant = self.wiola(name, entry) if entry["kind"] == "wiola" else self.baseline(name, entry)
        self.active.pop()
        self.done[name] = entrant
        return entrant

    def budget(self, who: str, ref: Any) -> tuple[int, Entrant | None]:
        if isinstance(ref, bool) or not isinstance(ref, (int, str)):
            raise WiolaError(f"{self.spec.path}: entrant {who!r}: budget must be an entrant name or a number, got {ref!r}")
        if isinstance(ref, int):
            if ref <= 0:
                raise WiolaError(f"{self.spec.path}: entrant {who!r}: budget must be positive, got {ref}")
            return ref, None
        if ref not in self.raw:
            raise WiolaError(f"{self.spec.path}: entrant {who!r}: budget refers to unknown entrant {ref!r}; entrants: {', '.join(self.raw)}")
        if ref == who:
            raise WiolaError(f"{self.spec.path}: entrant {who!r}: its budget cannot be itself")
        other = self.get(ref)
        return other.parameters, other

    # -- Wiola entrants and their ablations

    def wiola(self, name: str, entry: dict[str, Any]) -> Entrant:
        fields = self._wiola_fields(name, entry.get("config"))
        budget = None
        if entry.get("budget") is not None:
            budget, _ = self.budget(name, entry["budget"])
            fields, params = match_width(fields, "intermediate_size", budget)
        else:
            params = built_parameters(fields)
        return self._finish(Entrant(name, "wiola", fields, params, self._wiola_shape(fields), budget))

    def _wiola_fields(self, name: str, config: Any) -> dict[str, Any]:
        from wiola.configuration_wiola import PRESETS
        from wiola.train.config import split_config_source

        where = f"{self.spec.path}: entrant {name!r}"
        if config is None:
            raise WiolaError(f"{where} needs a 'config': a preset name, a config file or a mapping of WiolaConfig fields")
        if isinstance(config, str):
            if config in PRESETS:
                fields: dict[str, Any] = {"preset": config}
            elif Path(config).exists():
                model, train = split_config_source(config)
                if train:
                    raise WiolaError(f"{where}: {config} has a train: section; training options belong in the spec's train:")
                fields = {"preset": model} if isinstance(model, str) else dict(model)
            else:
                raise WiolaError(f"{where}: config {config!r} is neither a preset ({', '.join(PRESETS)}) nor an existing file")
        elif isinstance(config, dict):
            fields = dict(config)
        else:
            raise WiolaError(f"{where}: config must be a preset name, a file or a mapping, got {config!r}")
        if fields.pop("model_type", "wiola") != "wiola":
            raise WiolaError(f"{where}: a wiola entrant builds WiolaConfig; use kind llama, mistral or gpt2 for transformers baselines")
        preset = fields.get("preset")
        if preset is not None and preset not in PRESETS:
            raise WiolaError(f"{where}: unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        shape = self.spec.shape
        for key, targets in WIOLA_SHAPE_FIELDS.items():
            fixed = key in shape or (key == "num_key_value_heads" and "num_attention_heads" in shape)
            clash = [t for t in targets if t in fields]
            if fixed and clash:
                raise WiolaError(f"{where} sets {clash[0]}, which the spec's shape ({key}) fixes for every entrant")
        if "hidden_size" in shape and preset is not None:  # a preset's MLP widths follow its hidden size
            base = PRESETS[preset]
            for width in ("intermediate_size", "dsff_wide_size"):
                if width not in fields and base.get(width):
                    fields[width] = max(8, round(base[width] * shape["hidden_size"] / base["hidden_size"]))
        if "hidden_size" in shape or "num_attention_heads" in shape:
            fields.pop("head_dim", None)
        for key, targets in WIOLA_SHAPE_FIELDS.items():
            value = shape.get(key, shape.get("num_attention_heads") if key == "num_key_value_heads" else None)
            if value is not None:
                fields.update({t: value for t in targets})
        return {**fields, **self.data_fields}  # vocabulary and special tokens: always the data's

    @staticmethod
    def _wiola_shape(fields: dict[str, Any]) -> dict[str, Any]:
        from wiola.train.config import make_model_config

        c = make_model_config(fields, {})
        return {"hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
                "num_key_value_heads": c.num_key_value_heads, "context": c.max_position_embeddings, "dropout": c.hidden_dropout,
                **{k: getattr(c, k) for k in COMPONENTS}}

    def ablations(self, base: Entrant, request: Any) -> list[Entrant]:
        from wiola import configuration_wiola as cw

        where = f"{self.spec.path}: entrant {base.name!r}: ablations"
        choices = {"position_encoding": cw.POSITION_ENCODINGS, "attention_gate": cw.ATTENTION_GATES,
                   "cross_layer_context": cw.CROSS_LAYER_CONTEXTS, "token_merging": cw.TOKEN_MERGINGS, "mlp": cw.MLPS, "norm": cw.NORMS}
        current = {k: base.shape[k] for k in COMPONENTS}
        if request == "all":
            changes = [(c, off) for c, off in COMPONENTS.items() if current[c] != off]
            if not changes:
                raise WiolaError(f"{where}: 'all' found no novel component to switch off (every switch is already the LLaMA one)")
        elif isinstance(request, list) and request:
            changes = []
            for item in request:
                component, sep, value = str(item).partition("=")
                component, value = component.strip(), value.strip()
                if component not in COMPONENTS:
                    raise WiolaError(f"{where}: unknown component {component!r}; components: {', '.join(COMPONENTS)}")
                if not sep:
                    if current[component] == COMPONENTS[component]:
                        raise WiolaError(f"{where}: {component} is already {current[component]!r} (off); "
                                         f"write {component}=VALUE to switch it on ({', '.join(choices[component])})")
                    value = COMPONENTS[component]
                if value not in choices[component]:
                    raise WiolaError(f"{where}: {component}={value!r} is not valid; choose one of: {', '.join(choices[component])}")
                if value == current[component]:
                    raise WiolaError(f"{where}: {component} is already {value!r}; that ablation changes nothing")
                changes.append((component, value))
        else:
            raise WiolaError(f"{where} must be 'all' or a non-empty list of components (component or component=value)")
        out = []
        for component, value in changes:
            fields = {**base.fields, component: value}
            note = f"{base.name} with {component} {current[component]} -> {value}"
            budget = None
            if component == "mlp":
                fields["dsff_wide_size"] = None  # a new DSFF MLP gets the paper's 1:4 narrow/wide ratio
            if component == "mlp" or self.spec.ablation_widths == "match":
                budget = base.parameters
                fields, params = match_width(fields, "intermediate_size", budget)
                note += f" (MLP width {fields['intermediate_size']}, matched to {base.name})"
            else:
                params = built_parameters(fields)
            out.append(self._finish(Entrant(f"{base.name}:{component}={value}", "ablation", fields, params,
                                            self._wiola_shape(fields), budget, note)))
        return out

    # -- transformers baselines

    def baseline(self, name: str, entry: dict[str, Any]) -> Entrant:
        kind = entry["kind"]
        ref = entry.get("budget", self.spec.budget)
        if ref is None:
            ref = next((n for n, e in self.raw.items() if e["kind"] == "wiola"), None)
            if ref is None:
                raise WiolaError(f"{self.spec.path}: baseline {name!r} needs a 'budget' (no wiola entrant to match)")
        budget, other = self.budget(name, ref)
        shape = {**(other.shape if other else {}), **self.spec.shape}
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "context") if k not in shape]
        if missing:
            raise WiolaError(f"{self.spec.path}: baseline {name!r} with a numeric budget needs shape {', '.join(missing)} in the spec")
        d, layers, heads, ctx = shape["hidden_size"], shape["num_hidden_layers"], shape["num_attention_heads"], shape["context"]
        kv = shape.get("num_key_value_heads", heads)
        if "num_attention_heads" in self.spec.shape and "num_key_value_heads" not in self.spec.shape:
            kv = heads  # as for the Wiola entrants: the shape's heads, all with their own keys/values
        p = float(shape.get("dropout", 0.0))
        if kind == "gpt2":
            fields: dict[str, Any] = {"model_type": "gpt2", "n_embd": d, "n_layer": layers, "n_head": heads, "n_positions": ctx,
                                      "resid_pdrop": p, "embd_pdrop": p, "attn_pdrop": p, "tie_word_embeddings": True}
            note = "GPT2LMHeadModel: learned positions, LayerNorm, GELU MLP, biases; multi-head attention"
        else:
            fields = {"model_type": kind, "hidden_size": d, "num_hidden_layers": layers, "num_attention_heads": heads,
                      "num_key_value_heads": kv, "max_position_embeddings": ctx, "attention_dropout": p,
                      "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
            note = f"{BASELINES[kind]}: dropout on attention probabilities only (transformers has no residual dropout)"
            if kind == "mistral":
                fields["sliding_window"] = max(1, ctx // 2)
        extra = entry.get("config") or {}
        if not isinstance(extra, dict):
            raise WiolaError(f"{self.spec.path}: baseline {name!r}: config must be a mapping of {BASELINES[kind]} config fields")
        fields = {**fields, **extra, **self.data_fields}
        if kind == "mistral":
            note += f"; sliding window {fields['sliding_window']}"
        width = WIDTH_FIELD[kind]
        if width in extra:
            params, matched = built_parameters(fields), None
        else:
            fields, params = match_width(fields, width, budget)
            matched = budget
        shape = {"hidden_size": d, "num_hidden_layers": layers, "num_attention_heads": heads,
                 "num_key_value_heads": heads if kind == "gpt2" else fields["num_key_value_heads"], "context": ctx, "dropout": p}
        return self._finish(Entrant(name, kind, fields, params, shape, matched, note))

    def _finish(self, e: Entrant) -> Entrant:
        if e.budget and abs(e.parameters - e.budget) > BUDGET_TOLERANCE * e.budget:
            msg = f"{e.parameters:,} parameters, {100 * (e.parameters / e.budget - 1):+.1f}% off its budget of {e.budget:,} (width cannot go lower)"
            print(f"wiola compare: warning: {e.name}: {msg}")
            e.note = f"{e.note}; {msg}" if e.note else msg
        return e


def resolve_entrants(spec: Spec, data_fields: dict[str, Any]) -> list[Entrant]:
    """Every entrant of the spec, ablations right after their base, with configs and parameter counts."""
    return _Resolver(spec, data_fields).all()


# ---------------------------------------------------------------------------- measuring


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (Linux VmHWM); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakMemory:
    """Peak memory of one training session: CUDA `max_memory_allocated`, else the process peak RSS."""

    def __init__(self) -> None:
        """Start measuring: collect garbage and reset the peak counters."""
        import torch

        gc.collect()
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.rss_ok = _reset_peak_rss()

    def read(self, device: str) -> tuple[int | None, str]:
        import torch

        if device.startswith("cuda") and self.cuda:
            return int(torch.cuda.max_memory_allocated()), "cuda_max_memory_allocated"
        return (_peak_rss_bytes(), "cpu_peak_rss") if self.rss_ok else (None, "unavailable")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))


def summarize_run(run_dir: Path, meta: dict[str, Any], status: str, error: str | None = None) -> dict[str, Any]:
    """The result row of an entrant from its training log and the sessions recorded in `entrant.json`."""
    from wiola.train.metrics import read_log

    records = read_log(run_dir / "log.jsonl")
    starts = [r for r in records if r.get("event") == "start"]
    train = [r for r in records if "loss" in r and "step" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and math.isfinite(r["val_loss"])]
    sessions = meta.get("sessions", [])
    peaks = [s["peak_memory_bytes"] for s in sessions if s.get("peak_memory_bytes") is not None]
    kinds = {s.get("peak_memory_kind") for s in sessions if s.get("peak_memory_bytes") is not None}
    best = min(v for _, v in val) if val else None
    final = val[-1][1] if val else None
    rates = [r["tokens_per_s"] for r in train if r.get("tokens_per_s")]
    return {
        "name": meta["name"], "kind": meta["kind"], "status": status,
        "parameters": starts[0]["parameters"] if starts else None,
        "budget": meta.get("budget"),
        "steps": train[-1]["step"] if train else 0,
        "tokens_seen": train[-1]["tokens"] if train else 0,
        "best_val_loss": best, "best_val_ppl": _ppl(best),
        "best_val_step": next(s for s, v in val if v == best) if val else None,
        "final_val_loss": final, "final_val_ppl": _ppl(final),
        "tokens_per_s": statistics.median(rates) if rates else None,
        "peak_memory_bytes": max(peaks) if peaks else None,
        "peak_memory_kind": kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "unavailable"),
        "wall_time_s": sum(s["wall_s"] for s in sessions),
        "sessions": len(sessions),
        "device": starts[-1].get("device") if starts else None,
        "error": error,
        "note": meta.get("note", ""),
        "config": meta["config"],
        "val_curve": val,
        "run_dir": str(run_dir),
    }


# ---------------------------------------------------------------------------- running


def _setting_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _setting_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return diffs


def run_entrant(e: Entrant, k: int, n: int, *, out: Path, data_dir: Path, options: dict[str, Any],
                setting: dict[str, Any], keep_checkpoints: bool) -> tuple[str, int]:
    """Train (or resume, or skip) one entrant; returns (status, exit code); status is done, non_finite or interrupted."""
    from wiola.train import checkpoint, trainer
    from wiola.train.metrics import read_log

    run_dir = out / "runs" / e.slug
    meta_path, result_path = run_dir / "entrant.json", run_dir / "result.json"
    config_path = out / "configs" / f"{e.slug}.json"
    wanted = {"name": e.name, "kind": e.kind, "config": e.fields, "setting": setting}
    meta = _read_json(meta_path)
    latest = checkpoint.resolve(run_dir / "checkpoints" / "latest")
    finished = meta is not None and result_path.is_file()
    resume = meta is not None and not finished and (latest / checkpoint.STATE_FILE).is_file()
    if finished or resume:  # something to keep: it must be what this spec asks for
        diffs = _setting_differences({key: meta.get(key) for key in wanted}, json.loads(json.dumps(wanted)))
        if diffs:
            raise WiolaError(f"{run_dir} was trained for a different setting or config ({'; '.join(diffs[:6])}); "
                             f"use a new OUT directory or delete {run_dir}")
    label = f"[{k}/{n}] {e.name} ({e.kind}, {e.parameters:,} parameters)"
    if finished:
        print(f"{label}: finished earlier, skipped")
        return _read_json(result_path)["status"], 0
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)  # a run stopped before its first checkpoint starts again
        meta = {**wanted, "sessions": []}
    meta.update(note=e.note, budget=e.budget, planned_parameters=e.parameters)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(config_path, e.fields)
    _write_json(meta_path, meta)
    if resume:
        step = int(_read_json(latest / checkpoint.STATE_JSON).get("step", 0)) if (latest / checkpoint.STATE_JSON).is_file() else "?"
        print(f"{label}: resuming from step {step}", flush=True)
    else:
        print(f"{label}: training", flush=True)

    status, error, code = "done", None, 0
    start = time.perf_counter()
    peak = PeakMemory()
    try:
        result = trainer.train(str(config_path), str(data_dir), str(run_dir), options=dict(options), resume=resume)
        if result.stopped_by is not None:
            status, code = "interrupted", result.exit_code or 130
    except trainer.NonFiniteLoss as exc:  # recorded as this entrant's result; the comparison goes on
        status, error = "non_finite", str(exc)
    records = [r for r in read_log(run_dir / "log.jsonl") if r.get("event") == "start"]
    memory, memory_kind = peak.read(records[-1].get("device", "cpu") if records else "cpu")
    meta["sessions"].append({"wall_s": time.perf_counter() - start, "peak_memory_bytes": memory,
                             "peak_memory_kind": memory_kind, "resumed": resume, "status": status})
    _write_json(meta_path, meta)
    if status == "interrupted":
        return status, code
    row = summarize_run(run_dir, meta, status, error)
    _write_json(result_path, row)
    if not keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    best = f"best val loss {row['best_val_loss']:.4f}" if row["best_val_loss"] is not None else "no validation loss"
    print(f"{label}: {status}, {best}, {row['tokens_seen']:,} tokens", flush=True)
    return status, code


def training_options(spec: Spec, overrides: dict[str, Any], entrants: list[Entrant]) -> dict[str, Any]:
    """The options every entrant is trained with: spec, then command-line overrides; seq_len made explicit."""
    from wiola.train.config import TrainConfig

    options = {"tensorboard": False, **spec.train, **{k: v for k, v in overrides.items() if v is not None}}
    if "resume" in options:
        raise WiolaError("resume is not a training option of a comparison: run the same command again to resume")
    if options.get("seq_len") is None:
        options["seq_len"] = min(e.shape["context"] for e in entrants)
    TrainConfig.layered(options)  # unknown option names fail here, before anything trains
    return options


def compare(spec_path: str | Path, out: str | Path, *, only: list[str] | None = None, train_overrides: dict[str, Any] | None = None,
            shape_overrides: dict[str, Any] | None = None) -> int:
    """Run (or resume) a comparison; write the reports; return the exit status (0, or 128+signal when interrupted)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise WiolaError("wiola compare runs in a single process; start it without torchrun")
    spec = load_spec(spec_path, shape_overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(spec, out)
    entrants = resolve_entrants(spec, _data_fields(data_dir))
    names = [e.name for e in entrants]
    if only:
        unknown = [name for name in only if name not in names]
        if unknown:
            raise WiolaError(f"--only: unknown entrant(s) {', '.join(map(repr, unknown))}; entrants: {', '.join(names)}")
    options = training_options(spec, train_overrides or {}, entrants)
    from wiola.train.batches import read_manifest

    manifest = read_manifest(data_dir)
    setting = {"data": {"fingerprint": manifest.get("fingerprint"), "vocab_size": manifest["vocab_size"]},
               "train": {k: v for k, v in options.items() if k not in RUNTIME_OPTIONS}}
    setting = json.loads(json.dumps(setting))
    (out / "configs").mkdir(exist_ok=True)
    context = {"spec": spec, "out": out, "data_dir": data_dir, "manifest": manifest, "options": options, "entrants": entrants}
    print(f"wiola compare: {len(entrants)} entrants on {data_dir} "
          f"({options.get('max_steps', '?')} steps x {options.get('batch_size', '?')} x {options['seq_len']} tokens); results in {out}")
    code = 0
    for k, e in enumerate(entrants, 1):
        if only and e.name not in only:
            continue
        status, code = run_entrant(e, k, len(entrants), out=out, data_dir=data_dir, options=options, setting=setting,
                                   keep_checkpoints=spec.keep_checkpoints)
        write_reports(**context)
        if status == "interrupted":
            print(f"wiola compare: interrupted during {e.name}; run the same command again to resume", flush=True)
            return code
    write_reports(**context)
    print(f"wiola compare: wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'val_loss.png'}")
    return code


# ---------------------------------------------------------------------------- reports


def _environment(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import platform

    import torch
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "devices": sorted({r["device"] for r in rows if r.get("device")}), "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
    return env


def write_reports(*, spec: Spec, out: Path, data_dir: Path, manifest: dict[str, Any], options: dict[str, Any],
                  entrants: list[Entrant]) -> None:
    """results.json, results.md and val_loss.png from the finished entrants (in spec order)."""
    rows, pending = [], []
    for e in entrants:
        row = _read_json(out / "runs" / e.slug / "result.json")
        (rows.append(row) if row is not None else pending.append(e.name))
    splits = manifest["splits"]
    summary = {
        "spec": str(spec.path),
        "data": {"dir": str(data_dir), "fingerprint": manifest.get("fingerprint"), "vocab_size": manifest["vocab_size"],
                 "train_tokens": splits["train"]["num_tokens"], "val_tokens": splits["val"]["num_tokens"]},
        "train": options,
        "shape": spec.shape,
        "tokens_per_step": options.get("batch_size", 32) * options["seq_len"],
        "environment": _environment(rows),
        "entrants": rows,
        "pending": pending,
    }
    _write_json(out / "results.json", summary)
    (out / "results.md").write_text(markdown_report(summary), encoding="utf-8")
    plot_val_curves(rows, out / "val_loss.png")


def _fmt(value: Any, spec: str = ",.0f", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def _memory(row: dict[str, Any]) -> str:
    b = row.get("peak_memory_bytes")
    if b is None:
        return "n/a"
    mark = {"cuda_max_memory_allocated": "", "cpu_peak_rss": " (RSS)"}.get(row.get("peak_memory_kind"), " (?)")
    return f"{b / 2**20:,.0f} MiB{mark}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h {m:02d}m" if hours else (f"{m}m {s:02d}s" if m else f"{seconds:.1f} s")


TABLE_HEADER = ("entrant", "kind", "parameters", "tokens seen", "best val loss", "best val ppl", "final val loss",
                "final val ppl", "tokens/s", "peak memory", "wall time")


def markdown_report(summary: dict[str, Any]) -> str:
    """The comparison as markdown: the setting, one table row per finished entrant, notes."""
    t, data = summary["train"], summary["data"]
    lines = [
        f"# wiola compare: `{summary['spec']}`", "",
        f"Data `{data['dir']}`: vocabulary {data['vocab_size']}, {data['train_tokens']:,} train / {data['val_tokens']:,} validation tokens. "
        f"Every entrant: {t.get('max_steps', 1000)} steps x batch {t.get('batch_size', 32)} x {t['seq_len']} tokens "
        f"({summary['tokens_per_step']:,} tokens/step), lr {t.get('lr', 6e-4)}, seed {t.get('seed', 1337)}, "
        f"evaluation every {t.get('eval_every', 250)} steps on up to {t.get('eval_batches', 10)} batches.", "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---|" * 2 + "---:|" * (len(TABLE_HEADER) - 2),
    ]
    for r in summary["entrants"]:
        status = "" if r["status"] == "done" else f" ({r['status'].replace('_', '-')} at step {r['steps']})"
        lines.append("| " + " | ".join([
            f"{r['name']}{status}", r["kind"], _fmt(r["parameters"]), _fmt(r["tokens_seen"]),
            _fmt(r["best_val_loss"], ".4f"), _fmt(r["best_val_ppl"], ".2f"), _fmt(r["final_val_loss"], ".4f"),
            _fmt(r["final_val_ppl"], ".2f"), _fmt(r["tokens_per_s"]), _memory(r), _duration(r["wall_time_s"]),
        ]) + " |")
    env = summary["environment"]
    lines += ["", f"Devices: {', '.join(env['devices']) or '–'}{' (' + env['cuda_device'] + ')' if env.get('cuda_device') else ''}; "
              f"torch {env['torch']}, transformers {env['transformers']}.",
              "Peak memory: CUDA `max_memory_allocated` on a GPU; on a CPU the process peak resident set size "
              "during that entrant's training (marked RSS; it includes the Python and PyTorch runtime).",
              "Tokens/s: median over the training log windows (evaluation and checkpoint time fall in a few windows only). "
              "Wall time: the whole `train()` call(s), evaluation and checkpoints included."]
    notes = [f"- {r['name']}: {r['note']}" for r in summary["entrants"] if r.get("note")]
    if notes:
        lines += ["", "Notes:", *notes]
    if summary["pending"]:
        lines += ["", f"Not finished yet: {', '.join(summary['pending'])}."]
    return "\n".join(lines) + "\n"


def plot_val_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """Validation loss against step for every finished entrant (matplotlib, Agg backend).

    Baselines are dashed, ablations dotted, Wiola entrants solid; the legend sits beside the axes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = [plt.get_cmap("tab20")(i) for i in range(20)] + [plt.get_cmap("tab20b")(i) for i in range(20)]
    fig, ax = plt.subplots(figsize=(12, 6))
    for i, r in enumerate(r for r in rows if r["val_curve"]):
        steps, losses = zip(*r["val_curve"])
        style = "--" if r["kind"] in BASELINES else (":" if r["kind"] == "ablation" else "-")
        ax.plot(steps, losses, style, color=colors[i % len(colors)], marker="o", markersize=2.5, linewidth=1.3, label=r["name"])
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("wiola compare: validation loss")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- command


def compare_command(spec: str, out: str, only: list[str] | None = None, train: list[str] | None = None,
                    shape: list[str] | None = None, device: str | None = None,
                    dtype: Literal["auto", "fp32", "bf16"] | None = None) -> int:
    """Train several models on the same token stream and report them side by side.

    The spec (YAML/JSON, see configs/compare/) names the data, the training options and
    shape shared by every entrant, and the entrants: Wiola presets or configs, their
    single-component ablations, and LlamaForCausalLM / MistralForCausalLM / GPT2LMHeadModel
    baselines at a matched parameter budget. Writes OUT/results.json, OUT/results.md and
    OUT/val_loss.png (after every entrant) and one training run per entrant in OUT/runs/.
    Running the same command again resumes: finished entrants are skipped, a partial one continues.

    Args:
        spec: comparison spec file (YAML or JSON).
        out: output directory.
        only: train only these entrants (by name); the reports still list every finished one.
        train: training option overrides, key=value (e.g. --train max_steps=200 eval_every=50), for smoke runs.
        shape: shape overrides, key=value (hidden_size, num_hidden_layers, num_attention_heads,
            num_key_value_heads, context, dropout).
        device: auto, cpu, cuda, cuda:N or mps (default: the spec's, else auto).
        dtype: auto (bf16 autocast on CUDA), fp32 or bf16 (default: the spec's, else auto).
    """
    from wiola.train.config import parse_overrides

    overrides = {**parse_overrides(train), "device": device, "dtype": dtype}
    return compare(spec, out, only=only, train_overrides=overrides, shape_overrides=parse_overrides(shape))
