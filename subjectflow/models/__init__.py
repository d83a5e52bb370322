"""Base models: the embedded "tiny-sd" and loading any Stable-Diffusion-family model.

Importing this package is cheap; torch, diffusers and transformers load on first use.
"""

from .loading import (
    ModelNotAvailable, ModelParts, load_components, load_pipeline, native_resolution, resolve_device,
    resolve_model_path,
)
from .tiny import TINY_SD, build_tiny_sd, ensure_tiny_sd

__all__ = [
    "TINY_SD", "ModelNotAvailable", "ModelParts", "build_tiny_sd", "ensure_tiny_sd", "load_components",
    "load_pipeline", "native_resolution", "resolve_device", "resolve_model_path",
]
