"""Building blocks chosen by `WiolaConfig` switches: norms, positional encodings, the attention kernel
(SDPA or the eager reference) and MLPs (SPEC §2.1–2.4).

Everything here is per token and knows nothing of caches or attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_wiola import WiolaConfig


# --------------------------------------------------------------------------- norms (SPEC §2.1)
class WiolaRMSNorm(nn.Module):
    """RMSNorm with statistics in fp32; with `offset=True` a learned δ (init 0) is added before
    normalising (`wiola_rmsnorm`). δ = 0 gives `rmsnorm` exactly."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.offset = nn.Parameter(torch.zeros(hidden_size)) if offset else None
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        if self.offset is not None:
            hidden_states = hidden_states + self.offset.to(torch.float32)
        hidden_states = F.rms_norm(hidden_states, (hidden_states.shape[-1],), eps=self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}, offset={self.offset is not None}"


def build_norm(config: WiolaConfig) -> WiolaRMSNorm:
    return WiolaRMSNorm(config.hidden_size, config.rms_norm_eps, offset=config.norm == "wiola_rmsnorm")


# --------------------------------------------------------------------------- positions (SPEC §2.2)
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


# --------------------------------------------------------------------------- attention kernels (SPEC §2.3)
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


# --------------------------------------------------------------------------- MLPs (SPEC §2.4)
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


MLP_CLASSES = {"swiglu": SwiGLUMLP, "butterfly": ButterflyMLP, "dsff": DualStreamMLP, "gelu": GeluMLP}


def build_mlp(config: WiolaConfig) -> nn.Module:
    return MLP_CLASSES[config.mlp](config)
