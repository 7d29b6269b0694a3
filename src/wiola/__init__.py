"""Wiola: small decoder-only language models on PyTorch and transformers 5.x.

`import wiola` registers `model_type="wiola"` with transformers' Auto classes.
"""

__version__ = "0.2.0.dev0"

try:  # the model files land separately from the toolchain; keep `import wiola.data` usable meanwhile
    from wiola.configuration_wiola import WiolaConfig, list_presets  # noqa: F401
    from wiola.modeling_wiola import WiolaForCausalLM, WiolaModel, WiolaPreTrainedModel  # noqa: F401
    from wiola.cache_wiola import WiolaCache, WiolaStaticCache  # noqa: F401
    from wiola.incremental import reprefill  # noqa: F401
except ImportError:  # pragma: no cover
    pass
else:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register("wiola", WiolaConfig, exist_ok=True)
    AutoModel.register(WiolaConfig, WiolaModel, exist_ok=True)
    AutoModelForCausalLM.register(WiolaConfig, WiolaForCausalLM, exist_ok=True)

from wiola.errors import WiolaError  # noqa: E402,F401

try:  # saved checkpoints carry the modeling code (auto_map) so they load with trust_remote_code=True
    WiolaConfig.register_for_auto_class()
    WiolaModel.register_for_auto_class("AutoModel")
    WiolaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
except NameError:  # pragma: no cover
    pass
