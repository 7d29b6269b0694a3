"""Training options and model-config resolution for `wiola train`.

Two things are resolved here, before any tensor exists:

* `TrainConfig`, the typed training options. They are layered: built-in defaults, then
  the checkpoint's options when resuming, then a config file's `train:` section, then the
  options given on the command line (later layers win; `None` means "not given").
* the model config: a preset name (`WiolaConfig.from_preset`), a JSON/YAML file (a flat
  dict of config fields, optionally with `"preset"` or `"model_type"`, or a file with
  `model:` and `train:` sections) or a checkpoint directory, plus `--set key=value`
  overrides. `build_model` turns the config into a freshly initialised causal LM; it is
  the only place that knows which model class is used.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from wiola.errors import WiolaError, check_seed

# Keys of a config's to_dict() that describe the saved file rather than the architecture.
NON_ARCH_KEYS = frozenset(
    {
        "transformers_version",
        "architectures",
        "dtype",
        "torch_dtype",
        "_name_or_path",
        "auto_map",
        "use_cache",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "id2label",
        "label2id",
        "problem_type",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
    }
)


@dataclass
class TrainConfig:
    """Every training option of `wiola train`; field docs are in `train_command`."""

    max_steps: int = 1000
    batch_size: int = 32
    micro_batch_size: int | None = None
    seq_len: int | None = None
    lr: float = 6e-4
    min_lr: float | None = None
    warmup_steps: int | None = None
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_batches: int = 10
    log_every: int = 10
    save_every: int = 500
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    document_mask: bool = False
    distributed: str = "ddp"
    tensorboard: bool = True
    threads: int | None = None  # torch intra-op CPU threads per process (None: physical cores / local processes)
    dist_timeout: float = 1800.0  # seconds a collective waits for the other processes before the run fails
    # fine-tuning (wiola.finetune): start weights, and LoRA adapters instead of full training
    init_from: str | None = None
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None

    # Options that fix which tokens each step sees; they cannot change across a resume.
    DATA_LAYOUT = ("batch_size", "seq_len", "seed", "document_mask")
    # Options that fix which parameters exist and what they start from; also fixed across a resume.
    MODEL_LAYOUT = ("init_from", "lora", "lora_rank", "lora_targets")

    @classmethod
    def layered(cls, *layers: dict[str, Any] | None) -> "TrainConfig":
        """Build from dicts of options, later ones winning; `None` values are skipped."""
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for layer in layers:
            for key, value in (layer or {}).items():
                if key not in known:
                    raise WiolaError(f"unknown training option {key!r}{_suggest(key, known)}")
                if value is not None:
                    values[key] = value
        return cls(**values)

    def finalize(self, world_size: int, max_positions: int) -> "TrainConfig":
        """Fill derived defaults and check that the options fit together."""
        cfg = dataclasses.replace(self)
        if cfg.seq_len is None:
            cfg.seq_len = max_positions
        if cfg.min_lr is None:
            cfg.min_lr = cfg.lr / 10
        if cfg.warmup_steps is None:
            cfg.warmup_steps = min(100, cfg.max_steps // 10)
        if cfg.micro_batch_size is None:
            cfg.micro_batch_size = max(1, cfg.batch_size // world_size)
        positive = ("max_steps", "batch_size", "micro_batch_size", "seq_len", "eval_every", "log_every", "save_every")
        for name in positive:
            if getattr(cfg, name) <= 0:
                raise WiolaError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
        if cfg.seq_len > max_positions:
            raise WiolaError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings {max_positions}")
        if cfg.batch_size % (cfg.micro_batch_size * world_size):
            raise WiolaError(
                f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch-size {cfg.micro_batch_size}"
                f" x {world_size} process(es)"
            )
        if cfg.schedule not in ("cosine", "wsd", "constant"):
            raise WiolaError(f"--schedule must be cosine, wsd or constant, got {cfg.schedule!r}")
        if not 0 < cfg.decay_fraction <= 1:
            raise WiolaError(f"--decay-fraction must be in (0, 1], got {cfg.decay_fraction}")
        if cfg.distributed not in ("ddp", "fsdp"):
            raise WiolaError(f"--distributed must be ddp or fsdp, got {cfg.distributed!r}")
        if cfg.dtype not in ("auto", "fp32", "bf16"):
            raise WiolaError(f"--dtype must be auto, fp32 or bf16, got {cfg.dtype!r}")
        if not (cfg.lr > 0 and math.isfinite(cfg.lr)) or cfg.min_lr < 0 or cfg.min_lr > cfg.lr:
            raise WiolaError(f"need 0 <= --min-lr <= --lr and --lr > 0 (got lr={cfg.lr}, min_lr={cfg.min_lr})")
        if cfg.lora and (cfg.lora_rank <= 0 or cfg.lora_alpha <= 0 or not 0 <= cfg.lora_dropout < 1):
            raise WiolaError(f"--lora needs --lora-rank > 0, --lora-alpha > 0 and --lora-dropout in [0, 1) "
                             f"(got {cfg.lora_rank}, {cfg.lora_alpha}, {cfg.lora_dropout})")
        check_threads(cfg.threads)
        check_dist_timeout(cfg.dist_timeout)
        check_seed(cfg.seed)  # also a config file's train: seed
        if cfg.lora and not cfg.init_from:
            raise WiolaError("--lora trains adapters on trained weights: give the base model with --init-from DIR")
        return cfg

    def grad_accum_steps(self, world_size: int) -> int:
        assert self.micro_batch_size is not None
        return self.batch_size // (self.micro_batch_size * world_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_threads(threads: Any) -> None:
    """--threads: None (the default choice) or a positive integer."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads <= 0):
        raise WiolaError(f"--threads must be a positive integer, got {threads!r}")


