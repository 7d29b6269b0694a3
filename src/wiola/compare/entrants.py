"""The entrants of a comparison: `Entrant`, parameter counting and MLP width matching, `resolve_entrants`.

`_Resolver` turns the spec's entrant list into `Entrant`s (Wiola configs, their single-component
ablations, and transformers baselines at a matched parameter budget) and, with the spec's
`same_budget_llama`, adds a LLaMA at the parameter count of every Wiola entrant or ablation that is
more than 2% off the control's (`llama@NAME`; see `_Resolver.same_budget_llamas`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wiola.compare.spec import (
    BASELINES,
    BUDGET_TOLERANCE,
    COMPONENTS,
    ENTRANT_KEYS,
    ENTRANT_TRAIN_KEYS,
    KINDS,
    SAME_BUDGET_TOLERANCE,
    WIDTH_FIELD,
    WIOLA_SHAPE_FIELDS,
    Spec,
    _check_keys,
)
from wiola.errors import WiolaError


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
    train: dict[str, Any] = field(default_factory=dict)  # its own training options (ENTRANT_TRAIN_KEYS)
    same_budget: str | None = None  # the LLaMA entrant of its parameter count it is tested against

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.name).strip("_") or "entrant"


def same_budget(parameters: int, reference: int) -> bool:
    """Whether `parameters` is within the 2% rule (`SAME_BUDGET_TOLERANCE`) of `reference`."""
    return abs(parameters - reference) <= SAME_BUDGET_TOLERANCE * reference


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
        ordered.extend(self.same_budget_llamas(ordered))
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

    def own_training(self, name: str, entry: dict[str, Any]) -> dict[str, Any]:
        """The entrant's own training options (`train:`), checked: names from ENTRANT_TRAIN_KEYS, numbers."""
        train = _check_keys(f"{self.spec.path}: entrant {name!r}: train", entry.get("train"), ENTRANT_TRAIN_KEYS)
        for key, value in train.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise WiolaError(f"{self.spec.path}: entrant {name!r}: train {key} must be a non-negative number, got {value!r}")
        return train

    # -- Wiola entrants and their ablations

    def wiola(self, name: str, entry: dict[str, Any]) -> Entrant:
        fields = self._wiola_fields(name, entry.get("config"))
        train = self.own_training(name, entry)
        budget = None
        if entry.get("budget") is not None:
            budget, _ = self.budget(name, entry["budget"])
            fields, params = match_width(fields, "intermediate_size", budget)
        else:
            params = built_parameters(fields)
        return self._finish(Entrant(name, "wiola", fields, params, self._wiola_shape(fields), budget, _train_note(train), train))

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
            if base.train:  # an ablation trains as its base does
                note += f"; {_train_note(base.train)}"
            out.append(self._finish(Entrant(f"{base.name}:{component}={value}", "ablation", fields, params,
                                            self._wiola_shape(fields), budget, note, dict(base.train))))
        return out

    # -- transformers baselines

    def baseline(self, name: str, entry: dict[str, Any]) -> Entrant:
        ref = entry.get("budget", self.spec.budget)
        if ref is None:
            ref = next((n for n, e in self.raw.items() if e["kind"] == "wiola"), None)
            if ref is None:
                raise WiolaError(f"{self.spec.path}: baseline {name!r} needs a 'budget' (no wiola entrant to match)")
        budget, other = self.budget(name, ref)
        return self.build_baseline(name, entry["kind"], entry.get("config"), budget, other, self.own_training(name, entry))

    def build_baseline(self, name: str, kind: str, extra: Any, budget: int, other: Entrant | None,
                       train: dict[str, Any]) -> Entrant:
        """A transformers baseline of `other`'s shape (the spec's shape wins), its MLP width matched to `budget`."""
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
        extra = extra or {}
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
        if train:
            note += f"; {_train_note(train)}"
        return self._finish(Entrant(name, kind, fields, params, shape, matched, note, dict(train)))

    # -- same-budget LLaMAs

    def same_budget_llamas(self, ordered: list[Entrant]) -> list[Entrant]:
        """Pair every Wiola entrant and ablation with a LLaMA of its parameter count (`Entrant.same_budget`).

        A spec entrant named `llama@NAME` (kind llama, within 2% of NAME's parameters) is NAME's. With
        `same_budget_llama: true`, every other Wiola entrant or ablation more than 2% off the control's
        parameter count gets a generated one: `llama@NAME`, a LlamaForCausalLM of its shape with every
        novelty off (RoPE, plain attention, SwiGLU, RMSNorm), its SwiGLU width matched to NAME's parameter
        count and trained with NAME's own training options. Two entrants whose LLaMAs would be the same
        model with the same options share the first one (same config and seed: the same run).
        """
        by_name = {e.name: e for e in ordered}
        for e in ordered:
            named = by_name.get(f"llama@{e.name}")
            if e.kind in ("wiola", "ablation") and named is not None and named.kind == "llama" and named.train == e.train:
                if same_budget(named.parameters, e.parameters):
                    e.same_budget = named.name
                elif self.spec.same_budget_llama:
                    raise WiolaError(f"{self.spec.path}: entrant {named.name!r} has {named.parameters:,} parameters, more than "
                                     f"{SAME_BUDGET_TOLERANCE:.0%} off {e.name!r} ({e.parameters:,}); give it 'budget: {e.name}' "
                                     "or rename it")
        if not self.spec.same_budget_llama:
            return []
        control = by_name.get(self.spec.control or "")
        if control is None:
            raise WiolaError(f"{self.spec.path}: control {self.spec.control!r} is not an entrant; entrants: {', '.join(by_name)}")

        def key(llama: Entrant) -> str:
            return json.dumps([llama.fields, llama.train], sort_keys=True)

        listed = {key(e): e for e in reversed(ordered) if e.kind == "llama"}  # a listed LLaMA of that budget serves too
        made: dict[str, Entrant] = {}  # the config and options of a generated LLaMA -> it
        for e in ordered:
            if e.kind not in ("wiola", "ablation") or e is control or e.same_budget or same_budget(e.parameters, control.parameters):
                continue
            name = f"llama@{e.name}"
            if name in by_name:
                raise WiolaError(f"{self.spec.path}: entrant {name!r} would be {e.name!r}'s same-budget LLaMA but is not one "
                                 "(kind llama with the same training options); rename it")
            llama = self.build_baseline(name, "llama", None, e.parameters, e, e.train)
            if key(llama) in listed:
                llama = listed[key(llama)]
            elif key(llama) in made:
                llama = made[key(llama)]
                llama.note += f"; also {e.name}'s"
            else:
                llama.note = f"same-budget LLaMA of {e.name} (every novelty off); {llama.note}"
                made[key(llama)] = llama
            e.same_budget = llama.name
            if not same_budget(llama.parameters, e.parameters):  # only where a width step of 8 is over 2% of the model
                msg = (f"its same-budget LLaMA {llama.name} has {llama.parameters:,} parameters, "
                       f"{100 * (llama.parameters / e.parameters - 1):+.1f}% off (the MLP width cannot match closer)")
                print(f"wiola compare: warning: {e.name}: {msg}")
                e.note = f"{e.note}; {msg}" if e.note else msg
        return list(made.values())

    def _finish(self, e: Entrant) -> Entrant:
        if e.budget and abs(e.parameters - e.budget) > BUDGET_TOLERANCE * e.budget:
            msg = f"{e.parameters:,} parameters, {100 * (e.parameters / e.budget - 1):+.1f}% off its budget of {e.budget:,} (width cannot go lower)"
            print(f"wiola compare: warning: {e.name}: {msg}")
            e.note = f"{e.note}; {msg}" if e.note else msg
        return e


def _train_note(train: dict[str, Any]) -> str:
    return "own training options: " + ", ".join(f"{k} {v:g}" for k, v in train.items()) if train else ""


def resolve_entrants(spec: Spec, data_fields: dict[str, Any]) -> list[Entrant]:
    """Every entrant of the spec, ablations right after their base, with configs and parameter counts."""
    return _Resolver(spec, data_fields).all()
