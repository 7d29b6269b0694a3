"""`wiola convert`: turn checkpoints of the reference packages, or of HF LLaMA, into this library's format.

Supported sources (told apart by `config.json`, since both reference packages write `model_type: "wiola"`):

* `wiola13m` 1.0.x (Spiral RoPE + GSA + Butterfly MLP): fields `spiral_alpha`, `gate_pre_rope`,
  `use_attention_gate`; weight names are already ours.
* `wiola` 0.1.x (paper: SRPE + GCLA + ATM + DSFF + WiolaRMSNorm): fields `dsff_*`, `srpe_*`, `gcla_*`,
  `atm_*`; weights are renamed (`attn.*` -> `self_attn.*`, `ffn.*` -> `mlp.*`, norms).
* HF LLaMA (`model_type: "llama"`): every novelty off, names unchanged.
* wiola 0.2.0.dev checkpoints with the old GCLA layout (dead layer-0 tensors, scalar φ): upgraded
  (`wiola.legacy`); other native checkpoints need no conversion.

The converter reads `model.safetensors`, sharded safetensors or `pytorch_model.bin`, renames the
tensors, checks that every expected tensor is there with the right shape and that nothing is left
over, loads them with `strict=True` and saves with `save_pretrained` (safetensors), copying the
tokenizer files. Mapping tables and known differences: `docs/convert.md`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wiola import legacy
from wiola.errors import WiolaError

# Generic fields that any transformers config.json may carry and that never change the math.
GENERIC_FIELDS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "_name_or_path", "_commit_hash", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id",
    "sep_token_id", "decoder_start_token_id", "return_dict", "output_hidden_states", "output_attentions",
    "torchscript", "use_bfloat16", "tokenizer_class", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "tie_encoder_decoder", "pruned_heads", "prefix", "task_specific_params", "finetuning_task",
    "cross_attention_hidden_size", "tf_legacy_loss", "_attn_implementation_autoset",
    "initializer_range", "max_position_embeddings", "attention_dropout",
    # generation defaults that old transformers versions wrote into config.json
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
}
SOURCE_FIELDS = {
    "wiola13m": {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "rope_theta", "spiral_alpha", "gate_pre_rope", "use_attention_gate", "rms_norm_eps",
                 "tie_word_embeddings"},
    "wiola-0.1": {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "dsff_narrow_size", "dsff_wide_size", "srpe_theta", "srpe_spiral_divisor",
                  "srpe_radial_amplitude", "srpe_radial_frequency", "atm_threshold", "atm_enabled",
                  "gcla_lookback", "gcla_gate_init", "rms_norm_eps", "tie_word_embeddings"},
    "llama": {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling",
              "rope_parameters", "attention_bias", "mlp_bias", "pretraining_tp", "tie_word_embeddings"},
}
REQUIRED_FIELDS = {
    "wiola13m": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
    "wiola-0.1": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "dsff_narrow_size", "dsff_wide_size"),
    "llama": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
}
LABELS = {"wiola13m": "wiola13m 1.0.x", "wiola-0.1": "wiola 0.1.x", "llama": "HF LLaMA",
          "wiola-0.2-dev": "wiola 0.2.0.dev (old GCLA layout)"}
WIOLA13M_MARKERS = {"spiral_alpha", "gate_pre_rope", "use_attention_gate"}
WIOLA01_PREFIXES = ("dsff_", "srpe_", "gcla_", "atm_")
NATIVE_MARKERS = {"position_encoding", "attention_gate", "cross_layer_context", "token_merging", "mlp", "norm"}

# wiola 0.1.x weight names -> ours (applied to the part after `model.layers.N.` or to the whole name).
WIOLA01_RENAMES = [
    (r"input_norm\.(weight|offset)", r"input_layernorm.\1"),
    (r"post_attn_norm\.(weight|offset)", r"post_attention_layernorm.\1"),
    (r"attn\.(q_proj|k_proj|v_proj|o_proj|k_ctx_proj|v_ctx_proj)\.weight", r"self_attn.\1.weight"),
    (r"attn\.gate_proj\.weight", r"self_attn.output_gate_proj.weight"),
    (r"attn\.blend_logit", r"self_attn.blend_logit"),
    (r"ffn\.gate_a\.weight", r"mlp.gate_proj.weight"),
    (r"ffn\.up_a\.weight", r"mlp.up_proj.weight"),
    (r"ffn\.down_a\.weight", r"mlp.down_proj.weight"),
    (r"ffn\.up_b\.weight", r"mlp.wide_up_proj.weight"),
    (r"ffn\.down_b\.weight", r"mlp.wide_down_proj.weight"),
    (r"ffn\.fusion\.weight", r"mlp.fusion_proj.weight"),
]
WIOLA01_TOP = {"model.embed_tokens.weight": "model.embed_tokens.weight", "model.final_norm.weight": "model.norm.weight",
               "model.final_norm.offset": "model.norm.offset", "lm_head.weight": "lm_head.weight"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja")
# DST/RECORD lists the files a conversion wrote; a later --force conversion deletes only those
RECORD = ".wiola-convert.json"


@dataclass
class ConversionReport:
    """What a conversion did, for the summary line and for callers."""

    kind: str
    saved_with: str | None
    num_parameters: int = 0
    num_tensors: int = 0
    notes: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)

    def summary(self, src: Path, dst: Path | None) -> str:
        saved = f" (saved with transformers {self.saved_with})" if self.saved_with else ""
        where = f" to {dst}" if dst is not None else ""
        text = (f"Converted a {LABELS[self.kind]} checkpoint{saved} from {src}{where}: "
                f"{self.num_parameters:,} parameters in {self.num_tensors} tensors, all mapped and shape-checked. ")
        text += " ".join(self.notes)
        text += f" Copied: {', '.join(self.copied)}." if self.copied else " No tokenizer or generation files to copy."
        return text


# --------------------------------------------------------------------------- config
def read_source_config(src: Path) -> dict:
    """The source's config.json as a dict (a `WiolaError` when missing or unreadable)."""
    if not src.exists():
        raise WiolaError(f"source {src} does not exist")
    if not src.is_dir():
        raise WiolaError(f"source {src} is not a directory (expected a saved checkpoint folder)")
    path = src / "config.json"
    if not path.is_file():
        raise WiolaError(f"{src} has no config.json; is it a saved checkpoint folder?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WiolaError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise WiolaError(f"{path} does not hold a JSON object")
    return config


def detect_kind(config: dict) -> str:
    """`wiola13m`, `wiola-0.1` or `llama`, from the fields of config.json."""
    model_type = config.get("model_type")
    if model_type == "llama":
        return "llama"
    if model_type != "wiola":
        raise WiolaError(f"model_type {model_type!r} is not supported; wiola convert reads wiola13m 1.0.x, "
                         f"wiola 0.1.x and HF LLaMA ('llama') checkpoints")
    if NATIVE_MARKERS & config.keys():
        raise WiolaError("this checkpoint is already in wiola's native format (it has position_encoding/mlp/... fields); "
                         "load it with AutoModelForCausalLM.from_pretrained after `import wiola`, no conversion needed")
    is_13m = bool(WIOLA13M_MARKERS & config.keys())
    is_01 = any(key.startswith(WIOLA01_PREFIXES) for key in config)
    if is_13m and is_01:
        raise WiolaError("config.json mixes wiola13m fields (spiral_alpha/gate_pre_rope/use_attention_gate) with "
                         "wiola 0.1.x fields (dsff_*/srpe_*/gcla_*/atm_*); cannot tell which package wrote it")
    if not (is_13m or is_01):
        raise WiolaError("config.json says model_type 'wiola' but has neither wiola13m fields (spiral_alpha, ...) "
                         "nor wiola 0.1.x fields (dsff_*, srpe_*, ...); cannot tell which package wrote it")
    return "wiola13m" if is_13m else "wiola-0.1"


def _check_fields(config: dict, kind: str) -> None:
    unknown = sorted(set(config) - GENERIC_FIELDS - SOURCE_FIELDS[kind])
    if unknown:
        raise WiolaError(f"config.json field(s) not understood for a {LABELS[kind]} checkpoint and possibly changing "
                         f"the model's math: {', '.join(unknown)}")
    missing = [name for name in REQUIRED_FIELDS[kind] if config.get(name) is None]
    if missing:
        raise WiolaError(f"config.json lacks required field(s): {', '.join(missing)}")


def _llama_rope_theta(config: dict) -> float:
    """rope_theta from `rope_theta` or `rope_parameters`; only the default (unscaled) RoPE is accepted."""
    theta = config.get("rope_theta")
    for key in ("rope_scaling", "rope_parameters"):
        params = config.get(key)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise WiolaError(f"config.json {key} must be an object, got {params!r}")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise WiolaError(f"rope scaling type {rope_type!r} ({key}) is not supported; only plain RoPE ('default') converts")
        extra = sorted(set(params) - {"rope_type", "type", "rope_theta"})
        if extra:
            raise WiolaError(f"config.json {key} has unsupported entries that change RoPE: {', '.join(extra)}")
        theta = params.get("rope_theta", theta)
    return float(10000.0 if theta is None else theta)


def map_config(config: dict, kind: str, keep_atm: bool = False) -> tuple[dict, list[str]]:
    """WiolaConfig keyword arguments for a source config, and notes on what was mapped."""
    _check_fields(config, kind)
    get = config.get
    common = {name: get(name) for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")}
    common.update(max_position_embeddings=get("max_position_embeddings", 1024 if kind == "wiola13m" else 2048),
                  rms_norm_eps=get("rms_norm_eps", 1e-6), initializer_range=get("initializer_range", 0.02),
                  attention_dropout=get("attention_dropout", 0.0) or 0.0)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if name in config:
            common[name] = config[name]
    notes: list[str] = []
    if kind == "wiola13m":
        gate = bool(get("use_attention_gate", True))
        kwargs = dict(common, num_key_value_heads=get("num_attention_heads"), intermediate_size=get("intermediate_size"),
                      rope_theta=get("rope_theta", 10000.0), position_encoding="spiral", spiral_alpha=get("spiral_alpha", 0.05),
                      attention_gate="gsa" if gate else "none", gate_pre_rope=bool(get("gate_pre_rope", True)),
                      mlp="butterfly", norm="rmsnorm", tie_word_embeddings=get("tie_word_embeddings", True))
        notes.append(f"Mapped to spiral (alpha {kwargs['spiral_alpha']}) + {'gsa' if gate else 'no'} gate"
                     f"{' (pre-rope)' if gate and kwargs['gate_pre_rope'] else ' (post-rope)' if gate else ''}"
                     f" + butterfly {kwargs['intermediate_size']} + rmsnorm, H_kv = H; weight names unchanged.")
    elif kind == "wiola-0.1":
        lookback = get("gcla_lookback", 2)
        kwargs = dict(common, num_key_value_heads=get("num_key_value_heads", 4) or get("num_attention_heads"),
                      intermediate_size=get("dsff_narrow_size"), dsff_wide_size=get("dsff_wide_size"),
                      rope_theta=get("srpe_theta", 10000.0), position_encoding="srpe",
                      srpe_k=float(get("srpe_spiral_divisor", 8)), srpe_amplitude=get("srpe_radial_amplitude", 0.1),
                      srpe_frequency=get("srpe_radial_frequency", 0.01), cross_layer_context="gcla",
                      gcla_lookback=lookback if lookback else get("num_hidden_layers"),
                      gcla_gate_init=get("gcla_gate_init", -3.0), atm_threshold=get("atm_threshold", 0.92),
                      token_merging="atm" if keep_atm and get("atm_enabled", True) else "none",
                      mlp="dsff", norm="wiola_rmsnorm", tie_word_embeddings=get("tie_word_embeddings", True))
        notes.append(f"Mapped to srpe + gcla (lookback {kwargs['gcla_lookback']}) + dsff {kwargs['intermediate_size']}/"
                     f"{kwargs['dsff_wide_size']} + wiola_rmsnorm; renamed attn/ffn/norm weights to ours.")
        if not lookback:
            notes.append(f"gcla_lookback 0 means 'all previous layers' in the reference: set to {kwargs['gcla_lookback']}.")
        if get("atm_enabled", True):
            notes.append("ATM kept on (causal ATM of this library, active at inference too, so outputs differ from the reference)."
                         if keep_atm else "ATM turned off: the reference never merges in eval mode, so this reproduces its "
                         "inference outputs (pass --keep-atm to train with this library's causal ATM).")
    else:
        heads, hidden = get("num_attention_heads"), get("hidden_size")
        if get("hidden_act", "silu") != "silu":
            raise WiolaError(f"hidden_act {get('hidden_act')!r} is not supported; LLaMA conversion needs 'silu'")
        biased = [name for name in ("attention_bias", "mlp_bias") if get(name)]
        if biased:
            raise WiolaError(f"{' and '.join(biased)} true is not supported: wiola's linear layers have no biases")
        if get("head_dim") is not None and get("head_dim") != hidden // heads:
            raise WiolaError(f"head_dim={get('head_dim')} differs from hidden_size // num_attention_heads = "
                             f"{hidden // heads}; wiola needs head_dim = hidden_size / num_attention_heads")
        kwargs = dict(common, num_key_value_heads=get("num_key_value_heads") or heads, intermediate_size=get("intermediate_size"),
                      rope_theta=_llama_rope_theta(config), position_encoding="rope", attention_gate="none",
                      cross_layer_context="none", token_merging="none", mlp="swiglu", norm="rmsnorm",
                      tie_word_embeddings=get("tie_word_embeddings", False))
        notes.append(f"Mapped to rope (theta {kwargs['rope_theta']:g}) + swiglu {kwargs['intermediate_size']} + rmsnorm, "
                     f"{heads}/{kwargs['num_key_value_heads']} heads; weight names unchanged.")
    notes.append("Head tied to the embeddings." if kwargs["tie_word_embeddings"] else "Untied LM head.")
    return kwargs, notes


# --------------------------------------------------------------------------- weights
def read_weights(src: Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of the checkpoint (single or sharded safetensors, or PyTorch bin) and the files read."""
    from safetensors.torch import load_file

    def load_bin(path: Path) -> dict:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
            raise WiolaError(f"cannot read {path}: {exc}") from None
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise WiolaError(f"{path} is not a state dict of tensors")
        return data

    def load_st(path: Path) -> dict:
        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - header/IO errors from safetensors
            raise WiolaError(f"cannot read {path}: {exc}") from None

    for name, loader in (("model.safetensors", load_st), ("pytorch_model.bin", load_bin)):
        if (src / name).is_file():
            return loader(src / name), name
        index = src / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise WiolaError(f"cannot read the shard index {index}: {exc}") from None
            tensors: dict[str, torch.Tensor] = {}
            for shard in shards:
                if not (src / shard).is_file():
                    raise WiolaError(f"shard {shard} listed in {index.name} is missing from {src}")
                tensors.update(loader(src / shard))
            return tensors, f"{index.name} ({len(shards)} shards)"
    raise WiolaError(f"{src} holds no weights: expected model.safetensors, model.safetensors.index.json "
                     f"or pytorch_model.bin")


def rename_weights(tensors: dict[str, torch.Tensor], kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Source names -> native names; returns the renamed tensors and native -> source name."""
    renamed: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for name, tensor in tensors.items():
        new = name
        if kind == "llama" and re.fullmatch(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", name):
            continue  # a buffer that old transformers versions saved; recomputed from rope_theta
        if kind == "wiola-0.1":
            new = WIOLA01_TOP.get(name, name)
            match = re.fullmatch(r"(model\.layers\.\d+\.)(.+)", name)
            if match:
                for pattern, target in WIOLA01_RENAMES:
                    if re.fullmatch(pattern, match.group(2)):
                        new = match.group(1) + re.sub(pattern, target, match.group(2))
                        break
        renamed[new] = tensor
        origin[new] = name
    return renamed, origin


def _check_weights(tensors: dict, origin: dict, expected: dict) -> None:
    def named(key: str) -> str:
        return key if origin.get(key, key) == key else f"{origin[key]} (-> {key})"

    missing = [key for key in expected if key not in tensors]
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise WiolaError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:8])}{more}")
    unknown = [origin.get(key, key) for key in tensors if key not in expected]
    if unknown:
        more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        raise WiolaError(f"checkpoint has {len(unknown)} tensor(s) this configuration does not use: "
                         f"{', '.join(unknown[:8])}{more}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise WiolaError(f"tensor {named(key)} has shape {list(tensors[key].shape)}, expected {list(shape)} "
                             f"from config.json")


# --------------------------------------------------------------------------- conversion
def load_source_checkpoint(src: str | Path, keep_atm: bool = False):
    """Build a `WiolaForCausalLM` from a source checkpoint folder, in memory; returns `(model, report)`."""
    from wiola.configuration_wiola import WiolaConfig
    from wiola.modeling_wiola import WiolaForCausalLM

    src = Path(src)
    raw = read_source_config(src)
    if raw.get("model_type") == "wiola" and NATIVE_MARKERS & raw.keys() and legacy.needs_upgrade(src):
        return _upgrade_native(src, raw)
    kind = detect_kind(raw)
    kwargs, notes = map_config(raw, kind, keep_atm)
    try:
        config = WiolaConfig(**kwargs)
    except (ValueError, TypeError) as exc:
        raise WiolaError(f"config.json does not describe a valid model: {exc}") from None
    tensors, read_from = read_weights(src)
    tensors, origin = rename_weights(tensors, kind)

    if kind == "wiola-0.1":
        notes += _drop_dead_context(tensors, origin)

    tied = config.tie_word_embeddings
    if tied:
        _untie(tensors, origin)

    model = WiolaForCausalLM(config)
    expected = {key: value.shape for key, value in model.state_dict().items()}
    if tied:
        expected.pop("lm_head.weight", None)
    _check_weights(tensors, origin, expected)
    dtype = tensors["model.embed_tokens.weight"].dtype
    if dtype.is_floating_point and dtype != torch.float32:
        model.to(dtype)
    if tied:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    model.load_state_dict(tensors, strict=True)
    model.tie_weights()
    model.eval()
    report = ConversionReport(kind, raw.get("transformers_version"), model.num_parameters(), len(tensors) - int(tied),
                              notes + [f"Weights read from {read_from} ({str(dtype).removeprefix('torch.')})."])
    return model, report


def _upgrade_native(src: Path, raw: dict):
    """A checkpoint of wiola 0.2.0.dev with the old GCLA layout (see `wiola.legacy`), upgraded."""
    try:
        model = legacy.load_upgraded(src)
    except (ValueError, TypeError, OSError) as exc:
        raise WiolaError(f"cannot upgrade {src}: {exc}") from None
    report = ConversionReport("wiola-0.2-dev", raw.get("transformers_version"), model.num_parameters(),
                              len(model.state_dict()) - int(model.config.tie_word_embeddings),
                              ["Dropped layer 0's unused GCLA tensors and made each blend_logit a 1-element tensor."])
    return model, report


def _drop_dead_context(tensors: dict, origin: dict) -> list[str]:
    """wiola 0.1.x builds GCLA context projections and a blend on layer 0, which has no earlier layer and
    never reads them (docs/architecture.md §2.3); this library does not build them. Drop them, and store φ as a 1-element
    tensor (the reference keeps a scalar)."""
    dropped = legacy.upgrade_state_dict(tensors)
    for key in dropped:
        origin.pop(key, None)
    if not dropped:
        return []
    names = [key.removeprefix("model.layers.0.self_attn.").removesuffix(".weight") for key in dropped]
    return [f"Dropped layer 0's unused GCLA tensors ({', '.join(names)})."]


def _untie(tensors: dict, origin: dict) -> None:
    """A tied checkpoint may store the shared matrix under either name or under both: safetensors'
    `save_model` keeps only `lm_head.weight`, `save_pretrained` only the embeddings, PyTorch .bin files both.
    Leave it under `model.embed_tokens.weight` alone."""
    embed, head = tensors.get("model.embed_tokens.weight"), tensors.get("lm_head.weight")
    if head is None:
        return  # embeddings only (or neither: the missing-tensor check names it)
    if embed is None:
        tensors["model.embed_tokens.weight"] = tensors.pop("lm_head.weight")
        origin["model.embed_tokens.weight"] = origin.pop("lm_head.weight", "lm_head.weight")
        return
    if embed.shape != head.shape:
        raise WiolaError(f"config.json says the head is tied to the embeddings, but the checkpoint's lm_head.weight has "
                         f"shape {list(head.shape)} and model.embed_tokens.weight {list(embed.shape)}")
    if not torch.equal(embed, head):
        raise WiolaError("config.json says the head is tied to the embeddings (tie_word_embeddings), but the checkpoint "
                         "holds different lm_head.weight and model.embed_tokens.weight; set tie_word_embeddings to false "
                         "in its config.json if the head is really separate")
    del tensors["lm_head.weight"]
    origin.pop("lm_head.weight", None)


def _check_destination(src: Path, dst: Path, force: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise WiolaError(f"destination {dst} exists and is not a directory")
    if dst.exists() and dst.resolve() == src.resolve():
        raise WiolaError("destination must differ from the source folder")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise WiolaError(f"destination {dst} is not empty; pass --force (force=True) to overwrite it")


def _recorded(dst: Path) -> set[str]:
    """Names of the files an earlier conversion wrote into `dst` (from its record)."""
    try:
        names = json.loads((dst / RECORD).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {n for n in names if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")}


def write_destination(dst: Path, write) -> list[str]:
    """Fill `dst` through `write(folder)` without ever losing what is there.

    `write` fills a temporary folder next to `dst` (same file system); a failure there (a full
    disk, say) leaves `dst` untouched. Then a new or empty `dst` is replaced by the folder in one
    rename; a non-empty one (--force) gets each new file renamed over the file of the same name,
    and loses only the files an earlier conversion recorded that this one does not write. Files
    the user put there stay. Returns the names written.
    """
    from wiola.train.checkpoint import umask_modes

    dst.parent.mkdir(parents=True, exist_ok=True)
    for stale in dst.parent.glob(f".{dst.name}.convert-*"):  # left by a killed conversion (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.convert-", dir=dst.parent))
    try:
        write(tmp)
        umask_modes(tmp)  # safetensors writes the weights 0600
        created = sorted(p.name for p in tmp.iterdir() if p.is_file())
        (tmp / RECORD).write_text(json.dumps({"files": created}, indent=1) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        if dst.is_dir() and not any(dst.iterdir()):
            dst.rmdir()
        if not dst.exists():
            os.replace(tmp, dst)
            return created
        previous = _recorded(dst)
        for name in created:
            os.replace(tmp / name, dst / name)
        for name in sorted(previous - set(created)):
            path = dst / name
            if path.is_file() and not path.is_symlink():
                path.unlink()
        os.replace(tmp / RECORD, dst / RECORD)
        return created
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert_checkpoint(src: str | Path, dst: str | Path, *, force: bool = False, keep_atm: bool = False,
                       quiet: bool = False):
    """Convert the checkpoint folder `src` (wiola13m 1.0.x, wiola 0.1.x or HF LLaMA) into `dst`.

    Returns the converted `WiolaForCausalLM` (eval mode). Prints a one-paragraph summary unless
    `quiet`. Raises `WiolaError` with a one-line message on any problem with the source or `dst`.
    """
    from transformers import GenerationConfig

    from wiola.data.lock import DirLock

    src, dst = Path(src), Path(dst).expanduser()
    read_source_config(src)  # errors about the source first, then about dst, before any heavy work
    _check_destination(src, dst, force)
    model, report = load_source_checkpoint(src, keep_atm)
    if (src / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(src)
            report.copied.append("generation_config.json")
        except Exception as exc:  # noqa: BLE001 - keep the default generation config
            report.notes.append(f"generation_config.json not copied ({exc}).")

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (src / name).is_file() and not (src / name).is_symlink():
                shutil.copyfile(src / name, folder / name)
                report.copied.append(name)

    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WiolaError(f"cannot create {dst.parent}: {exc.strerror or exc}") from None
    with DirLock(dst.parent / f".{dst.name}.wiola.lock", "wiola convert"):  # one writer per destination
        _check_destination(src, dst, force)  # again, now that no other conversion can write there
        write_destination(dst, write)
    if not quiet:
        print(report.summary(src, dst))
    return model


def convert_command(src: str, dst: str, force: bool = False, keep_atm: bool = False) -> None:
    """Convert a wiola13m 1.0.x, wiola 0.1.x or HF LLaMA checkpoint folder into wiola's format.

    The source kind is detected from SRC/config.json; weights are renamed, shape-checked and saved
    to DST as safetensors with the tokenizer files. See docs/convert.md for the mappings.

    Args:
        src: checkpoint folder to convert (config.json plus model.safetensors, shards or pytorch_model.bin)
        dst: output folder (must be empty or absent unless --force)
        force: write into a non-empty DST: the new files replace files of the same names, files an earlier
            conversion wrote (listed in DST/.wiola-convert.json) are removed, every other file stays.
            The new model is written to a temporary folder first, so a failure leaves DST as it was
        keep_atm: keep a wiola 0.1.x checkpoint's ATM switched on (this library's causal ATM merges at
            inference too, so outputs then differ from the reference, which never merges in eval mode)
    """
    convert_checkpoint(src, dst, force=force, keep_atm=keep_atm)


__all__ = ["convert_checkpoint", "convert_command", "load_source_checkpoint", "detect_kind", "map_config", "ConversionReport"]
