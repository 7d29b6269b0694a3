"""Wiola decoder: attention (GQA + GSA gate + GCLA context + ATM merging), decoder layer, `WiolaModel`
and `WiolaForCausalLM` (docs/architecture.md §1–§4).

Attention goes through `scaled_dot_product_attention` (config `attn_implementation="sdpa"`, default) or an
eager softmax kept as the reference (`"eager"`); both take the same boolean masks. Positions count real
(non-padding) tokens from 0, so a left-padded row computes exactly what it computes alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .cache_wiola import WiolaCache, WiolaCacheLayer, WiolaStaticCache
from .compat_wiola import CACHE_KWARG, kwargs_cache, output_cache, pick_cache
from .components_wiola import AdaptiveThreshold, GatedUnitsMLP, HierarchicalNorm, WiolaRMSNorm, WiolaRotaryEmbedding, apply_rotary, attend, build_mlp, build_norm, repeat_kv, rotary_table, segment_first
from .configuration_wiola import WiolaConfig
from .delta_wiola import delta_prefill
from .merging_wiola import merged_attention


@dataclass
class WiolaModelOutput(BaseModelOutputWithPast):
    """`merge_ratios`: per ATM layer index, μ = 1 − T'/T of this forward (batch mean, a 0-d tensor).
    `activation_sparsity`: per AGU layer index, the share of zero gate units over real tokens (0-d tensor).
    `f3n_levels`: the F3N level each layer ran in a training forward with sampled levels ([L] long).
    `aux_loss`: `agu_l1` × the mean over AGU layers of `mean |h̃|` (training forwards with `agu_l1 > 0`),
    averaged over positions; `aux_tokens`: the same per position ([B, T]), which `WiolaForCausalLM` averages
    over the labelled positions instead."""

    merge_ratios: dict | None = None
    activation_sparsity: dict | None = None
    f3n_levels: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    aux_tokens: torch.Tensor | None = None


@dataclass
class WiolaCausalLMOutput(CausalLMOutputWithPast):
    """`loss` includes `aux_loss` (the AGU penalty) when labels are given."""

    merge_ratios: dict | None = None
    activation_sparsity: dict | None = None
    f3n_levels: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


@dataclass
class StepInfo:
    """Per-forward facts shared by every layer (computed once in `WiolaModel.forward`)."""

    real: torch.Tensor  # [B, T] bool, real (non-padding) new tokens
    cum_real: torch.Tensor  # [B, T] long, real tokens up to and including t, cached prefix included
    count: torch.Tensor  # [B, T, 1] fp32, cum_real clamped to ≥1: the divisor of every causal mean
    padded: bool  # some token (new or cached) is padding
    mask: torch.Tensor | None  # [B or 1, 1, T, S] bool for plain layers, or None
    is_causal: bool  # plain layers: no mask needed beyond plain causality
    doc_first: torch.Tensor | None = None  # packed rows: [B, T] position where each token's document starts
    f3n_levels: torch.Tensor | None = None  # training with sampled F3N levels: [L] long, the level of each layer
    key_real: torch.Tensor | None = None  # [B, cached + T] bool, real keys (sparse prefill reads it)

    def running_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Causal running sums of `x` [B, T, n] along T; in a packed row they restart at each document."""
        if x.shape[1] == 1:
            return x
        total = x.cumsum(dim=1)
        if self.doc_first is None:
            return total
        before = torch.cat([torch.zeros_like(total[:, :1]), total[:, :-1]], dim=1)  # sums up to t - 1
        return total - before.gather(1, self.doc_first[..., None].expand(-1, -1, x.shape[-1]))