def check_dist_timeout(seconds: Any) -> None:
    """--dist-timeout: a positive, finite number of seconds."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (0 < seconds < math.inf):
        raise WiolaError(f"--dist-timeout must be a positive number of seconds, got {seconds!r}")


def _suggest(name: str, choices: Any) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`["hidden_size=64", "mlp=swiglu", "atm_layers=[1,2]"]` -> typed dict (JSON values, else strings)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise WiolaError(f"--set expects key=value, got {item!r}")
        out[key] = _parse_value(raw.strip())
    return out


def _parse_value(raw: str) -> Any:
    python_words = {"True": True, "False": False, "None": None}
    if raw in python_words:
        return python_words[raw]
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a JSON or YAML mapping."""
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:  # pragma: no cover - pyyaml ships with transformers' deps
            raise WiolaError("reading YAML configs needs PyYAML (pip install pyyaml)") from exc
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WiolaError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise WiolaError(f"{path}: expected a mapping of config fields at the top level")
    return data


def split_config_source(config: str) -> tuple[str | dict[str, Any], dict[str, Any]]:
    """Return (model spec, training options) for the `config` argument of `wiola train`.

    The model spec is a preset name or a dict of config fields (which may name a "preset"
    or a "model_type").
    """
    path = Path(config)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WiolaError(f"{path} is a directory without config.json")
        return read_config_file(path / "config.json"), {}
    if path.is_file():
        data = read_config_file(path)
        if "model" in data or "train" in data:
            unknown = set(data) - {"model", "train"}
            if unknown:
                raise WiolaError(f"{path}: with model/train sections, unexpected top-level keys {sorted(unknown)}")
            model = data.get("model") or {}
            train = data.get("train") or {}
            if not isinstance(model, (str, dict)) or not isinstance(train, dict):
                raise WiolaError(f"{path}: 'model' must be a preset name or a mapping, 'train' a mapping")
            return model, train
        return data, {}
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        raise FileNotFoundError(f"config file not found: {path}")
    return config, {}


def _wiola_config_class() -> type | None:
    try:
        import wiola

        return getattr(wiola, "WiolaConfig", None)
    except ImportError:  # pragma: no cover
        return None


