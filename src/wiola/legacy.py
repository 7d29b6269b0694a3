"""Checkpoints written by wiola 0.2.0.dev before GCLA's layer 0 lost its dead parameters (docs/architecture.md §2.3).

Those checkpoints hold `model.layers.0.self_attn.{k_ctx_proj,v_ctx_proj}.weight` and a `blend_logit` on
layer 0, which layer 0 never read, and store every `blend_logit` φ as a 0-d scalar. `upgrade_state_dict`
drops the first and reshapes the second to the 1-element tensor the model now holds; outputs are unchanged.
`wiola eval`, `wiola generate` and `wiola train --resume` upgrade such checkpoints in memory, and
`wiola convert OLD NEW` rewrites one on disk.
"""

from __future__ import annotations

from pathlib import Path

import torch

DEAD = ("model.layers.0.self_attn.k_ctx_proj.weight", "model.layers.0.self_attn.v_ctx_proj.weight",
        "model.layers.0.self_attn.blend_logit")


def upgrade_state_dict(state: dict[str, torch.Tensor]) -> list[str]:
    """Drop layer 0's dead GCLA tensors and make every φ 1-element, in place; returns the dropped names."""
    dropped = [key for key in DEAD if state.pop(key, None) is not None]
    for key, tensor in state.items():
        if key.endswith("self_attn.blend_logit") and tensor.dim() == 0:
            state[key] = tensor.reshape(1)
    return dropped


def upgrade_optimizer_state(state: dict) -> None:
    """The same upgrade for a full (parameter-name keyed) optimizer state, in place."""
    per_param = state.get("state", {})
    for key in DEAD:
        per_param.pop(key, None)
    for group in state.get("param_groups", []):
        group["params"] = [name for name in group.get("params", []) if name not in DEAD]
    for key, entry in per_param.items():
        if str(key).endswith("self_attn.blend_logit"):
            for name, value in entry.items():
                if torch.is_tensor(value) and value.dim() == 0 and name != "step":
                    entry[name] = value.reshape(1)


def needs_upgrade(model_dir: str | Path) -> bool:
    """Whether the safetensors weights in `model_dir` have the old GCLA layout (reads headers only)."""
    from safetensors import safe_open

    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key in DEAD or (key.endswith("self_attn.blend_logit") and len(f.get_slice(key).get_shape()) == 0):
                    return True
    return False


def load_upgraded(model_dir: str | Path, dtype: torch.dtype | None = None):
    """A `WiolaForCausalLM` from an old-layout checkpoint folder, upgraded in memory (eval mode)."""
    from safetensors.torch import load_file

    from .configuration_wiola import WiolaConfig
    from .modeling_wiola import WiolaForCausalLM

    config = WiolaConfig.from_pretrained(model_dir)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(str(file)))
    upgrade_state_dict(state)
    model = WiolaForCausalLM(config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise ValueError(f"weights do not fit the model (missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})")
    model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    return model.eval()
