"""Building blocks chosen by `WiolaConfig` switches: norms, positional encodings, the attention kernel
(SDPA or the eager reference) and MLPs (docs/architecture.md §2.1–2.4), and the article's AGU / F3N MLPs and HLN norm
(docs/architecture.md §6.1–6.3: this project's interpretations, each exactly the LLaMA part at its neutral setting).

Everything here is per token and knows nothing of caches or attention, except HLN's sequence statistic,
which reads the forward's real-token bookkeeping (`StepInfo`) and continues its sums from the cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_wiola import WiolaConfig


# --------------------------------------------------------------------------- norms (docs/architecture.md §2.1)
class WiolaRMSNorm(nn.Module):
    """RMSNorm with statistics in fp32; with `offset=True` a learned δ (init 0) is added before
    normalising (`wiola_rmsnorm`). δ = 0 gives `rmsnorm` exactly."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.offset = nn.Parameter(torch.zeros(hidden_size)) if offset else None
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, step=None, cache=None) -> torch.Tensor:  # (step, cache: for HLN's signature)
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        if self.offset is not None:
            hidden_states = hidden_states + self.offset.to(torch.float32)
        hidden_states = F.rms_norm(hidden_states, (hidden_states.shape[-1],), eps=self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}, offset={self.offset is not None}"


def _clamp(x: torch.Tensor, low: float, high: float | None) -> torch.Tensor:
    """`x.clamp(low, high)` with gradient 1 on the closed range, edges included, as torch ≤ 2.13's clamp had;
    torch 2.14's clamp passes no gradient at an edge, so a parameter that starts on one (HLN's mix) never moves."""
    inside = x >= low if high is None else (x >= low) & (x <= high)
    return torch.where(inside, x, x.clamp(low, high).detach())


