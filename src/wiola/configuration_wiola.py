"""`WiolaConfig`: one flat, serialisable config whose components are chosen by string, and the presets.

Every switch of docs/architecture.md §2 is a string field; `WiolaConfig.from_preset(name, **overrides)` builds the
named sizes of docs/architecture.md §3 and a `llama-` baseline beside each (every novelty off, SwiGLU width matched
to the same parameter budget). Invalid values raise a `ValueError` that lists the valid choices.
"""

from __future__ import annotations


import dataclasses

from transformers import PreTrainedConfig

POSITION_ENCODINGS = ("rope", "spiral", "srpe")
ATTENTION_GATES = ("none", "gsa")
ATM_KERNELS = ("auto", "mask", "flex")
CROSS_LAYER_CONTEXTS = ("none", "gcla")
TOKEN_MERGINGS = ("none", "atm")
MLPS = ("swiglu", "butterfly", "dsff", "gelu", "agu", "f3n")
NORMS = ("rmsnorm", "wiola_rmsnorm", "hln")
F3N_SAMPLINGS = ("none", "step", "layer")
F3N_GATES = ("swiglu", "agu")
PREFILL_ATTENTIONS = ("dense", "delta", "window")  # "window": sinks + sliding window, no correction (a control)

_CHOICES = {
    "position_encoding": POSITION_ENCODINGS,
    "attention_gate": ATTENTION_GATES,
    "cross_layer_context": CROSS_LAYER_CONTEXTS,
    "token_merging": TOKEN_MERGINGS,
    "mlp": MLPS,
    "norm": NORMS,
    "atm_kernel": ATM_KERNELS,
    "f3n_sampling": F3N_SAMPLINGS,
    "f3n_gate": F3N_GATES,
    "prefill_attention": PREFILL_ATTENTIONS,
}


