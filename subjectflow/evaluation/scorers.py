"""The models that score generated images: DINO (ViT-S/16) and CLIP, loaded without downloading.

A scoring model is named by a local folder (what `save_pretrained` wrote) or a hub id
already in the local Hugging Face cache; every load is `local_files_only`. A hub id that
is not cached either stops with the command that fetches it (`fallback="error"`) or, with
`fallback="random-test"`, is replaced by a tiny random model of the same class, built from
a fixed seed. Such a scorer says so in its `kind` ("random-test") and name
("random-test:ViTModel@seed0"), and so does every score computed with it: its numbers
test the plumbing and say nothing about quality (METHODS.md, Evaluation).

A local path that does not exist, or a folder that does not hold the model, is always an
error: a typo must not quietly turn into random scores.

A DINO model is always fed DINO's own evaluation transform (short side 256 bicubic, centre
crop 224, ImageNet mean/std, as DreamBench scores it), whatever processor its folder ships:
a hub folder's processor config is not that transform. The transform is part of the
scorer's name, so scores made before it are redone. CLIP keeps its own processor.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from PIL import Image

from ..config import EvaluateConfig, stable_hash
from ..models.loading import ModelNotAvailable
from ..models.tiny import MAX_LENGTH, build_tokenizer

if TYPE_CHECKING:  # transformers takes seconds to import; load it on use
    from transformers import CLIPModel, CLIPTokenizer, ViTModel

PRETRAINED, RANDOM_TEST, PROXY = "pretrained", "random-test", "proxy"
SCORER_KINDS = (PRETRAINED, RANDOM_TEST, PROXY)

RANDOM_SEED = 0  # the random-test models' weights depend only on this
_TINY_IMAGE = 64  # random-test input side: 4x4 patches of 16 px
_WEIGHT_SUFFIXES = (".safetensors", ".bin")

Preprocess = Callable[[Sequence[Image.Image]], torch.Tensor]
DINO_EVAL = "dino-eval-256-224"  # in a DINO scorer's name: the transform it scores with
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True, eq=False)
class ImageScorer:
    """An image encoder ready to embed: the model, its preprocessing and its identity."""

    name: str  # "facebook/dino-vits16@<commit>", "/models/dino@<digest>", "random-test:ViTModel@seed0"
    kind: str  # pretrained | random-test
    model: torch.nn.Module
    preprocess: Preprocess

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 16) -> torch.Tensor:
        """L2-normalised embeddings, one row per image, float32 on the CPU."""
        if not images:
            raise ValueError(f"{self.name}: no images to embed")
        rows = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = [image.convert("RGB") for image in images[start:start + batch_size]]
                pixels = self.preprocess(batch).to(self.device, next(self.model.parameters()).dtype)
                rows.append(self._image_features(pixels).float().cpu())
        return torch.nn.functional.normalize(torch.cat(rows), dim=-1)

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DinoScorer(ImageScorer):
    """`transformers.ViTModel`; the embedding is the CLS token of the last layer (DreamBench)."""

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]


@dataclass(frozen=True, eq=False)
class ClipScorer(ImageScorer):
    """`transformers.CLIPModel`: projected image embeddings (CLIP-I) and text embeddings (CLIP-T)."""

    tokenizer: CLIPTokenizer | None = None

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels))

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings, one row per text, float32 on the CPU."""
        if not texts:
            raise ValueError(f"{self.name}: no texts to embed")
        length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=length,
                                return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return torch.nn.functional.normalize(_features(out).float().cpu(), dim=-1)


def _features(out: object) -> torch.Tensor:
    # transformers 4 returns the projected tensor; 5 returns an output whose pooler_output it is.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@dataclass(frozen=True, eq=False)
class Scorers:
    """What one evaluation scores with; a model left out (None) skips its metrics."""

    dino: DinoScorer | None
    clip: ClipScorer | None
    proxy: bool = True


def scorer_names(config: EvaluateConfig, models_dir: Path | None = None) -> dict[str, str]:
    """Identities of the DINO and CLIP models `load_scorers` would load, without loading them.

    An evaluation's id includes them, so pointing config at another model, or saving a
    new model into the same folder, re-scores instead of reusing old numbers.
    """
    names = {}
    for key, model, what, random_name in (("dino", config.dino_model, "DINO", _random_name("ViTModel")),
                                          ("clip", config.clip_model, "CLIP", _random_name("CLIPModel"))):
        found = _locate(model, what, f"evaluate.{key}_model", config.fallback, models_dir)
        names[key] = (_dino_name(found[1]) if key == "dino" else found[1]) if found else random_name
    return names


