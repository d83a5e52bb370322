"""Scoring models load from a local folder or the local Hugging Face cache, never the
network; an unavailable one becomes a flagged random-test model or a clear error."""

from __future__ import annotations

import re
import socket

import pytest
import torch
from PIL import Image

from subjectflow.config import EvaluateConfig
from subjectflow.evaluation import RANDOM_TEST, load_clip, load_dino, load_scorers, random_clip, random_dino
from subjectflow.evaluation.scorers import dino_eval_transform, scorer_names
from subjectflow.models.loading import ModelNotAvailable

NOT_CACHED = "subjectflow-tests/no-such-scorer"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE set, and any attempt to open a connection recorded and refused."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access during a scorer test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield
    assert attempts == [], "loading a scorer tried to reach the network"


def _save_dino(folder, processor: bool = True):
    from transformers import ViTImageProcessor

    scorer = random_dino(seed=3)
    scorer.model.save_pretrained(folder)
    if processor:
        ViTImageProcessor(size={"height": 64, "width": 64}, resample=Image.Resampling.BICUBIC).save_pretrained(folder)
    return scorer


def _save_clip(folder):
    from transformers import CLIPImageProcessor

    scorer = random_clip(seed=3)
    scorer.model.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(folder)
    scorer.tokenizer.save_pretrained(folder)
    return scorer


def _photo(colour=(200, 40, 40)) -> Image.Image:
    image = Image.new("RGB", (80, 72), (230, 230, 230))
    image.paste(colour, (20, 16, 60, 56))
    return image


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_uncached_hub_ids_fall_back_to_flagged_reproducible_random_models(offline):
    from transformers import CLIPModel, ViTModel

    config = EvaluateConfig(dino_model=NOT_CACHED, clip_model=NOT_CACHED, fallback="random-test")
    first, second = load_scorers(config), load_scorers(config)
    assert (first.dino.kind, first.clip.kind) == (RANDOM_TEST, RANDOM_TEST)
    assert first.dino.name.startswith("random-test:ViTModel") and first.clip.name.startswith("random-test:CLIPModel")
    assert isinstance(first.dino.model, ViTModel) and isinstance(first.clip.model, CLIPModel)
    assert first.clip.tokenizer.model_max_length == 77
    # Seeded: a second load scores exactly the same, and the global random state is untouched.
    assert _same_weights(first.dino.model, second.dino.model)
    assert _same_weights(first.clip.model, second.clip.model)
    assert not _same_weights(random_dino(seed=0).model, random_dino(seed=1).model)
    state = torch.random.get_rng_state()
    random_dino()
    assert torch.equal(state, torch.random.get_rng_state())


def test_fallback_error_names_the_model_and_how_to_download_it(offline):
    with pytest.raises(ModelNotAvailable, match=r"hf download subjectflow-tests/no-such-scorer") as dino:
        load_dino(NOT_CACHED, fallback="error")
    assert "evaluate.dino_model" in str(dino.value) and "random-test" in str(dino.value)
    with pytest.raises(ModelNotAvailable, match=r"CLIP scoring model 'subjectflow-tests/no-such-scorer'.*"
                                                r"huggingface-cli download subjectflow-tests/no-such-scorer"):
        load_scorers(EvaluateConfig(dino_model="random-test", clip_model=NOT_CACHED, fallback="error"))


@pytest.mark.parametrize("fallback", ["random-test", "error"])
def test_missing_local_folder_is_an_error_whatever_the_fallback(offline, tmp_path, fallback):
    missing = str(tmp_path / "models" / "dino")
    with pytest.raises(ModelNotAvailable, match=re.escape(f"DINO scoring model folder {missing!r} does not exist")):
        load_dino(missing, fallback=fallback)


def test_invalid_hub_id_is_a_clear_error(offline):
    with pytest.raises(ModelNotAvailable, match=r"nor a valid hub id"):
        load_dino("not a/valid id!", fallback="random-test")