class WiolaConfig(PreTrainedConfig):
    """Configuration of a Wiola decoder. With every novelty off (`rope`, `none`, `none`, `none`,
    `swiglu`, `rmsnorm`) the model is exactly a LLaMA decoder of the same shape."""

    model_type = "wiola"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 32000
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int = 512
    dsff_wide_size: int | None = None
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    use_cache: bool = True
    # components (docs/architecture.md §2)
    position_encoding: str = "rope"
    spiral_alpha: float = 0.05
    srpe_k: float = 8.0
    srpe_amplitude: float = 0.1
    srpe_frequency: float = 0.01
    attention_gate: str = "none"
    gate_pre_rope: bool = True
    cross_layer_context: str = "none"
    gcla_lookback: int = 2
    gcla_gate_init: float = -3.0
    token_merging: str = "none"
    atm_threshold: float = 0.92
    atm_layers: list[int] | None = None
    atm_kernel: str = "auto"  # "flex": FlexAttention over compacted groups; "mask": SDPA/eager with a mask; "auto": flex on CUDA
    mlp: str = "swiglu"
    # the article's components (docs/architecture.md §6): our interpretations, each exactly LLaMA at its neutral setting
    agu_l1: float = 0.0  # weight of the mean |h̃| penalty of AGU gates (mlp=agu, or f3n with f3n_gate=agu)
    agu_sparse_decode: bool = False  # batch-1 decoding skips the zero AGU units' W_up rows / W_down columns (exact;
    # faster on CPU only at high sparsity: docs/article.md)
    f3n_levels: int = 4  # G nested sub-FFNs of widths f/2^(G-g)
    f3n_sampling: str = "none"  # training: "none" (level G), "step" (one level per step), "layer" (one per layer per step)
    f3n_level: int | list[int] | None = None  # inference granularity: one level, or one per layer; None = G
    f3n_gate: str = "swiglu"  # "agu": the AGU threshold on the F3N gate
    norm: str = "rmsnorm"
    # inference only (docs/architecture.md §6.4): sparse prefill with delta correction — sinks S, window W, anchor stride λ (docs/delta.md)
    prefill_attention: str = "dense"
    delta_sink: int = 64
    delta_window: int = 256
    delta_stride: int = 64
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._complete()

    def _complete(self) -> None:
        """Derive the defaults that depend on other fields, then validate."""
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.mlp == "dsff" and self.dsff_wide_size is None:
            self.dsff_wide_size = 4 * self.hidden_size
        self.check()

    def check(self) -> None:
        """Raise a `ValueError` naming the first invalid value or shape."""
        for field, choices in _CHOICES.items():
            value = getattr(self, field)
            if value not in choices:
                raise ValueError(f"{field}={value!r} is not valid; choose one of: {', '.join(choices)}")
        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} does not divide hidden_size={self.hidden_size}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} does not divide num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            raise ValueError(f"head_dim={self.head_dim} must equal hidden_size // num_attention_heads = {self.hidden_size // self.num_attention_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} is odd; rotary encodings need an even head dimension")
        if self.gcla_lookback < 1:
            raise ValueError(f"gcla_lookback must be >= 1, got {self.gcla_lookback}")
        for name in ("attention_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.atm_layers is not None:
            bad = [i for i in self.atm_layers if not 0 <= i < self.num_hidden_layers]
            if bad:
                raise ValueError(f"atm_layers {bad} are outside 0..{self.num_hidden_layers - 1}")
        for name, low in (("delta_sink", 0), ("delta_window", 1), ("delta_stride", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.mlp == "dsff" and (self.dsff_wide_size or 0) <= 0:
            raise ValueError(f"dsff_wide_size must be a positive integer, got {self.dsff_wide_size!r}")
        if not isinstance(self.agu_l1, (int, float)) or isinstance(self.agu_l1, bool) or not self.agu_l1 >= 0:
            raise ValueError(f"agu_l1 must be a number >= 0, got {self.agu_l1!r}")
        if not isinstance(self.f3n_levels, int) or isinstance(self.f3n_levels, bool) or self.f3n_levels < 1:
            raise ValueError(f"f3n_levels must be a positive integer, got {self.f3n_levels!r}")
        if self.mlp == "f3n":
            self.f3n_layer_levels()  # validates f3n_level

    def f3n_layer_levels(self) -> list[int]:
        """The inference level of every layer (`f3n_level` expanded; G when unset)."""
        level, n, g = self.f3n_level, self.num_hidden_layers, self.f3n_levels
        levels = [g] * n if level is None else [level] * n if not isinstance(level, (list, tuple)) else list(level)
        if len(levels) != n:
            raise ValueError(f"f3n_level lists {len(levels)} levels for {n} layers; give one level, or one per layer")
        for v in levels:
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= g:
                raise ValueError(f"f3n_level {v!r} is outside 1..{g} (f3n_levels={g})")
        return levels

    def f3n_widths(self) -> list[int]:
        """Hidden units of F3N levels 1..G: m_g = f / 2^(G−g), rounded to a multiple of 8 (at least 8, at most f),
        m_G = f (docs/architecture.md §6.2)."""
        f, g = self.intermediate_size, self.f3n_levels
        return [f if level == g else min(f, max(8, 8 * round(f / 2 ** (g - level) / 8))) for level in range(1, g + 1)]

    @property
    def merge_layers(self) -> list[int]:
        """Indices of the layers where ATM is active (docs/architecture.md §2.3: ⌊L/3⌋ ≤ i < ⌊2L/3⌋ by default)."""
        if self.token_merging != "atm":
            return []
        if self.atm_layers is not None:
            return sorted(set(self.atm_layers))
        n = self.num_hidden_layers
        return list(range(n // 3, (2 * n) // 3))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "WiolaConfig":
        """Build a named preset (see `list_presets()`), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


if not dataclasses.is_dataclass(PreTrainedConfig):  # transformers releases before dataclass configs (5.0 …)
    _BASE_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings")

    def _init(self, **kwargs):
        for name in WiolaConfig.__annotations__:
            value = kwargs.pop(name, getattr(WiolaConfig, name))
            if name in _BASE_FIELDS:
                kwargs[name] = value  # the base class sets these itself
            else:
                setattr(self, name, list(value) if isinstance(value, list) else value)
        PreTrainedConfig.__init__(self, **kwargs)
        self._complete()

    WiolaConfig.__init__ = _init


_SEED = dict(position_encoding="spiral", attention_gate="gsa", cross_layer_context="none", token_merging="none", mlp="butterfly", norm="rmsnorm", max_position_embeddings=1024)
_PAPER = dict(position_encoding="srpe", attention_gate="none", cross_layer_context="gcla", token_merging="atm", mlp="dsff", norm="wiola_rmsnorm", max_position_embeddings=2048)

PRESETS: dict[str, dict] = {
    "wiola-nano": dict(_SEED, hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, intermediate_size=512),
    "wiola-micro": dict(_SEED, hidden_size=384, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=12, intermediate_size=768),
    "wiola-small": dict(_SEED, hidden_size=512, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16, intermediate_size=1024),
    "wiola-120m": dict(_PAPER, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, intermediate_size=768, dsff_wide_size=3072),
    "wiola-360m": dict(_PAPER, hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, intermediate_size=1024, dsff_wide_size=4096),
    "wiola-700m": dict(_PAPER, hidden_size=1536, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8, intermediate_size=1536, dsff_wide_size=6144),
    "wiola-1.5b": dict(_PAPER, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, intermediate_size=2048, dsff_wide_size=8192),
    # the news article's 1.3B (docs/architecture.md §6.5): the paper's components, and the same shape with the article's
    "wiola-1.3b": dict(_PAPER, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8, intermediate_size=2048, dsff_wide_size=8192),
    "wiola-1.3b-article": dict(_PAPER, mlp="f3n", f3n_gate="agu", norm="hln", hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8, intermediate_size=8192),
    # issue 28's result (docs/results.md): the paper's components with SwiGLU in place of the Dual-Stream FFN; width 3328
    # holds wiola-120m's FFN weights exactly (3·768·3328 = 3·768² + 2·768·3072 + 2·768² per layer)
    "wiola-120m-swiglu": dict(_PAPER, mlp="swiglu", hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, intermediate_size=3328),
}


def count_parameters(config: WiolaConfig) -> int:
    """Parameter count of the model `config` builds, from the shapes alone (tied embeddings counted once)."""
    d, h, kv, dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    attn = d * h * dh * 2 + d * kv * dh * 2
    if config.attention_gate == "gsa":
        attn += h * dh + h * h + h
    context = 0
    if config.cross_layer_context == "gcla":
        attn += d * h * dh  # the output gate, on every layer
        context = (config.num_hidden_layers - 1) * (2 * d * kv * dh + 1)  # W_kc, W_vc and φ from layer 1 on
    w = config.intermediate_size
    mlp = {
        "swiglu": 3 * d * w,
        "gelu": 2 * d * w,
        "butterfly": d * 2 * w + d * w + w * d,
        "dsff": 3 * d * w + 2 * d * (config.dsff_wide_size or 0) + 2 * d * d,
        "agu": 3 * d * w + d + 2,  # + the threshold: w_τ, b_τ, β
        "f3n": 3 * d * w + (d + 2 if config.f3n_gate == "agu" else 0),
    }[config.mlp]
    norm = {"rmsnorm": d, "wiola_rmsnorm": 2 * d, "hln": d + 2}[config.norm]
    embed = config.vocab_size * d * (1 if config.tie_word_embeddings else 2)
    return embed + config.num_hidden_layers * (attn + mlp + 2 * norm) + context + norm


def llama_baseline(config: "WiolaConfig") -> "WiolaConfig":
    """The LLaMA twin of `config`: same shape, every novelty off, SwiGLU width matched to its parameter budget."""
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings", "initializer_range", "attention_dropout", "hidden_dropout", "bos_token_id", "eos_token_id", "pad_token_id")
    target = count_parameters(config)
    return WiolaConfig(**_llama_baseline({k: getattr(config, k) for k in keep}, target))


def _llama_baseline(preset: dict, target: int | None = None) -> dict:
    """Same shape with every novelty off; SwiGLU width chosen (multiple of 8) to match the parameter budget."""
    target = count_parameters(WiolaConfig(**preset)) if target is None else target
    base = dict(preset, position_encoding="rope", attention_gate="none", cross_layer_context="none", token_merging="none", mlp="swiglu", norm="rmsnorm", dsff_wide_size=None, intermediate_size=8)
    per_width = 3 * preset["hidden_size"] * preset["num_hidden_layers"]
    missing = target - count_parameters(WiolaConfig(**base))
    base["intermediate_size"] = 8 + 8 * round(missing / per_width / 8)
    return base


for _name in list(PRESETS):
    PRESETS["llama-" + _name.split("-", 1)[1]] = _llama_baseline(PRESETS[_name])
# what the article compares its 1.3B with: the shape of LLaMA 3.2 3B, with this vocabulary and context
PRESETS["llama-3b"] = dict(position_encoding="rope", attention_gate="none", cross_layer_context="none", token_merging="none", mlp="swiglu", norm="rmsnorm",
                           max_position_embeddings=2048, hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, intermediate_size=8192)


def flops_per_token(config: WiolaConfig, context: int | None = None, sparsity: float = 0.0, f3n_level: int | list[int] | None = None) -> int:
    """Inference FLOPs per token, Kaplan et al. (2020)'s count: 2 × (weights multiplied per token, LM head
    included, embedding lookup not) + 2·L·T·d_attn for the attention scores and their weighted sum at
    context T (default: the config's `max_position_embeddings`), d_attn = H·d_h. GCLA adds its context
    projections and attention over the Λ layer summaries; ATM layers are counted unmerged (μ = 0).
    `sparsity` is the share of zero AGU units (their W_up rows and W_down columns are skipped); `f3n_level`
    (one, or one per layer; default `config.f3n_level`, else G) picks the F3N width."""
    d, h, kv, dh, n = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.num_hidden_layers
    t = config.max_position_embeddings if context is None else context
    w = config.intermediate_size
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if config.mlp == "f3n":
        levels = WiolaConfig(**{**config.to_dict(), "f3n_level": f3n_level}).f3n_layer_levels() if f3n_level is not None else config.f3n_layer_levels()
        widths = [config.f3n_widths()[g - 1] for g in levels]
    else:
        widths = [w] * n
    total = d * config.vocab_size  # LM head
    for i, m in enumerate(widths):
        attn = 2 * d * h * dh + 2 * d * kv * dh
        if config.attention_gate == "gsa":
            attn += dh * h + h * h
        if config.cross_layer_context == "gcla":
            attn += d * h * dh  # output gate
            if i > 0:
                views = min(i, config.gcla_lookback)
                attn += views * 2 * d * kv * dh + views * 2 * h * dh  # context K/V projections + q·k, p·v over Λ
        gated = config.mlp == "agu" or (config.mlp == "f3n" and config.f3n_gate == "agu")
        mlp = {
            "swiglu": 3 * d * w, "gelu": 2 * d * w, "butterfly": 4 * d * w,
            "dsff": 3 * d * w + 2 * d * (config.dsff_wide_size or 0) + 2 * d * d,
        }.get(config.mlp, 0)
        if config.mlp in ("agu", "f3n"):
            mlp = d * m + round((1.0 - sparsity) * 2 * d * m) if gated else 3 * d * m
            mlp += d if gated else 0
        total += attn + mlp
    return int(2 * total + 2 * n * t * h * dh)


def list_presets() -> dict[str, int]:
    """Preset names mapped to their real parameter counts."""
    return {name: count_parameters(WiolaConfig.from_preset(name)) for name in PRESETS}


def components_summary(config: WiolaConfig) -> str:
    """The preset table's components column: every switch not at `none`, the MLP with its width(s)."""
    mlp = f"{config.mlp} {config.intermediate_size}"
    if config.mlp == "dsff":
        mlp += f"/{config.dsff_wide_size}"
    elif config.mlp == "f3n":
        mlp += f" ({config.f3n_gate} gate, {config.f3n_levels} levels)"
    parts = [config.position_encoding, config.attention_gate, config.cross_layer_context, config.token_merging, mlp, config.norm]
    return " + ".join(part for part in parts if part != "none")


def presets_table(context: int | None = None, sparsity: float = 0.0) -> list[str]:
    """The Markdown table of the named presets that `wiola presets` prints and README.md shows, one line a row."""
    lines = ["| preset | params | GFLOPs/token | d | L | H / H_kv | context | components |",
             "|---|---:|---:|---|---|---|---:|---|"]
    for name, params in list_presets().items():
        c = WiolaConfig.from_preset(name)
        flops = flops_per_token(c, context, sparsity) / 1e9
        lines.append(f"| `{name}` | {params:,} | {flops:.3f} | {c.hidden_size} | {c.num_hidden_layers} | "
                     f"{c.num_attention_heads} / {c.num_key_value_heads} | {c.max_position_embeddings:,} | {components_summary(c)} |")
    return lines


def presets_command(context: int | None = None, sparsity: float = 0.0) -> None:
    """List the named presets with their components, real parameter counts and inference FLOPs per token.

    Prints a Markdown table, the one in README.md (tests/test_readme.py holds them equal).

    Args:
        context: context length T of the attention term of the FLOPs (default: each preset's own context).
        sparsity: share of zero AGU units assumed for the FLOPs of AGU models (default 0: dense).
    """
    print("\n".join(presets_table(context, sparsity)))
    print("\nFLOPs/token = 2 × weights multiplied per token (LM head included) + 2·L·T·H·d_h, T = context"
          + (f" {context}" if context else " of each preset") + (f"; AGU sparsity {sparsity:g}" if sparsity else "") + " (Kaplan et al. 2020).")


__all__ = ["WiolaConfig", "PRESETS", "list_presets", "count_parameters", "flops_per_token", "llama_baseline"]