class HierarchicalNorm(nn.Module):
    """`hln` (docs/architecture.md §6.3): RMS normalisation by a learned mix of mean squares over a channel group (one per
    attention head), the token, and the sequence so far (real tokens, cached prefix included), in fp32:
    `v = (1 − a_k − a_s)·r_t + a_k·r_{t,k} + a_s·s_t`, `y = γ ⊙ x / sqrt(v + ε)`. `mix` holds the raw
    (a_k, a_s), clamped into `a ≥ 0, a_k + a_s ≤ 1`; at 0 (init) this is `rmsnorm` exactly, and the clamp's
    gradient at the boundary is 1, so the mix can grow (`_clamp`: torch 2.14's own clamp gives 0 there).
    `state` names its running sum in the cache."""

    def __init__(self, hidden_size: int, groups: int, eps: float = 1e-6, state: str = "hln_in"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.mix = nn.Parameter(torch.zeros(2))
        self.groups, self.variance_epsilon, self.state = groups, eps, state

    def mixing(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = _clamp(self.mix.float(), 0.0, 1.0)
        a = a / _clamp(a.sum(), 1.0, None)
        return a[0], a[1]

    def forward(self, hidden_states: torch.Tensor, step=None, cache=None) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        b, t, d = x.shape
        sq = x * x
        r_token = sq.mean(-1, keepdim=True)  # [B, T, 1]
        r_group = sq.view(b, t, self.groups, d // self.groups).mean(-1, keepdim=True)  # [B, T, G, 1]
        # the sequence statistic: running mean of r over real tokens (restarting per packed document)
        running = r_token
        if step is not None and step.padded:
            running = running * step.real[..., None]
        running = step.running_sum(running) if step is not None else running.cumsum(dim=1)
        if cache is not None:
            running = cache.accumulate(self.state, running)
        count = step.count if step is not None else torch.arange(1, t + 1, device=x.device, dtype=torch.float32)[None, :, None]
        r_seq = running / count
        a_k, a_s = self.mixing()
        v = (1.0 - a_k - a_s) * r_token[:, :, None] + a_k * r_group + a_s * r_seq[:, :, None]
        x = (x.view(b, t, self.groups, -1) * torch.rsqrt(v + self.variance_epsilon)).view(b, t, d)
        return self.weight * x.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, groups={self.groups}, eps={self.variance_epsilon}, state={self.state}"


def build_norm(config: WiolaConfig, state: str = "hln_in") -> nn.Module:
    if config.norm == "hln":
        return HierarchicalNorm(config.hidden_size, config.num_attention_heads, config.rms_norm_eps, state)
    return WiolaRMSNorm(config.hidden_size, config.rms_norm_eps, offset=config.norm == "wiola_rmsnorm")


# --------------------------------------------------------------------------- positions (docs/architecture.md §2.2)
class WiolaRotaryEmbedding(nn.Module):
    """cos/sin tables (rotate-half convention, fp32) for `rope`, `spiral` and `srpe`.

    `forward(position_ids)` returns `(cos, sin)` of shape `[B, 1, T, d_h]` (broadcast over heads); `sin`
    carries the sign of rotate-half, `[−sin, sin]`, so that `apply_rotary` is `x·cos + roll(x, d_h/2)·sin`
    — bit-identical to `x·cos + rotate_half(x)·[sin, sin]`. For `srpe` both carry the radial factor
    r_j(p), so applying them scales q and k as well as rotating them.
    """

    def __init__(self, config: WiolaConfig):
        super().__init__()
        self.kind = config.position_encoding
        self.head_dim, self.theta, self.spiral_alpha = config.head_dim, config.rope_theta, config.spiral_alpha
        self.srpe_k = config.srpe_k
        self.srpe_amplitude = config.srpe_amplitude
        self.srpe_frequency = config.srpe_frequency
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        """ω_j = θ^(−2j/d_h), times (1 + α·sqrt(j+1)/sqrt(d_h/2)) for `spiral`."""
        dim = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
        if self.kind == "spiral":
            j = torch.arange(dim // 2, dtype=torch.float32)
            inv_freq = inv_freq * (1.0 + self.spiral_alpha * torch.sqrt(j + 1.0) / (dim / 2) ** 0.5)
        return inv_freq

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        device_type = position_ids.device.type if position_ids.device.type != "mps" else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            p = position_ids[:, :, None].to(torch.float32)
            freqs = p * self.inv_freq.to(torch.float32)[None, None, :]  # [B, T, d_h/2]
            if self.kind == "srpe":
                radius = 1.0 + self.srpe_amplitude * torch.sin(freqs * self.srpe_frequency)
                angle = freqs * (1.0 + 1.0 / self.srpe_k)
                cos, sin = radius * torch.cos(angle), radius * torch.sin(angle)
            else:
                cos, sin = torch.cos(freqs), torch.sin(freqs)
            cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def rotary_table(rotary: WiolaRotaryEmbedding, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary`'s cos/sin for positions 0 … length−1, `[length, d_h]` each: a decode step gathers its rows
    instead of recomputing them (the same fp32 products, so the same values)."""
    cos, sin = rotary(torch.arange(length, device=device)[None], dtype)
    return cos[0, 0], sin[0, 0]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[B, heads, T, d_h]` with the tables of `WiolaRotaryEmbedding` (`[B, 1, T, d_h]`).
    Rolling by half swaps the halves, `[x2, x1]`; the sign of rotate-half lives in `sin`."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin


# --------------------------------------------------------------------------- attention kernels (docs/architecture.md §2.3)
def segment_first(starts: torch.Tensor) -> torch.Tensor:
    """For `starts` [B, T] bool (True where a segment — a document of a packed row — begins; column 0 must
    be True), the position where each token's segment begins. Equal values mean the same segment."""
    pos = torch.arange(starts.shape[1], device=starts.device)
    return torch.where(starts, pos[None, :], torch.zeros_like(pos)[None, :]).cummax(dim=1).values


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, H_kv, S, d] -> [B, H_kv·n_rep, S, d] (query head h uses kv head h // n_rep)."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def attend(q, k, v, mask, is_causal: bool, implementation: str, dropout: float = 0.0) -> torch.Tensor:
    """Softmax attention of q `[B,H,T,d]` over k/v `[B,H,S,d]`; `mask` is boolean (True = visible)."""
    if implementation == "eager":
        scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        if is_causal:
            t, s = q.shape[-2], k.shape[-2]
            mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(probs, p=dropout, training=dropout > 0)
        return torch.matmul(probs, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, dropout_p=dropout)


# --------------------------------------------------------------------------- MLPs (docs/architecture.md §2.4)
class SwiGLUMLP(nn.Module):
    """`W_down(SiLU(W_gate x) ⊙ W_up x)` — LLaMA's MLP."""

    def __init__(self, config: WiolaConfig):
        super().__init__()
        d, w = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, w, bias=False)
        self.up_proj = nn.Linear(d, w, bias=False)
        self.down_proj = nn.Linear(w, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ButterflyMLP(nn.Module):
    """wiola13m's Butterfly MLP: `[a, b] = W_up x`, `W_down(SiLU(a) ⊙ b + W_bypass x)`."""

    def __init__(self, config: WiolaConfig):
        super().__init__()
        d, w = config.hidden_size, config.intermediate_size
        self.up_proj = nn.Linear(d, 2 * w, bias=False)
        self.bypass_proj = nn.Linear(d, w, bias=False)
        self.down_proj = nn.Linear(w, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(a) * b + self.bypass_proj(x))


class DualStreamMLP(nn.Module):
    """The paper's Dual-Stream FFN: a narrow SwiGLU stream and a wide exact-GELU stream, fused by a
    sigmoid gate over their concatenation: `α ⊙ a + (1 − α) ⊙ b`, `α = σ(W_f [a; b])`."""

    def __init__(self, config: WiolaConfig):
        super().__init__()
        d, wa, wb = config.hidden_size, config.intermediate_size, config.dsff_wide_size
        self.gate_proj = nn.Linear(d, wa, bias=False)
        self.up_proj = nn.Linear(d, wa, bias=False)
        self.down_proj = nn.Linear(wa, d, bias=False)
        self.wide_up_proj = nn.Linear(d, wb, bias=False)
        self.wide_down_proj = nn.Linear(wb, d, bias=False)
        self.fusion_proj = nn.Linear(2 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        b = self.wide_down_proj(F.gelu(self.wide_up_proj(x)))
        alpha = torch.sigmoid(self.fusion_proj(torch.cat((a, b), dim=-1)))
        return alpha * a + (1.0 - alpha) * b


class GeluMLP(nn.Module):
    """`W_down GELU(W_up x)` (GPT-2 style, for baselines)."""

    def __init__(self, config: WiolaConfig):
        super().__init__()
        d, w = config.hidden_size, config.intermediate_size
        self.up_proj = nn.Linear(d, w, bias=False)
        self.down_proj = nn.Linear(w, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class AdaptiveThreshold(nn.Module):
    """AGU's per-token threshold `τ(x) = β·σ(w_τ·x + b_τ)` (docs/architecture.md §6.1; β, w_τ, b_τ all start at 0)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.threshold_proj = nn.Linear(hidden_size, 1, bias=True)  # w_τ, b_τ
        self.threshold_scale = nn.Parameter(torch.zeros(1))  # β (1 element: FSDP2 cannot shard 0-d parameters)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Soft-threshold the gate `h`: `sign(h)·max(|h| − τ(x), 0)` — exactly `h` when τ = 0."""
        tau = (self.threshold_scale * torch.sigmoid(self.threshold_proj(x))).to(h.dtype)
        return torch.sign(h) * F.relu(h.abs() - tau)


class GatedUnitsMLP(nn.Module):
    """The article's MLPs, both SwiGLU-shaped (LLaMA's `gate_proj`/`up_proj`/`down_proj`):

    * `agu` — Adaptive Gating Unit (docs/architecture.md §6.1, after CATS): the SiLU gate is soft-thresholded per token,
      `out = W_down(h̃ ⊙ W_up x)`; β = 0 (init) is `swiglu` exactly. `agu_l1` adds `mean |h̃|` to the loss.
    * `f3n` — Fractal FFN (docs/architecture.md §6.2, after MatFormer): the first `m_g` units form a complete FFN for each
      level g; inference runs level `f3n_level` (sliced weights), training samples levels (`f3n_sampling`)
      by masking the units above the drawn width. Level G without sampling is `swiglu` exactly.
      `f3n_gate=agu` adds the AGU threshold on the gate.

    `forward(x, step)` returns `(out, zero_share, l1)`: the share of zero gate units over real tokens and
    active units, and `mean |h̃|` per position ([B, T]; None when no penalty applies). At batch-1 decoding (one token,
    eval mode, not compiling) the zero units' `W_up` rows and `W_down` columns are skipped (exact)."""

    def __init__(self, config: WiolaConfig, layer_idx: int = 0):
        super().__init__()
        d, w = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, w, bias=False)
        self.up_proj = nn.Linear(d, w, bias=False)
        self.down_proj = nn.Linear(w, d, bias=False)
        self.fractal = config.mlp == "f3n"
        self.threshold = AdaptiveThreshold(d) if config.mlp == "agu" or (self.fractal and config.f3n_gate == "agu") else None
        self.layer_idx, self.width = layer_idx, w
        self.l1 = float(config.agu_l1) if self.threshold is not None else 0.0
        self.sparse_decode = bool(config.agu_sparse_decode)
        if self.fractal:
            self.widths = config.f3n_widths()
            self.sampling = config.f3n_sampling
            self.level = config.f3n_layer_levels()[layer_idx]
            self.register_buffer("keep", self.level_masks(), persistent=False)

    def level_masks(self) -> torch.Tensor:
        """`[G, f]` bool: row g−1 marks the units of level g (training with sampled levels masks the rest)."""
        units = torch.arange(self.width)
        return torch.stack([units < m for m in self.widths])

    def set_level(self, level: int) -> None:
        if not 1 <= level <= len(self.widths):
            raise ValueError(f"f3n level {level} is outside 1..{len(self.widths)}")
        self.level = level

    def forward(self, x: torch.Tensor, step=None):
        sampled = self.fractal and self.training and self.sampling != "none" and step is not None and step.f3n_levels is not None
        m = self.widths[self.level - 1] if self.fractal and not self.training else self.width
        if m == self.width:
            gate_w, up_w, down_w = self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight
        else:  # a coarser F3N level: the first m units are a complete FFN
            gate_w, up_w, down_w = self.gate_proj.weight[:m], self.up_proj.weight[:m], self.down_proj.weight[:, :m]
        h = F.silu(F.linear(x, gate_w))
        if self.threshold is not None:
            h = self.threshold(x, h)
        keep = None
        if sampled:  # (index_select of a 1-element tensor: no data-dependent Python int, so it compiles)
            keep = self.keep.index_select(0, step.f3n_levels[self.layer_idx:self.layer_idx + 1] - 1)[0]
        if keep is not None:
            h = h * keep
        if (self.threshold is not None and self.sparse_decode and not self.training and x.shape[0] * x.shape[1] == 1
                and not torch.compiler.is_compiling()):
            units = h.reshape(-1).nonzero().squeeze(-1)  # batch-1 decoding: only the non-zero units
            inner = h.reshape(-1)[units] * F.linear(x.reshape(1, -1), up_w.index_select(0, units))[0]
            out = F.linear(inner, down_w.index_select(1, units)).view_as(x)
        else:
            out = F.linear(h * F.linear(x, up_w), down_w)
        zero_share = l1 = None
        if self.threshold is not None:
            with torch.no_grad():
                zero = h == 0
                real = step.real[..., None] if step is not None and step.padded else None
                if keep is not None:
                    zero = zero & keep
                if real is not None:
                    zero = zero & real
                n_tokens = real.sum() if real is not None else torch.tensor(h.shape[0] * h.shape[1], device=h.device)
                n_units = keep.sum().float() if keep is not None else float(h.shape[-1])
                zero_share = zero.sum() / (n_tokens.clamp(min=1) * n_units)
            if self.l1 and self.training:
                l1 = h.abs().mean(dim=-1)  # per position [B, T]
        return out, zero_share, l1


MLP_CLASSES = {"swiglu": SwiGLUMLP, "butterfly": ButterflyMLP, "dsff": DualStreamMLP, "gelu": GeluMLP, "agu": GatedUnitsMLP, "f3n": GatedUnitsMLP}


def build_mlp(config: WiolaConfig, layer_idx: int = 0) -> nn.Module:
    if config.mlp in ("agu", "f3n"):
        return GatedUnitsMLP(config, layer_idx)
    return MLP_CLASSES[config.mlp](config)