def test_saved_models_load_by_path_as_pretrained(offline, tmp_path):
    """The same from_pretrained path a real downloaded model takes, with its own processor and tokenizer."""
    from transformers import CLIPImageProcessor, ViTImageProcessor

    saved_dino, saved_clip = _save_dino(tmp_path / "dino"), _save_clip(tmp_path / "clip")
    dino, clip = load_dino(str(tmp_path / "dino")), load_clip(str(tmp_path / "clip"))
    assert (dino.kind, clip.kind) == ("pretrained", "pretrained")
    assert dino.name.startswith(f"{tmp_path / 'dino'}@") and clip.name.startswith(f"{tmp_path / 'clip'}@")
    assert _same_weights(dino.model, saved_dino.model) and _same_weights(clip.model, saved_clip.model)

    photos = [_photo(), _photo((30, 60, 200))]
    # DINO is fed DINO's evaluation transform, not the processor its folder ships.
    pixels = dino_eval_transform(photos, crop=64)
    shipped = ViTImageProcessor.from_pretrained(tmp_path / "dino")(images=photos, return_tensors="pt")["pixel_values"]
    assert pixels.shape == shipped.shape and not torch.allclose(pixels, shipped, atol=1e-2)
    expected = torch.nn.functional.normalize(saved_dino.model(pixel_values=pixels).last_hidden_state[:, 0], dim=-1)
    torch.testing.assert_close(dino.embed_images(photos), expected)
    assert dino.name.endswith("+dino-eval-256-224")

    pixels = CLIPImageProcessor.from_pretrained(tmp_path / "clip")(images=photos, return_tensors="pt")["pixel_values"]
    vision = saved_clip.model.vision_model(pixel_values=pixels).pooler_output
    expected = torch.nn.functional.normalize(saved_clip.model.visual_projection(vision), dim=-1)
    torch.testing.assert_close(clip.embed_images(photos), expected)
    torch.testing.assert_close(clip.embed_texts(["a red bowl"]), saved_clip.embed_texts(["a red bowl"]))


def test_a_clip_folder_without_processor_uses_plain_preprocessing_and_says_so(offline, tmp_path):
    _save_clip(tmp_path / "clip")
    (tmp_path / "clip" / "preprocessor_config.json").unlink()
    scorer = load_clip(str(tmp_path / "clip"))
    assert scorer.kind == "pretrained" and scorer.name.endswith("+resize-normalise")
    assert scorer.embed_images([_photo()]).shape == (1, 32)


def test_the_dino_transform_is_resize_256_bicubic_centre_crop_224_imagenet_normalised():
    import numpy as np

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8))  # 200 wide
    pixels = dino_eval_transform([image])
    resized = image.resize((256, 384), Image.Resampling.BICUBIC)  # short side 256: 200x300 -> 256x384
    crop = np.asarray(resized.crop((16, 80, 240, 304)), np.float32) / 255  # centre 224x224
    expected = (crop - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert pixels.shape == (1, 3, 224, 224)
    np.testing.assert_allclose(pixels[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_cached_hub_id_loads_from_the_local_cache(offline, tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--subjectflow-tests--tiny-dino"
    saved = _save_dino(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    scorer = load_dino("subjectflow-tests/tiny-dino", fallback="error")
    assert scorer.kind == "pretrained" and scorer.name == f"subjectflow-tests/tiny-dino@{COMMIT[:12]}+dino-eval-256-224"
    assert _same_weights(scorer.model, saved.model)


def test_a_folder_holding_another_model_is_refused(offline, tmp_path):
    _save_dino(tmp_path / "dino")
    with pytest.raises(ModelNotAvailable, match=r"is a 'vit' model, but CLIPModel needs 'clip'"):
        load_clip(str(tmp_path / "dino"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailable, match=r"not a transformers model folder"):
        load_dino(str(tmp_path / "empty"))


def test_scorer_names_identify_the_models_without_loading_them(offline, tmp_path):
    fallback = EvaluateConfig(dino_model=NOT_CACHED, clip_model=NOT_CACHED, fallback="random-test")
    loaded = load_scorers(fallback)
    assert scorer_names(fallback) == {"dino": loaded.dino.name, "clip": loaded.clip.name}

    _save_dino(tmp_path / "dino"), _save_clip(tmp_path / "clip")
    saved = EvaluateConfig(dino_model=str(tmp_path / "dino"), clip_model=str(tmp_path / "clip"))
    loaded = load_scorers(saved)
    assert scorer_names(saved) == {"dino": loaded.dino.name, "clip": loaded.clip.name}

    # Another model saved into the same folder is another scorer.
    random_dino(seed=4).model.save_pretrained(tmp_path / "dino")
    assert scorer_names(saved)["dino"] != loaded.dino.name
    assert scorer_names(saved)["clip"] == loaded.clip.name
