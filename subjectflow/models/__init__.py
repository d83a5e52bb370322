"""Base models: the embedded tiny models, the families they and real ones belong to, and loading.

Importing this package is cheap; torch, diffusers and transformers load on first use.
"""

from .families import Family, Prompt
from .loading import (
    ModelNotAvailable, ModelParts, load_components, load_pipeline, model_family, native_resolution, resolve_device,
    resolve_model_path,
)
from .tiny import TINY_FLUX, TINY_SD, TINY_SD3, TINY_SDXL, build_tiny, build_tiny_sd, ensure_tiny_sd

__all__ = [
    "TINY_FLUX", "TINY_SD", "TINY_SD3", "TINY_SDXL", "Family", "ModelNotAvailable", "ModelParts", "Prompt",
    "build_tiny", "build_tiny_sd", "ensure_tiny_sd", "load_components", "load_pipeline", "model_family", "native_resolution", "resolve_device",
    "resolve_model_path",
]
