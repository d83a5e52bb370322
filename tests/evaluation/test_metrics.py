"""The metrics against direct computations, on tiny random-test models and drawn products;
the prompt templates. Random-test numbers check the arithmetic, never quality."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from subjectflow.evaluation import (
    PROXY, RANDOM_TEST, SCORER_KINDS, Scorers, class_prompt, clip_t, cosine_matrix, diversity, evaluation_prompts,
    fidelity, ingest_masker, proxy_similarity, random_clip, random_dino, score_subject, subject_crop, summary,
)
from subjectflow.evaluation.prompts import PROPERTY_CHANGES, RECONTEXTUALISATION
from subjectflow.training.sampling import SUBJECT_PLACEHOLDER

SIZE = 96
BOX = (28, 20, 68, 84)  # where the product sits in every drawn photo


@pytest.fixture(scope="module")
def dino():
    return random_dino()


@pytest.fixture(scope="module")
def clip():
    return random_clip()


def product(background: str = "plain", colour=(200, 40, 40), shift: int = 0) -> Image.Image:
    """A bottle-like product (round body, label, neck) on a plain, striped or noisy background."""
    rng = np.random.default_rng(7)
    if background == "plain":
        canvas = np.full((SIZE, SIZE, 3), (235, 235, 225), np.uint8)
    elif background == "stripes":
        canvas = np.zeros((SIZE, SIZE, 3), np.uint8)
        canvas[:, :] = np.where((np.arange(SIZE) // 6 % 2)[:, None, None] == 1, (20, 120, 30), (240, 200, 60))
    else:
        canvas = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    image = Image.fromarray(canvas)
    _draw_product(ImageDraw.Draw(image), colour, shift)
    left, top, right, _ = BOX
    ImageDraw.Draw(image).rectangle((left + 8 + shift, top + 34, right - 8 + shift, top + 48), fill=(250, 250, 250))
    return image


def _draw_product(draw: ImageDraw.ImageDraw, fill, shift: int) -> None:
    left, top, right, bottom = BOX
    draw.ellipse((left + shift, top + 16, right + shift, bottom), fill=fill)  # the body
    draw.rectangle((left + 14 + shift, top, right - 14 + shift, top + 20), fill=fill)  # the neck


def product_mask(shift: int = 0) -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    _draw_product(ImageDraw.Draw(mask), 255, shift)
    return mask


def known_mask(image: Image.Image) -> Image.Image:
    return product_mask()


def test_cosine_matrix_matches_torch():
    a, b = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), torch.randn(4, 8)
    expected = torch.nn.functional.cosine_similarity(a[:, None], b[None], dim=-1)
    torch.testing.assert_close(cosine_matrix(a, b), expected)


def test_identical_images_score_one_and_fidelity_is_the_mean_pairwise_cosine(dino, clip):
    photo = product()
    assert fidelity(dino, [photo], [photo]) == pytest.approx(1.0, abs=1e-6)
    assert fidelity(clip, [photo], [photo]) == pytest.approx(1.0, abs=1e-6)

    generated, references = [product("noise"), product(colour=(30, 60, 200))], [product(), product("stripes")]
    with torch.no_grad():
        cls = dino.model(pixel_values=dino.preprocess(generated + references)).last_hidden_state[:, 0]
        vision = clip.model.vision_model(pixel_values=clip.preprocess(generated + references)).pooler_output
        projected = clip.model.visual_projection(vision)
    for scorer, features in ((dino, cls), (clip, projected)):
        pairs = [torch.nn.functional.cosine_similarity(features[i], features[2 + j], dim=0)
                 for i in range(2) for j in range(2)]
        assert fidelity(scorer, generated, references) == pytest.approx(float(torch.stack(pairs).mean()), abs=1e-5)
    assert fidelity(dino, generated, references) < 1.0 - 1e-3


def test_subject_crop_greys_the_background_and_squares_the_box():
    crop = subject_crop(product("noise"), product_mask())
    left, top, right, bottom = BOX
    height, width = bottom - top + 1, right - left + 1
    assert crop.size == (height, height)
    pixels = np.asarray(crop)
    pad = (height - width) // 2
    assert (pixels[:, :pad] == 128).all() and (pixels[:, pad + width:] == 128).all()  # padding
    assert (pixels[0, pad] == 128).all() and (pixels[-1, pad] == 128).all()  # background inside the box
    assert tuple(pixels[height - 4, pad + width // 2]) == (200, 40, 40)  # the product itself
    assert subject_crop(product(), Image.new("L", (SIZE, SIZE), 0)) is None


def test_masked_variants_ignore_the_background(dino, clip):
    on_stripes, on_noise = product("stripes"), product("noise")
    mask = product_mask()
    masked = proxy_similarity([on_stripes], [on_noise], [mask], [mask])
    whole = proxy_similarity([on_stripes], [on_noise])
    assert masked["proxy_colour"] > whole["proxy_colour"] + 0.3
    assert masked["proxy_edges"] > whole["proxy_edges"]
    assert masked["proxy_colour"] == pytest.approx(1.0) and masked["proxy_edges"] == pytest.approx(1.0)

    crops = subject_crop(on_stripes, mask), subject_crop(on_noise, mask)
    assert fidelity(dino, [crops[0]], [crops[1]]) > fidelity(dino, [on_stripes], [on_noise]) + 1e-3

    values = summary(score_subject({"a {subject} on the beach": [on_stripes]}, [on_noise], [mask], "bottle",
                                   Scorers(dino, clip), known_mask))
    assert values["mdino"] > values["dino"] and values["mclip_i"] > values["clip_i"]


def test_proxy_tells_a_different_product_apart():
    mask = product_mask()
    same = proxy_similarity([product("stripes")], [product("noise")], [mask], [mask])
    other = proxy_similarity([product("stripes", colour=(30, 60, 200))], [product("noise")], [mask], [mask])
    assert other["proxy_colour"] < same["proxy_colour"] - 0.3


def test_diversity_is_zero_for_identical_images_and_positive_otherwise(dino):
    assert diversity(dino, [product(), product()]) == pytest.approx(0.0, abs=1e-6)
    different = [product(), product("noise"), product(shift=-10)]
    assert diversity(dino, different) > 1e-3
    embeddings = dino.embed_images(different)
    pairs = [float(embeddings[i] @ embeddings[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert diversity(dino, different) == pytest.approx(1 - sum(pairs) / 3, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        diversity(dino, [product()])


def test_clip_t_is_a_cosine_that_depends_on_the_prompt(clip):
    images = [product(), product("stripes")]
    beach, gold = clip_t(clip, images, "a bottle on the beach"), clip_t(clip, images, "a bottle made of gold")
    assert all(math.isfinite(v) and -1.0 <= v <= 1.0 for v in (beach, gold))
    assert beach != pytest.approx(gold, abs=1e-4)
    expected = cosine_matrix(clip.embed_images(images), clip.embed_texts(["a bottle on the beach"])).mean()
    assert beach == pytest.approx(float(expected), abs=1e-6)


def test_score_subject_flags_every_score_with_its_scorer(dino, clip):
    beach, gold = f"a {SUBJECT_PLACEHOLDER} on the beach", f"a {SUBJECT_PLACEHOLDER} made of gold"
    generated = {beach: [product("stripes"), product("noise", shift=-8)], gold: [product(colour=(220, 180, 40))]}
    references = [product(), product("stripes", shift=4)]
    masks = [product_mask(), product_mask(shift=4)]
    scores = score_subject(generated, references, masks, "bottle", Scorers(dino, clip), known_mask)

    assert {s.scorer_kind for s in scores} <= set(SCORER_KINDS)
    for score in scores:
        assert math.isfinite(score.value)
        if score.metric.startswith("proxy_"):
            assert score.scorer_kind == PROXY and score.scorer.startswith("proxy:")
        else:
            assert score.scorer_kind == RANDOM_TEST and score.scorer.startswith("random-test:")
    overall = {s.metric: s for s in scores if s.prompt is None}
    assert set(overall) == {"dino", "clip_i", "mdino", "mclip_i", "clip_t", "diversity", "proxy_colour", "proxy_edges"}
    assert overall["dino"].n_images == 3 and overall["diversity"].n_images == 2
    assert [s.prompt for s in scores if s.metric == "diversity"] == [beach, None]  # one image: no diversity
    per_prompt = {(s.metric, s.prompt): s.value for s in scores}
    # DreamBench scores the prompt with the class noun, not the placeholder or identifier.
    assert per_prompt[("clip_t", gold)] == pytest.approx(clip_t(clip, generated[gold], "a bottle made of gold"),
                                                         abs=1e-6)
    assert per_prompt[("dino", beach)] == pytest.approx(fidelity(dino, generated[beach], references), abs=1e-6)
    all_images = [image for images in generated.values() for image in images]
    assert overall["clip_i"].value == pytest.approx(fidelity(clip, all_images, references), abs=1e-6)
    crops = [subject_crop(image, known_mask(image)) for image in all_images]
    reference_crops = [subject_crop(image, mask) for image, mask in zip(references, masks)]
    assert overall["mclip_i"].value == pytest.approx(fidelity(clip, crops, reference_crops), abs=1e-6)
    assert per_prompt[("mdino", beach)] == pytest.approx(fidelity(dino, crops[:2], reference_crops), abs=1e-6)


def test_an_empty_mask_drops_the_image_from_masked_metrics_only(dino):
    found, lost = product("stripes"), product("noise")

    def mask_fn(image):
        return product_mask() if image is found else Image.new("L", image.size, 0)

    scores = score_subject({"a {subject}": [found, lost]}, [product()], [product_mask()], "bottle",
                           Scorers(dino, None, proxy=True), mask_fn)
    counts = {s.metric: s.n_images for s in scores if s.prompt is None}
    assert counts == {"dino": 2, "mdino": 1, "diversity": 2, "proxy_colour": 1, "proxy_edges": 1}


def test_ingest_masker_segments_a_generated_image():
    mask = np.asarray(ingest_masker()(product())) >= 128
    truth = np.asarray(product_mask()) >= 128
    assert (mask & truth).sum() / (mask | truth).sum() > 0.7


def test_evaluation_prompts_are_distinct_mixed_and_deterministic():
    chosen = evaluation_prompts(6)
    assert len(set(chosen.prompts)) == 6 and chosen == evaluation_prompts(6)
    assert set(chosen.prompts) & set(RECONTEXTUALISATION) and set(chosen.prompts) & set(PROPERTY_CHANGES)
    assert all(p.count(SUBJECT_PLACEHOLDER) == 1 for p in chosen.prompts)
    assert chosen.name.startswith("templates-v1@")
    every = evaluation_prompts(len(RECONTEXTUALISATION) + len(PROPERTY_CHANGES))
    assert set(every.prompts) == set(RECONTEXTUALISATION) | set(PROPERTY_CHANGES)
    assert evaluation_prompts(4).prompts == chosen.prompts[:4] and evaluation_prompts(4).name != chosen.name
    with pytest.raises(ValueError, match="prompt templates"):
        evaluation_prompts(len(every.prompts) + 1)


def test_prompt_set_name_changes_with_the_templates():
    edited = (f"a {SUBJECT_PLACEHOLDER} on the moon",) + RECONTEXTUALISATION[1:]
    assert evaluation_prompts(4, recontextualisation=edited).name != evaluation_prompts(4).name
    with pytest.raises(ValueError, match="exactly once"):
        evaluation_prompts(2, property_changes=("a red bottle",))
    assert class_prompt(f"a {SUBJECT_PLACEHOLDER} made of gold", "teapot") == "a teapot made of gold"


def test_evaluation_is_a_plain_library():
    root = Path(__file__).resolve().parents[2] / "subjectflow" / "evaluation"
    imported = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    assert not imported & {"prefect", "dvc", "flows", "tasks"}


def test_generated_images_can_be_masked_by_a_plug_in_segmenter_named_in_the_scores():
    from subjectflow.config import MaskConfig
    from subjectflow.evaluation.metrics import generated_masker

    ingest_default = generated_masker("", MaskConfig(size=32))
    plug_in = generated_masker("tests.ingest.test_pipeline:half_frame", MaskConfig(size=32))
    assert (ingest_default.name, plug_in.name) == ("grabcut", "tests.ingest.test_pipeline:half_frame")
    mask = np.asarray(plug_in.fn(product())) >= 128
    assert mask[:, : mask.shape[1] // 2].all() and not mask[:, mask.shape[1] // 2 + 1:].any()
