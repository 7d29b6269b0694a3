"""Differences between the transformers releases Wiola supports (5.0 – 5.25), in one place.

transformers 5.24 renamed `past_key_values` to `cache` in model forwards, model outputs and generation
(`model_kwargs["cache"]`, `outputs.cache`); 5.0 – 5.23 use `past_key_values`. `CACHE_KWARG` is the name the
installed release reads. Wiola's forwards accept both names from callers and always return the cache
under `CACHE_KWARG`, so no deprecation warning comes from our code on any supported release.

transformers 5.25 turns Hub kernels on by default in `from_pretrained` (`use_kernels=None` means on unless
`USE_HUB_KERNELS` says no): every load imports the `kernels` package (an error when it is missing) and, for a
layer with a Hub kernel for the model's device (LLaMA's RMSNorm on CUDA), asks huggingface.co for it — a
network request, and offline an error, from a local folder. Wiola's loaders pass `NO_HUB_KERNELS`
(`use_kernels=False`, accepted by every 5.x release and the default before 5.25): no `kernels` import, no
network, the same modules as on 5.0 – 5.24. (Wiola's own layers have no Hub kernels in any case.)
"""

from __future__ import annotations

import dataclasses

from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE_KWARG = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


NO_HUB_KERNELS = {"use_kernels": False}  # `from_pretrained(..., **NO_HUB_KERNELS)`: see the module docstring


def pick_cache(cache=None, past_key_values=None):
    """The cache a caller passed under either name (both at once is a mistake)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache once, as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def output_cache(outputs):
    """The cache of a model output, read without the deprecation warning of the other name."""
    return getattr(outputs, CACHE_KWARG, None)


def kwargs_cache(model_kwargs: dict):
    """The cache in a generation `model_kwargs` dict, under whichever name it was put."""
    return pick_cache(model_kwargs.get("cache"), model_kwargs.get("past_key_values"))


def enable_checkpointing(model, use_reentrant: bool = False) -> None:
    """Activation (gradient) checkpointing on every decoder layer: `activation_checkpointing_enable` where
    the release has it (5.24 deprecates `gradient_checkpointing_enable`), the older name otherwise."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
