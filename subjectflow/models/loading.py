"""Load a base model of a supported family (models/families/): an embedded tiny model
("tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux"), a local diffusers folder, or a Hugging
Face hub id that is already in the local cache.

Runs do not download unless asked to (`allow_download`): a hub id that is not cached
fails at once with the command that fetches it, rather than hanging on a machine
without network. The base model's files
are only read, never written; adapters and fine-tunes are saved elsewhere.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .families import SD, Family, by_pipeline, supported
from .tiny import TINY_MODELS, ensure_tiny

if TYPE_CHECKING:  # diffusers + transformers take seconds to import; load them on use
    import torch
    from diffusers import (AutoencoderKL, DDPMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler,
                           FluxTransformer2DModel, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DEVICE_PATTERN = re.compile(r"cpu|mps|cuda(:\d+)?")
_TRUE = {"1", "ON", "YES", "TRUE"}


class ModelNotAvailable(RuntimeError):
    """The base model cannot be found on this machine; the message says how to get it."""


def resolve_device(device: str = "auto", precision: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Turn config strings into a torch device and dtype, failing before any work.

    auto: the GPU if there is one, in bf16 where it supports it (same range as fp32, so
    no loss scaling) and fp16 otherwise; on CPU and MPS, fp32.
    """
    import torch

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if device == "auto":
        target = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif _DEVICE_PATTERN.fullmatch(device):
        target = torch.device(device)
        _check_device_present(target)
    else:
        raise ValueError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    if precision == "auto":
        if target.type == "cuda":
            return target, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return target, torch.float32
    if precision not in dtypes:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    dtype = dtypes[precision]
    if target.type == "cpu" and dtype == torch.float16:
        raise ValueError("precision 'fp16' does not run on the CPU (many CPU kernels have no fp16 "
                         "version); use 'fp32' or 'bf16', or a CUDA device")
    if target.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"this GPU ({torch.cuda.get_device_name(target)}) does not support bf16; "
                         "use precision 'fp16' or 'fp32'")
    return target, dtype


def _check_device_present(target: torch.device) -> None:
    import torch

    if target.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(target)!r} was asked for, but torch {torch.__version__} sees no "
                             "CUDA GPU; use device 'auto' or 'cpu', or install a CUDA build of torch")
        if (target.index or 0) >= count:
            raise ValueError(f"device {str(target)!r} was asked for, but there are only {count} CUDA "
                             f"GPU(s): cuda:0..cuda:{count - 1}")
    if target.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for, but this machine has no Apple MPS backend; "
                         "use device 'auto' or 'cpu'")


def native_resolution(path: str) -> int:
    """The image side a diffusers pipeline folder works at: its denoiser's sample_size times
    the VAE's downsampling (tiny-sd 64, SD 1.x 512, SD 2.x 768, SDXL 1024, FLUX.1 1024)."""
    root = Path(path)
    denoiser = json.loads((root / model_family(path).denoiser_folder / "config.json").read_text())
    vae = json.loads((root / "vae" / "config.json").read_text())
    # FLUX's transformer has no sample_size: FluxPipeline's default is 128 latent pixels.
    size = denoiser.get("sample_size", 128)
    side = size[0] if isinstance(size, (list, tuple)) else size
    return int(side) * 2 ** (len(vae["block_out_channels"]) - 1)


def resolve_model_path(model: str, models_dir: Path, *, allow_download: bool = False) -> str:
    """The local folder holding `model`, a diffusers pipeline folder (model_index.json).

    `model` is, in this order: an embedded tiny model (built under `models_dir` on first use); a path
    to a folder; a folder name under `models_dir`; or a hub id ("org/name") that is in
    the local Hugging Face cache. An uncached hub id is downloaded only when
    `allow_download` is set and the hub is not in offline mode.
    """
    models_dir = Path(models_dir)
    if model in TINY_MODELS:
        return str(ensure_tiny(models_dir, model))
    for folder in (Path(model).expanduser(), models_dir / model):
        if folder.is_dir():
            return str(_check_pipeline_folder(folder, f"folder {str(folder)!r}"))
    if model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") > 1:
        raise ModelNotAvailable(f"base model folder {model!r} does not exist (nor "
                                f"{str(models_dir / model)!r}); fix the path, or give a hub id such as 'org/name'")
    return str(_hub_snapshot(model, allow_download))


def _hub_snapshot(repo_id: str, allow_download: bool) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import HFValidationError, LocalEntryNotFoundError

    try:
        # local_files_only: never touch the network here, whatever HF_HUB_OFFLINE says
        # (huggingface_hub reads that variable once, at import).
        return _check_pipeline_folder(Path(snapshot_download(repo_id, local_files_only=True)),
                                      f"the cached copy of {repo_id!r}")
    except HFValidationError as exc:
        raise ModelNotAvailable(f"base model {repo_id!r} is neither an embedded model ({', '.join(TINY_MODELS)}), "
                                f"a local folder, nor a valid hub id ('org/name'): {exc}") from exc
    except LocalEntryNotFoundError:
        pass
    offline = bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE
    if not allow_download or offline:
        why = ("the hub is in offline mode (HF_HUB_OFFLINE=1)" if offline
               else "runs do not download models (allow_download is off)")
        raise ModelNotAvailable(
            f"base model {repo_id!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            f"{why}. On a machine with network, run `hf download {repo_id}` (older huggingface_hub: "
            f"`huggingface-cli download {repo_id}`) and copy its cache here (or point HF_HOME at it), "
            f"or set the base model to a local diffusers folder."
        )
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(repo_id))
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise ModelNotAvailable(f"could not download base model {repo_id!r} from the hub: {exc}. Check the "
                                f"id and your network/token, or fetch it with `hf download {repo_id}`") from exc