def load_scorers(config: EvaluateConfig, *, device: str | torch.device = "cpu",
                 models_dir: Path | None = None) -> Scorers:
    return Scorers(
        dino=load_dino(config.dino_model, fallback=config.fallback, device=device, models_dir=models_dir),
        clip=load_clip(config.clip_model, fallback=config.fallback, device=device, models_dir=models_dir),
        proxy=config.proxy,
    )


def dino_identity(model: str, key: str, models_dir: Path | None = None) -> str:
    """The name `load_dino(model, key=key)` would give its scorer, without loading it."""
    found = _locate(model, "DINO", key, "error", models_dir)
    return _dino_name(found[1]) if found else _random_name("ViTModel")


def load_dino(model: str, *, fallback: str = "error", device: str | torch.device = "cpu",
              models_dir: Path | None = None, key: str = "evaluate.dino_model") -> DinoScorer:
    """`model` is "random-test", a local folder (also looked for under `models_dir`), or a
    cached hub id such as "facebook/dino-vits16"; `key` is the setting errors name."""
    from transformers import ViTModel

    found = _locate(model, "DINO", key, fallback, models_dir)
    if found is None:
        return _ready(random_dino(), device)
    folder, name = found
    vit = _from_folder(ViTModel, folder, name, add_pooling_layer=False)
    preprocess = functools.partial(dino_eval_transform, crop=vit.config.image_size)
    return _ready(DinoScorer(name=_dino_name(name), kind=PRETRAINED, model=vit, preprocess=preprocess), device)


def _dino_name(name: str) -> str:
    return f"{name}+{DINO_EVAL}"