def make_model_config(spec: str | dict[str, Any], overrides: dict[str, Any] | None = None):
    """Resolve a preset name or a dict of fields plus overrides into a transformers config."""
    from transformers import AutoConfig, LlamaConfig

    overrides = dict(overrides or {})
    fields_: dict[str, Any] = {}
    preset: str | None = None
    if isinstance(spec, str):
        preset = spec
    else:
        fields_ = {k: v for k, v in spec.items() if k not in NON_ARCH_KEYS}
        preset = fields_.pop("preset", None)
    fields_.update(overrides)
    wiola_config = _wiola_config_class()
    model_type = fields_.pop("model_type", None)

    if preset is not None:
        if wiola_config is None:
            raise WiolaError(
                f"preset {preset!r} needs the wiola model code (wiola.configuration_wiola), which is not installed;"
                " pass a config JSON/YAML file instead"
            )
        import wiola

        presets = list(wiola.list_presets())
        if preset not in presets:
            raise WiolaError(f"unknown preset {preset!r}{_suggest(preset, presets)}; presets: {', '.join(presets)}")
        base_cls = wiola_config
    elif model_type is not None and model_type != getattr(wiola_config, "model_type", None):
        try:
            base_cls = type(AutoConfig.for_model(model_type))
        except ValueError as exc:
            raise WiolaError(f"unknown model_type {model_type!r}") from exc
    else:
        base_cls = wiola_config or LlamaConfig

    defaults = base_cls().to_dict()
    known = set(defaults)
    for key in fields_:
        if key not in known:
            raise WiolaError(f"unknown model config field {key!r} for {base_cls.__name__}{_suggest(key, known)}")
        fields_[key] = check_field(key, fields_[key], defaults[key])
    try:
        if preset is not None:
            return base_cls.from_preset(preset, **fields_)
        return base_cls(**fields_)
    except (TypeError, ValueError) as exc:
        raise WiolaError(f"invalid model config: {exc}") from exc


# float fields that must be strictly positive (a zero or negative value only shows up later as NaN)
POSITIVE_FLOATS = frozenset({"rms_norm_eps", "rope_theta", "layer_norm_eps", "norm_eps"})


def check_field(key: str, value: Any, default: Any) -> Any:
    """`value` for model config field `key`, checked against the type of its default (None always passes).

    Booleans must be booleans, integers integers (not `true`), floats finite numbers; the
    epsilon and rope base must be positive. Returns the value (an int given for a float as a float).
    """
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise WiolaError(f"model config field {key} must be true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise WiolaError(f"model config field {key} must be an integer, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise WiolaError(f"model config field {key} must be a finite number, got {value!r}")
        value = float(value)
        if key in POSITIVE_FLOATS and value <= 0:
            raise WiolaError(f"model config field {key} must be positive, got {value!r}")
    return value


def architecture_dict(config) -> dict[str, Any]:
    """The fields of a config that define the network (for comparing configs on resume)."""
    return {k: v for k, v in config.to_dict().items() if k not in NON_ARCH_KEYS}


def config_differences(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable `field: saved -> new` lines for every differing architecture field."""
    saved = {k: v for k, v in saved.items() if k not in NON_ARCH_KEYS}
    new = {k: v for k, v in new.items() if k not in NON_ARCH_KEYS}
    missing = object()
    lines = []
    for key in sorted(set(saved) | set(new)):
        a, b = saved.get(key, missing), new.get(key, missing)
        if a != b:
            fmt = lambda v: "(unset)" if v is missing else json.dumps(v)  # noqa: E731
            lines.append(f"{key}: checkpoint {fmt(a)} vs requested {fmt(b)}")
    return lines


def build_model(config):
    """A freshly initialised causal LM for `config` (float32 weights, RNG from torch's global seed).

    The Auto class picks `WiolaForCausalLM` for a WiolaConfig once `wiola` is imported (it
    registers the model type), or the matching transformers class (e.g. LLaMA baselines).
    """
    import torch
    from transformers import AutoModelForCausalLM

    import wiola  # noqa: F401  (registers model_type="wiola" when the model code is present)

    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