def _split_heads(y: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, H·d_h] → [B, H, T, d_h]; for one token [B, 1, H·d_h] already is [B, H, 1, d_h] in memory, so a view
    does it (the same values, and no Transpose node in the exported decode step)."""
    b, t, _ = y.shape
    return y.view(b, heads, 1, -1) if t == 1 else y.view(b, t, heads, -1).transpose(1, 2)


def _merge_heads(out: torch.Tensor) -> torch.Tensor:
    """[B, H, T, d_h] → [B, T, H·d_h]; for one token a reshape (the same values, no Transpose node when exported)."""
    b, _, t, _ = out.shape
    return out.reshape(b, 1, -1) if t == 1 else out.transpose(1, 2).reshape(b, t, -1)


class WiolaAttention(nn.Module):
    """Grouped-query attention with the optional GSA gate (folded into the queries), GCLA context
    attention with a learned blend and output gate, and ATM key/value merging."""

    def __init__(self, config: WiolaConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        d, self.num_heads, self.num_kv_heads, self.head_dim = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.n_rep = self.num_heads // self.num_kv_heads
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        self.gated = config.attention_gate == "gsa"
        if self.gated:
            self.gate_fc1 = nn.Linear(self.head_dim, self.num_heads, bias=False)
            self.gate_fc2 = nn.Linear(self.num_heads, self.num_heads, bias=True)
        self.cross_layer = config.cross_layer_context == "gcla"
        # layer 0 has no earlier layer to read: no context projections and no blend (they could never learn)
        self.has_context = self.cross_layer and layer_idx > 0
        if self.cross_layer:
            self.output_gate_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        if self.has_context:
            self.k_ctx_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
            self.v_ctx_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
            # φ as a 1-element tensor, not a scalar: FSDP2 cannot shard 0-d parameters
            self.blend_logit = nn.Parameter(torch.full((1,), float(config.gcla_gate_init)))
        self.merging = layer_idx in config.merge_layers and config.atm_threshold < 1.0
        # plain attributes: reading a transformers config field costs microseconds on every decode step
        self.gate_pre_rope, self.attention_dropout = config.gate_pre_rope, config.attention_dropout
        self.atm_threshold, self.atm_kernel = config.atm_threshold, config.atm_kernel
        # sparse prefill with delta correction (S, W, λ); ATM layers always attend densely over their groups
        use_delta = config.prefill_attention != "dense" and not self.merging
        self.delta = (config.delta_sink, config.delta_window, config.delta_stride) if use_delta else None
        self.delta_correct = config.prefill_attention == "delta"  # "window": the uncorrected control

    def _gate(self, m: torch.Tensor, step: StepInfo, cache: WiolaCacheLayer | None) -> torch.Tensor:
        """GSA: g_t = σ(W2 SiLU(W1 c_t) + b2), c_t the causal mean of head-mean queries over real tokens."""
        if step.padded:
            m = m * step.real[..., None]
        running = step.running_sum(m)
        if cache is not None:
            running = cache.accumulate("gsa_sum", running)
        c = (running / step.count).to(self.gate_fc1.weight.dtype)
        g = torch.sigmoid(F.linear(F.silu(F.linear(c, self.gate_fc1.weight)), self.gate_fc2.weight, self.gate_fc2.bias))
        return g.transpose(1, 2)[..., None]  # [B, H, T, 1]

    def _context(self, q: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """GCLA: per head, softmax over the ≤Λ layer summaries with the rotated query."""
        b, t, n, _ = context.shape
        kc = self.k_ctx_proj(context).view(b, t, n, self.num_kv_heads, self.head_dim).to(q.dtype)
        vc = self.v_ctx_proj(context).view(b, t, n, self.num_kv_heads, self.head_dim).to(q.dtype)
        if t == 1:  # decoding: the same sums as two batched matmuls (onnxruntime runs a MatMul ~3× faster than an Einsum)
            qg = q.reshape(b, self.num_kv_heads, self.n_rep, self.head_dim)
            scores = torch.matmul(qg, kc[:, 0].permute(0, 2, 3, 1)) * self.head_dim**-0.5  # [B, G, R, N]
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            return torch.matmul(probs, vc[:, 0].transpose(1, 2)).reshape(b, self.num_heads, 1, self.head_dim)
        # query head h = g·n_rep + r reads kv head g: group the queries instead of repeating the keys
        qg = q.view(b, self.num_kv_heads, self.n_rep, t, self.head_dim)
        scores = torch.einsum("bgrtd,btngd->bgrtn", qg, kc) * self.head_dim**-0.5
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return torch.einsum("bgrtn,btngd->bgrtd", probs, vc).reshape(b, self.num_heads, t, self.head_dim)

    def forward(self, x, cos, sin, step: StepInfo, context=None, cache: WiolaCacheLayer | None = None):
        b, t, _ = x.shape
        q = _split_heads(self.q_proj(x), self.num_heads)
        m = q.float().mean(dim=1) if self.gated and self.gate_pre_rope else None  # head mean, [B, T, d_h]
        k = _split_heads(self.k_proj(x), self.num_kv_heads)
        v = _split_heads(self.v_proj(x), self.num_kv_heads)
        if t == 1:  # decoding: one rotation over q and k together (fewer tiny ops; the same arithmetic)
            q, k = apply_rotary(torch.cat([q, k], dim=1), cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.gated:
            q_self = q * self._gate(q.float().mean(dim=1) if m is None else m, step, cache).to(q.dtype)
        else:
            q_self = q
        implementation = "eager" if self.config._attn_implementation == "eager" else "sdpa"
        dropout = self.attention_dropout if self.training else 0.0
        if self.merging:
            kernel = self.atm_kernel
            if kernel == "auto":
                kernel = "flex" if x.device.type == "cuda" else "mask"
            out, merged = merged_attention(q_self, k, v, x, step.real, self.atm_threshold, self.n_rep, implementation, dropout, cache, kernel, step.doc_first)
        else:
            merged = None
            if cache is not None:
                k, v = cache.update(k, v)
            k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
            out = None
            if self.delta is not None and t > 1 and not self.training and step.doc_first is None:
                out = delta_prefill(q_self, k, v, step.key_real, step.real, step.cum_real, *self.delta, implementation, correct=self.delta_correct)
            if out is None:
                out = attend(q_self, k, v, step.mask, step.is_causal, implementation, dropout)
        if self.cross_layer:
            if context is not None and self.has_context:
                beta = torch.sigmoid(self.blend_logit.float()).to(out.dtype)
                out = (1.0 - beta) * out + beta * self._context(q, context)
            out = _merge_heads(out)
            out = torch.sigmoid(self.output_gate_proj(x)) * out
        else:
            out = _merge_heads(out)
        return self.o_proj(out), merged


class WiolaDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: WiolaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = build_norm(config, "hln_in")
        self.self_attn = WiolaAttention(config, layer_idx)
        self.post_attention_layernorm = build_norm(config, "hln_post")
        self.mlp = build_mlp(config, layer_idx)
        self.mlp_reports = config.mlp in ("agu", "f3n")  # returns (out, zero share, L1 penalty)
        self.dropout = config.hidden_dropout

    def forward(self, hidden_states, cos, sin, step, context=None, cache=None, past_key_values=None):
        # the cache arrives under the name the installed transformers uses (gradient checkpointing drops it by name)
        cache = pick_cache(cache, past_key_values)
        cache = cache.layers[self.layer_idx] if cache is not None else None
        attn, merged = self.self_attn(self.input_layernorm(hidden_states, step, cache), cos, sin, step, context, cache)
        if self.dropout:  # residual dropout (nanoGPT style) on both branches; skipped entirely at p = 0
            attn = F.dropout(attn, self.dropout, self.training)
        hidden_states = hidden_states + attn
        normed = self.post_attention_layernorm(hidden_states, step, cache)
        if self.mlp_reports:
            mlp, zero_share, l1 = self.mlp(normed, step)
        else:
            mlp, zero_share, l1 = self.mlp(normed), None, None
        if self.dropout:
            mlp = F.dropout(mlp, self.dropout, self.training)
        # flat outputs: reentrant checkpointing tracks gradients only of tensors at the top level
        return hidden_states + mlp, merged, zero_share, l1


class WiolaPreTrainedModel(PreTrainedModel):
    config_class = WiolaConfig
    config: WiolaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["WiolaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _is_stateful = False  # the WiolaCache crops exactly (from recorded history): assisted decoding works

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return True  # attention reads `config._attn_implementation` on every call ("sdpa" or "eager")

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, WiolaRMSNorm) and module.offset is not None:
            init.zeros_(module.offset)
        elif isinstance(module, WiolaAttention):
            if module.gated:
                init.zeros_(module.gate_fc2.bias)
            if module.has_context:
                init.constant_(module.blend_logit, float(self.config.gcla_gate_init))
        elif isinstance(module, WiolaRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())
        elif isinstance(module, AdaptiveThreshold):  # τ = 0 at init: AGU starts as SwiGLU
            init.zeros_(module.threshold_proj.weight)
            init.zeros_(module.threshold_proj.bias)
            init.zeros_(module.threshold_scale)
        elif isinstance(module, HierarchicalNorm):  # mix 0 at init: HLN starts as RMSNorm
            init.ones_(module.weight)
            init.zeros_(module.mix)
        elif isinstance(module, GatedUnitsMLP) and module.fractal:
            init.copy_(module.keep, module.level_masks())
        elif isinstance(module, WiolaModel):
            init.constant_(module.f3n_step_levels, self.config.f3n_levels)


def draw_f3n_levels(config: WiolaConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """One training step's F3N levels, [L] long in 1..G: one level for every layer (`step`) or one per
    layer (`layer`), from `generator` (default: the global torch RNG)."""
    n = config.num_hidden_layers
    draws = torch.randint(1, config.f3n_levels + 1, (n if config.f3n_sampling == "layer" else 1,), generator=generator)
    return draws.expand(n).clone()


class WiolaModel(WiolaPreTrainedModel):
    def __init__(self, config: WiolaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([WiolaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = build_norm(config, "hln_final")  # (HLN: its running sum lives on the last layer's cache entry)
        self.rotary_emb = WiolaRotaryEmbedding(config)
        self.dropout = nn.Dropout(config.hidden_dropout) if config.hidden_dropout else nn.Identity()
        self.gradient_checkpointing = False
        self.last_merge_ratios: dict[int, torch.Tensor] = {}
        # F3N sampling: a training loop may fix each optimizer step's levels (`set_f3n_levels`); otherwise
        # every training forward draws its own from the global torch RNG
        self.register_buffer("f3n_step_levels", torch.full((config.num_hidden_layers,), config.f3n_levels), persistent=False)
        self.f3n_levels_fixed = False
        self.post_init()

    def set_f3n_levels(self, levels: torch.Tensor) -> None:
        """Fix the F3N level of every layer ([L] long) for the training forwards that follow (written in
        place, so a compiled model does not recompile when the levels change)."""
        self.f3n_step_levels.copy_(levels.to(self.f3n_step_levels.device))
        self.f3n_levels_fixed = True

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, past: int) -> tuple[int, int]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        if len(shape) != 2:
            raise ValueError(f"input_ids must have shape [batch, seq_len], got {tuple(shape)}")
        b, t = shape
        if b == 0 or t == 0:
            raise ValueError(f"empty input: input_ids has shape {tuple(shape)}")
        if past + t > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {past + t} tokens ({past} cached + {t} new) exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        # the vocabulary scan waits for the device; training on an accelerator skips it (`wiola train` checks
        # the data's vocabulary once up front) so that steps are not serialised by a sync each
        if input_ids is not None and not torch.compiler.is_compiling() and not (self.training and input_ids.device.type != "cpu"):
            bad = (input_ids < 0) | (input_ids >= self.config.vocab_size)
            if bad.any():
                raise ValueError(f"token id {int(input_ids[bad][0])} is outside the vocabulary [0, {self.config.vocab_size})")
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] not in (t, past + t):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({b}, {past + t}) "
                    f"(batch, cached + new tokens)" + (f" or ({b}, {t})" if past else "")
                )
        return b, t

    def _layers(self, hidden, cos, sin, step: StepInfo, cache, output_hidden_states: bool):
        """The decoder stack, shared by `forward` and the static decode step. Keeps the GCLA summaries
        (running means of each layer's output, continued from the cache) and the ATM merge ratios."""
        real, t = step.real, hidden.shape[1]
        all_hidden = (hidden,) if output_hidden_states else None
        summaries: list[torch.Tensor] = []  # GCLA μ_i over this chunk, one per finished layer
        lookback = self.config.gcla_lookback
        gcla = self.config.cross_layer_context == "gcla"
        merge_ratios: dict[int, torch.Tensor] = {}
        sparsity: dict[int, torch.Tensor] = {}
        penalties: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            context = torch.stack(summaries[-lookback:], dim=2).to(hidden.dtype) if gcla and summaries else None
            # context goes positionally: reentrant checkpointing sees only positional tensors as inputs
            hidden, merged, zero_share, l1 = layer(hidden, cos, sin, step, context, **{CACHE_KWARG: cache})
            if merged is not None:
                merge_ratios[i] = merged.sum() / real.sum().clamp(min=1)
            if zero_share is not None:
                sparsity[i] = zero_share
            if l1 is not None:
                penalties.append(l1)
            if gcla and i < len(self.layers) - 1:
                running = hidden.float() * real[..., None] if step.padded else hidden.float()
                running = step.running_sum(running)
                if cache is not None:
                    running = cache.layers[i].accumulate("out_sum", running)
                summaries.append(running / step.count)
            if output_hidden_states:
                all_hidden += (hidden,)
        hidden = self.norm(hidden, step, cache.layers[-1] if cache is not None else None)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (hidden,)
        # the AGU penalty per position ([B, T]: agu_l1 × mean over AGU layers of mean |h̃|)
        aux = self.config.agu_l1 * torch.stack(penalties).mean(dim=0) if penalties else None
        return hidden, all_hidden, merge_ratios, (sparsity or None, aux)

    @staticmethod
    def _documents(step: StepInfo, starts: torch.Tensor, device) -> None:
        """Per-document bookkeeping of a packed batch `starts` [B, T] (True where a document begins)."""
        pos = torch.arange(starts.shape[1], device=device)
        step.doc_first = segment_first(starts)
        step.cum_real = pos[None, :] + 1 - step.doc_first
        step.count = step.cum_real[..., None].to(torch.float32)
        same = step.doc_first[:, :, None] == step.doc_first[:, None, :]
        step.mask = (same & (pos[None, :] <= pos[:, None])[None])[:, None]
        step.is_causal = False

    def _static_forward(self, input_ids, inputs_embeds, attention_mask, position_ids, cache: WiolaStaticCache, output_hidden_states):
        """Forward on a `WiolaStaticCache`. A chunk of several tokens (the prompt) runs the ordinary path
        on a `WiolaCache` and is copied into the buffers; a single token after that runs the decode step,
        which touches no Python number that changes between steps and syncs nothing (compile-friendly)."""
        t = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if t > 1 or not cache.ready:
            dynamic = cache.to_dynamic()
            out = self.forward(input_ids, attention_mask, position_ids, dynamic, inputs_embeds, True, output_hidden_states)
            cache.load(dynamic)
            if cache.rotary is None:  # fp32, cast per step as the rotary module does
                cache.rotary = rotary_table(self.rotary_emb, cache.capacity, out.last_hidden_state.device, torch.float32)
                if cache.rotary[0].device.type == "cuda":
                    for table in cache.rotary:
                        torch._dynamo.mark_static_address(table)
            setattr(out, CACHE_KWARG, cache)
            return out
        if not torch.compiler.is_compiling():  # (token ids come from the model's own outputs; no vocabulary scan here)
            if int(cache.position) >= cache.capacity:
                raise ValueError(f"the WiolaStaticCache is full (max_cache_len={cache.capacity})")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b = hidden.shape[0]
        if position_ids is None:
            position_ids = cache.real_count[:, None]
        cache.key_real.index_fill_(1, cache.position, True)
        cum_real = cache.real_count[:, None] + 1
        mask = cache.key_real[:, None, None, :]
        if self.config._attn_implementation != "eager":  # an additive mask, built once instead of by SDPA in every layer
            mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device).masked_fill_(~mask, float("-inf"))
        step = StepInfo(
            real=torch.ones(b, 1, dtype=torch.bool, device=hidden.device), cum_real=cum_real,
            count=cum_real[..., None].to(torch.float32), padded=False, mask=mask, is_causal=False,
        )
        cos, sin = cache.rotary[0][position_ids][:, None].to(hidden.dtype), cache.rotary[1][position_ids][:, None].to(hidden.dtype)
        hidden, all_hidden, merge_ratios, (sparsity, _) = self._layers(self.dropout(hidden), cos, sin, step, cache, output_hidden_states)
        cache.real_count.add_(1)
        cache.position.add_(1)
        return WiolaModelOutput(last_hidden_state=hidden, hidden_states=all_hidden, merge_ratios=merge_ratios or None,
                                activation_sparsity=sparsity, **{CACHE_KWARG: cache})

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: WiolaCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: WiolaCache | None = None,
        **kwargs,
    ) -> WiolaModelOutput:
        past_key_values = pick_cache(cache, past_key_values)  # `cache` from transformers ≥ 5.24, `past_key_values` before
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        if isinstance(past_key_values, WiolaStaticCache) and use_cache:
            return self._static_forward(input_ids, inputs_embeds, attention_mask, position_ids, past_key_values, output_hidden_states)
        if past_key_values is not None and not isinstance(past_key_values, WiolaCache):
            if past_key_values.get_seq_length() != 0:
                raise ValueError(f"WiolaForCausalLM needs a WiolaCache, got a non-empty {type(past_key_values).__name__}")
            past_key_values = None
        user_cache = past_key_values is not None
        if use_cache and past_key_values is None:
            past_key_values = WiolaCache(self.config)
        cache = past_key_values if use_cache else None
        past = cache.seen_tokens if cache is not None else 0
        b, t = self._check_inputs(input_ids, inputs_embeds, attention_mask, past)
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        device = hidden.device

        # real-token bookkeeping: positions count real tokens, cumulative means divide by real counts
        # under torch.export (and so torch.onnx.export) the mask is a graph input, not data: assume it may hold padding
        # (the general path, which computes the same values for an all-ones mask) instead of branching on its content
        exporting = getattr(torch.compiler, "is_exporting", bool)()
        padded = attention_mask is not None and (exporting or not bool(attention_mask.all()))
        real = attention_mask[:, -t:].bool() if attention_mask is not None else torch.ones(b, t, dtype=torch.bool, device=device)
        past_count = cache.real_count if cache is not None and cache.real_count is not None else torch.zeros(b, dtype=torch.long, device=device)
        cum_real = past_count[:, None] + real.long().cumsum(dim=1)
        if position_ids is None:
            position_ids = (cum_real - 1).clamp(min=0)
        past_real = cache.real_mask if cache is not None and cache.real_mask is not None else torch.ones(b, past, dtype=torch.bool, device=device)
        key_real = torch.cat([past_real, real], dim=1)
        padded = padded or (past > 0 and (exporting or not bool(past_real.all())))
        denom = cum_real.clamp(min=1)[..., None].to(torch.float32)
        step = StepInfo(real=real, cum_real=cum_real, count=denom, padded=padded, mask=None, is_causal=False, key_real=key_real)
        query_pos = torch.arange(past, past + t, device=device)
        if padded:
            key_pos = torch.arange(past + t, device=device)
            causal = key_pos[None, :] <= query_pos[:, None]
            step.mask = ((causal[None] & key_real[:, None, :]) | (key_pos[None, None, :] == query_pos[None, :, None]))[:, None]
        elif past == 0:
            step.is_causal = t > 1
        elif t > 1:
            step.mask = (torch.arange(past + t, device=device)[None, :] <= query_pos[:, None])[None, None]
        if kwargs.get("output_attentions") or self.config.output_attentions:
            raise ValueError("output_attentions is not supported: Wiola's attention runs in fused kernels (SDPA, "
                             "FlexAttention) that never form the probabilities, and ATM layers attend over merged keys")

        # packed rows: position_ids restarting at 0 mark document starts (as transformers' packing collators and
        # TRL write them); attention is then block-diagonal causal and every running mean restarts per document
        if position_ids is not None and past == 0 and t > 1 and not padded and not torch.compiler.is_compiling():
            starts = torch.cat([torch.ones_like(position_ids[:, :1], dtype=torch.bool), position_ids[:, 1:] == 0], dim=1)
            if bool(starts[:, 1:].any()):
                if user_cache:
                    raise ValueError("packed rows (position_ids restarting at 0) cannot continue a cache")
                cache = None  # a packed batch is not continued: no cache for it
                self._documents(step, starts.expand(b, t), device)

        if self.training and self.config.mlp == "f3n" and self.config.f3n_sampling != "none":
            # MatFormer-style level draws from the global torch RNG: seeded by the run, saved in its checkpoints
            if self.f3n_levels_fixed:
                step.f3n_levels = self.f3n_step_levels
            else:
                step.f3n_levels = draw_f3n_levels(self.config).to(device)
        cos, sin = self.rotary_emb(position_ids, hidden.dtype)
        hidden, all_hidden, merge_ratios, (sparsity, aux) = self._layers(self.dropout(hidden), cos, sin, step, cache, output_hidden_states)
        if cache is not None:
            cache.seen_tokens = past + t
            cache.real_mask = key_real
            cache.real_count = cum_real[:, -1]
        self.last_merge_ratios = merge_ratios
        return WiolaModelOutput(last_hidden_state=hidden, hidden_states=all_hidden, merge_ratios=merge_ratios or None, activation_sparsity=sparsity,
                                f3n_levels=step.f3n_levels, aux_loss=None if aux is None else aux.mean(), aux_tokens=aux, **{CACHE_KWARG: cache})


LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def causal_lm_loss(logits, labels=None, num_items_in_batch=None, ignore_index: int = -100, shift_labels=None):
    """Next-token cross-entropy in fp32, as transformers' causal LMs compute it: the mean over the labelled
    tokens, or — when the trainer passes `num_items_in_batch`, the labelled tokens of the whole accumulated
    (and all-rank) batch — their sum divided by it, so that gradient accumulation and data parallelism give
    the loss of one big batch. `shift_labels` (already aligned with the logits) replaces `labels`."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shift_labels, ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
    return loss


class WiolaForCausalLM(WiolaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    accepts_loss_kwargs = True  # forward honours num_items_in_batch (transformers.Trainer then does not rescale)

    def __init__(self, config: WiolaConfig):
        super().__init__(config)
        self.model = WiolaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: WiolaCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        cache: WiolaCache | None = None,
        **kwargs,
    ) -> WiolaCausalLMOutput:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=pick_cache(cache, past_key_values),
            output_attentions=kwargs.get("output_attentions"),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None or kwargs.get("shift_labels") is not None:
            loss = causal_lm_loss(logits, labels, **{k: v for k, v in kwargs.items() if k in LOSS_KWARGS})
            if outputs.aux_loss is not None:
                # with labels the penalty is averaged over the predicting (labelled) positions like the loss, and
                # normalised by `num_items_in_batch` when given: gradient accumulation and ranks then sum to the
                # penalty of the whole batch, counted once
                shifted = kwargs.get("shift_labels")
                shifted = F.pad(labels, (0, 1), value=-100)[:, 1:] if shifted is None else shifted
                labelled = (shifted != kwargs.get("ignore_index", -100)).to(outputs.aux_tokens.device)
                total = (outputs.aux_tokens * labelled).sum()
                n = kwargs.get("num_items_in_batch")
                aux = total / (labelled.sum().clamp(min=1) if n is None else (n.to(total.device) if torch.is_tensor(n) else n))
                outputs.aux_loss = aux
                loss = loss + aux
        return WiolaCausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            merge_ratios=outputs.merge_ratios,
            activation_sparsity=outputs.activation_sparsity,
            f3n_levels=outputs.f3n_levels,
            aux_loss=outputs.aux_loss,
            **{CACHE_KWARG: output_cache(outputs)},
        )

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        """Generation always runs on a `WiolaCache` (unless the user passed a cache or use_cache=False)."""
        if kwargs_cache(model_kwargs) is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        implementation = generation_config.cache_implementation
        # under the name the installed generate reads and feeds back (`cache` from 5.24, `past_key_values` before)
        if implementation == "static":
            model_kwargs[CACHE_KWARG] = WiolaStaticCache(self.config, max_cache_len=max_cache_length)
        elif implementation in (None, "dynamic", "dynamic_full"):
            # assisted decoding (the target and its draft) crops rejected tokens: record history since the last crop.
            # ("dynamic_full": a cache without sliding layers, for rollback; transformers 5.0 sets it for the draft model)
            assisted = (generation_mode == "assisted_generation" or bool(getattr(generation_config, "is_assistant", False))
                        or implementation == "dynamic_full")
            model_kwargs[CACHE_KWARG] = WiolaCache(self.config, history="recent" if assisted else "none")
        else:
            raise ValueError(f"WiolaForCausalLM supports cache_implementation 'dynamic' (WiolaCache) or 'static' (WiolaStaticCache), not {implementation!r}")

    def create_masks_for_generate(self, attention_mask=None, past_key_values=None, is_first_iteration=False, cache=None, **kwargs):
        """Called by `generate` for compileable caches. The prompt keeps its 2-D mask; the static decode
        step needs none (its state holds which slots are real), and a growing mask would change shape
        every step and defeat the compiled step."""
        past_key_values = pick_cache(cache, past_key_values)
        if isinstance(past_key_values, WiolaStaticCache) and past_key_values.ready and not is_first_iteration:
            return None
        return attention_mask


__all__ = ["WiolaForCausalLM", "WiolaModel", "WiolaPreTrainedModel", "WiolaCache", "WiolaStaticCache"]
