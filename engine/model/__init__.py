"""Model code for Hugging Face MoE checkpoints: specs and the architecture registry, safetensors
loading, weights and their packed layouts, attention, the MoE forward, the CPU kernels, the demo model."""

from moe_serve.engine.exports import lazy_exports

_NAMES = {
    "ModelSpec": "spec", "spec_from_config": "registry", "LoadedModel": "loader", "load_model": "loader",
    "read_spec": "loader", "MoEModel": "moe_model", "ResidentExperts": "experts",
    "ensure_demo_model": "demo_model", "DEMO_MODEL_NAME": "demo_model",
}
__all__ = sorted(_NAMES)
__getattr__ = lazy_exports(__name__, _NAMES)