def dino_eval_transform(images: Sequence[Image.Image], crop: int = 224) -> torch.Tensor:
    """DINO's evaluation transform, as torchvision's Resize(256, bicubic) + CenterCrop(224)
    + ToTensor + Normalize(ImageNet) computes it; a model of another input size keeps the
    256:224 ratio. [N, 3, crop, crop]."""
    import numpy as np

    short = round(crop * 256 / 224)
    arrays = []
    for image in images:
        image = image.convert("RGB")
        w, h = image.size
        # torchvision: the short side becomes `short`, the long side int(short * long / short_side).
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
        arrays.append(np.asarray(image.crop((left, top, left + crop, top + crop)), np.float32))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    return (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def load_clip(model: str, *, fallback: str = "error", device: str | torch.device = "cpu",
              models_dir: Path | None = None) -> ClipScorer:
    """As `load_dino`, for a CLIPModel folder that also holds its tokenizer."""
    from transformers import CLIPModel, CLIPTokenizer

    found = _locate(model, "CLIP", "evaluate.clip_model", fallback, models_dir)
    if found is None:
        return _ready(random_clip(), device)
    folder, name = found
    clip = _from_folder(CLIPModel, folder, name)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelNotAvailable(f"CLIP scoring model {name!r} has no usable tokenizer in {str(folder)!r} "
                                f"({exc}); save the CLIPTokenizer into the same folder") from exc
    preprocess, name = _folder_preprocess(folder, name, clip.config.vision_config.image_size)
    return _ready(ClipScorer(name=name, kind=PRETRAINED, model=clip, preprocess=preprocess,
                             tokenizer=tokenizer), device)


def random_dino(seed: int = RANDOM_SEED) -> DinoScorer:
    """A tiny random ViTModel (2 layers, width 32, 16 px patches on 64 px images)."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                       image_size=_TINY_IMAGE, patch_size=16)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        vit = ViTModel(config, add_pooling_layer=False)
    return DinoScorer(name=_random_name("ViTModel", seed), kind=RANDOM_TEST, model=vit,
                      preprocess=functools.partial(resize_normalise, side=_TINY_IMAGE))


def random_clip(seed: int = RANDOM_SEED) -> ClipScorer:
    """A tiny random CLIPModel with the project's tiny CLIP tokenizer (subjectflow.models.tiny)."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = _tiny_tokenizer()
    shared = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    config = CLIPConfig(
        text_config=dict(shared, max_position_embeddings=MAX_LENGTH, vocab_size=len(tokenizer),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(shared, image_size=_TINY_IMAGE, patch_size=16),
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPModel(config)
    return ClipScorer(name=_random_name("CLIPModel", seed), kind=RANDOM_TEST, model=clip,
                      preprocess=functools.partial(resize_normalise, side=_TINY_IMAGE), tokenizer=tokenizer)


def _random_name(model_class: str, seed: int = RANDOM_SEED) -> str:
    return f"{RANDOM_TEST}:{model_class}@seed{seed}"


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer() -> CLIPTokenizer:
    return build_tokenizer()  # learns its BPE (~1 s); it is only read afterwards


def resize_normalise(images: Sequence[Image.Image], side: int, mean: Sequence[float] = (0.5, 0.5, 0.5),
                     std: Sequence[float] = (0.5, 0.5, 0.5)) -> torch.Tensor:
    """The plain preprocessing: bicubic resize to side x side, scale to [0, 1], normalise."""
    import numpy as np

    arrays = [np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC), np.float32)
              for image in images]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _ready(scorer: ImageScorer, device: str | torch.device) -> ImageScorer:
    scorer.model.requires_grad_(False)
    scorer.model.eval()
    scorer.model.to(device)
    return scorer


def _locate(model: str, what: str, key: str, fallback: str, models_dir: Path | None) -> tuple[Path, str] | None:
    """(folder, scorer name) of a model on this machine, or None for the random-test model."""
    if fallback not in ("random-test", "error"):
        raise ValueError(f"evaluate.fallback {fallback!r} is not one of 'random-test', 'error'")
    if model == RANDOM_TEST:
        return None
    candidates = [Path(model).expanduser()] + ([Path(models_dir) / model] if models_dir else [])
    for folder in candidates:
        if folder.is_dir():
            return folder, f"{folder}@{_folder_digest(folder)}"
    if model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") > 1:
        raise ModelNotAvailable(f"{what} scoring model folder {model!r} does not exist; fix {key}, or give a hub id "
                                "such as 'org/name' that is in the local Hugging Face cache")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import HFValidationError, LocalEntryNotFoundError

    try:
        # local_files_only: never touch the network, whatever HF_HUB_OFFLINE says.
        folder = Path(snapshot_download(model, local_files_only=True))
    except HFValidationError as exc:
        raise ModelNotAvailable(f"{what} scoring model {model!r} ({key}) is neither {RANDOM_TEST!r}, a local folder, "
                                f"nor a valid hub id ('org/name'): {exc}") from exc
    except LocalEntryNotFoundError:
        if fallback == "random-test":
            return None
        raise ModelNotAvailable(
            f"{what} scoring model {model!r} ({key}) is not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and scoring never downloads. On a machine with network, run "
            f"`hf download {model}` (older huggingface_hub: `huggingface-cli download {model}`) and copy its "
            f"cache here (or point HF_HOME at it); or set {key} to a local folder written by save_pretrained; "
            f"or set evaluate.fallback to 'random-test' to score with tiny random models (tests only)."
        ) from None
    return folder, f"{model}@{folder.name[:12]}"  # a cached snapshot folder is named by its commit


def _folder_digest(folder: Path) -> str:
    """Identifies a local model cheaply: its JSON configs (model, processor, tokenizer) and
    the names, sizes and modification times of its weight files."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    configs = {p.name: p.read_text() for p in files if p.suffix == ".json"}
    weights = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.name.endswith(_WEIGHT_SUFFIXES)}
    return stable_hash({"configs": configs, "weights": weights})[:12]


def _from_folder(model_class: type, folder: Path, name: str, **kwargs: object) -> ViTModel | CLIPModel:
    wanted = model_class.config_class.model_type
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise ModelNotAvailable(f"scoring model {name!r}: {str(folder)!r} is not a transformers model folder "
                                f"(no readable config.json: {exc}); point the setting at what save_pretrained "
                                "wrote") from exc
    if model_type != wanted:  # checked first: loading the wrong class would build a full-size random model
        raise ModelNotAvailable(f"scoring model {name!r} in {str(folder)!r} is a {model_type!r} model, but "
                                f"{model_class.__name__} needs {wanted!r}; point the setting at the right model")
    try:
        model, info = model_class.from_pretrained(folder, local_files_only=True, output_loading_info=True, **kwargs)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelNotAvailable(f"scoring model {name!r} in {str(folder)!r} cannot be loaded as "
                                f"{model_class.__name__}: {exc}") from exc
    missing = list(info.get("missing_keys") or [])
    if missing:  # transformers would fill them with random weights and call the result pretrained
        raise ModelNotAvailable(
            f"scoring model {name!r} in {str(folder)!r} is not a complete {model_class.__name__}: "
            f"{len(missing)} weights are missing (e.g. {missing[0]!r}); point the setting at the right model"
        )
    return model


def _folder_preprocess(folder: Path, name: str, side: int) -> tuple[Preprocess, str]:
    """The image processor saved with a CLIP model; without one, resize + CLIP's normalisation
    (and the scorer's name says so, since scores then differ from the reference protocol)."""
    if (folder / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ModelNotAvailable(f"the image processor saved with scoring model {name!r} in {str(folder)!r} "
                                    f"cannot be loaded: {exc}") from exc
        return (lambda images: processor(images=list(images), return_tensors="pt")["pixel_values"]), name
    from transformers import image_utils

    return (functools.partial(resize_normalise, side=side, mean=image_utils.OPENAI_CLIP_MEAN,
                              std=image_utils.OPENAI_CLIP_STD), f"{name}+resize-normalise")