def model_family(path: str) -> Family:
    """The family of the pipeline folder `path` (one `_check_pipeline_folder` accepted)."""
    return by_pipeline(json.loads((Path(path) / "model_index.json").read_text()).get("_class_name"))


def _check_pipeline_folder(folder: Path, what: str) -> Path:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelNotAvailable(
            f"{what} is not a diffusers pipeline folder (it has no model_index.json). Point the base "
            f"model at the folder a diffusers `save_pretrained` wrote, or at a hub id; single-file "
            f"checkpoints (.ckpt/.safetensors) must be converted first."
        )
    spec = json.loads(index.read_text())
    family = by_pipeline(spec.get("_class_name"))
    if family is None:
        raise ModelNotAvailable(f"{what} is a {spec.get('_class_name')} model; subjectflow supports "
                                f"{supported()}: pick such a base model")
    components = [name for name, part in spec.items()
                  if not name.startswith("_") and isinstance(part, list) and part[0] is not None]
    missing = [name for name in components if not (folder / name).is_dir()]
    if missing:
        raise ModelNotAvailable(f"{what} is incomplete: model_index.json lists {', '.join(missing)} but "
                                "those folders are missing; download or copy the whole model again")
    return folder


def load_pipeline(model: str, models_dir: Path, device: torch.device, dtype: torch.dtype, *,
                  allow_download: bool = False) -> DiffusionPipeline:
    """A ready-to-sample pipeline of the model's family, without a safety checker or progress bars."""
    from diffusers import DiffusionPipeline

    path = resolve_model_path(model, models_dir, allow_download=allow_download)
    pipe = DiffusionPipeline.from_pretrained(path, **model_family(path).pipeline_options(), **_dtype_kwarg(dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # Cast while loading, not with .to(dtype) afterwards: modules a model keeps in fp32
    # stay so. diffusers renamed the keyword `torch_dtype` -> `dtype` (huggingface/diffusers
    # #14205, with the helper tested for here); older releases know only `torch_dtype`.
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


@dataclass(frozen=True)
class ModelParts:
    """The separate modules a training loop needs, as diffusers' train_dreambooth_lora.py
    loads them: all on one device in one dtype, text_encoder and vae frozen. `unet` is the
    denoiser: a UNet, or SD3's and FLUX's transformer. What of it trains is the method's
    choice, so its parameters are left as loaded. A family with more text encoders (SDXL's
    second CLIP, FLUX's T5; SD3's second CLIP and T5) has them in `tokenizer_2` /
    `text_encoder_2` and `tokenizer_3` / `text_encoder_3`, and the schedule the denoiser was
    trained on (DDPM, or flow matching) is `noise_scheduler`."""

    path: str
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel | FluxTransformer2DModel
    noise_scheduler: DDPMScheduler | FlowMatchEulerDiscreteScheduler
    family: Family = SD
    tokenizer_2: CLIPTokenizer | T5TokenizerFast | None = None
    text_encoder_2: CLIPTextModelWithProjection | T5EncoderModel | None = None
    tokenizer_3: T5TokenizerFast | None = None
    text_encoder_3: T5EncoderModel | None = None

    def text_encoders(self) -> list[CLIPTextModel]:
        return [e for e in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if e is not None]

    def tokenizers(self) -> list[CLIPTokenizer]:
        return [t for t in (self.tokenizer, self.tokenizer_2, self.tokenizer_3) if t is not None]


def load_components(model: str, models_dir: Path, device: torch.device, dtype: torch.dtype, *,
                    allow_download: bool = False) -> ModelParts:
    """Load for training. Everything is cast to `dtype`, so the parts also combine into a
    pipeline for sampling. Like train_dreambooth_lora.py with mixed precision, a method that
    trains in bf16/fp16 keeps its trainable parameters (LoRA) in fp32 itself
    (diffusers.training_utils.cast_training_params); full fine-tuning wants dtype fp32."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    path = resolve_model_path(model, models_dir, allow_download=allow_download)
    if device.type == "cuda":  # fp32 matmuls on tensor cores (TF32), as diffusers' --allow_tf32
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    family = model_family(path)
    text_encoder = family.first_text_encoder(path)
    extra = family.extra_text_encoders(path)
    (tokenizer_2, text_encoder_2), (tokenizer_3, text_encoder_3) = (extra + [(None, None)] * 2)[:2]
    # transformers casts on .to() without complaint (and its own keyword changed too).
    encoders = [encoder.to(dtype=dtype) for encoder in (text_encoder, text_encoder_2, text_encoder_3)
                if encoder is not None]
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **_dtype_kwarg(dtype))
    for frozen in (*encoders, vae):
        frozen.requires_grad_(False)
        frozen.eval()
        frozen.to(device)
    unet = family.load_denoiser(path, **_dtype_kwarg(dtype))
    return ModelParts(
        path=path,
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        text_encoder=text_encoder,
        vae=vae,
        unet=unet.to(device),
        noise_scheduler=family.training_scheduler(path),
        family=family,
        tokenizer_2=tokenizer_2,
        text_encoder_2=text_encoder_2,
        tokenizer_3=tokenizer_3,
        text_encoder_3=text_encoder_3,
    )
