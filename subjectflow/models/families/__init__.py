"""Model families: what differs between the base models a user points `model.base` at.

A family is recognised from the pipeline folder's model_index.json (`_class_name`). It
knows its denoiser (a UNet, or SD3's and FLUX's transformers) and the schedule it was
trained on (DDPM, or flow matching), the text encoders it has and how a prompt is encoded
with all of them (SDXL: both CLIP encoders' penultimate states side by side, the second's
pooled embedding and the size conditioning; SD3: two CLIPs and T5 joined on the sequence;
FLUX: T5 states and CLIP's pooled embedding), how its denoiser is called
(`Prompt.predict`), and its pipelines. Methods take `Prompt`s and `parts.family` and never
branch on which family it is; each method lists the families it is written for
(`Method.families`) and the registry refuses the others with the reason.
"""

from .base import SD, Family, Prompt
from .flux import FLUX
from .sd3 import SD3
from .sdxl import SDXL

FAMILIES: tuple[Family, ...] = (SD, SDXL, SD3, FLUX)


def by_pipeline(class_name: str | None) -> Family | None:
    """The family of a model_index.json `_class_name`; None for one subjectflow does not know."""
    return next((f for f in FAMILIES if class_name in f.pipelines), None)


def supported() -> str:
    return ", ".join(f.label for f in FAMILIES)


__all__ = ["FAMILIES", "FLUX", "SD", "SD3", "SDXL", "Family", "Prompt", "by_pipeline", "supported"]
