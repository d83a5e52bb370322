"""Concept tokens + masks by EM on the tiny model: what trains, what each E-step records,
composition, the refiners, and that the export is what a plain diffusers user loads."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from subjectflow.catalog.layout import MODELS_DIR
from subjectflow.methods import registry
from subjectflow.methods.concepts import concept_objective, learn_concepts
from subjectflow.methods.concepts.em import crf_installed, iou, refine
from subjectflow.methods.concepts.model import ConceptWeights
from subjectflow.methods.concepts.sources import parse_source, resolve
from subjectflow.training.loop import step_generator
from subjectflow.training.subjects import TuningError, load_subject
from tests.training.conftest import context, ingested_catalog, tiny_config

CONCEPTS = {"steps": 4, "e_step_every": 2, "learning_rate": 1e-2, "refine": "otsu"}
PROMPT = "a photo of <red_mug> on <beach>"


def _sources(catalog):
    box = load_subject(catalog, "blue_box").images[0]["image_id"]
    return ["subject:red_mug", f"image:{box[:10]}:background=beach"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    catalog = ingested_catalog(tmp_path_factory.mktemp("concepts"), per_subject=2)
    config = tiny_config(concepts=CONCEPTS)
    ctx = context(catalog, config)
    registry.learn(ctx, "scene", _sources(catalog))
    return catalog, config, ctx


def _row(catalog):
    return next(r for r in catalog.read("models").to_pylist() if r["method"] == "concepts")


def test_sources_resolve_to_tokens_regions_and_initialisers(tiny):
    catalog, _, _ = tiny
    mug, beach = resolve(catalog, [parse_source(s) for s in _sources(catalog)])
    assert (mug.token, mug.initialiser, len(mug.photos)) == ("<red_mug>", "mug", 2)
    assert {region for _, region in mug.photos} == {"subject"}
    assert (beach.token, beach.initialiser, [region for _, region in beach.photos]) == ("<beach>", "background",
                                                                                         ["background"])
    with pytest.raises(TuningError, match="write subject:NAME"):
        parse_source("photo:1")
    with pytest.raises(TuningError, match="share a token"):
        resolve(catalog, [parse_source("subject:red_mug"), parse_source("subject:blue_box=red_mug")])
    with pytest.raises(TuningError, match="give 1 to 3 concepts"):
        resolve(catalog, [parse_source(f"subject:red_mug={i}") for i in range(4)])
    with pytest.raises(TuningError, match="ambiguous.*SUBJECT/FILE"):
        resolve(catalog, [parse_source("image:00.jpg")])  # every subject has a 00.jpg


@pytest.mark.parametrize("kv", [False, True])
def test_only_the_new_token_rows_and_kv_lora_receive_gradients_and_other_rows_stay(tiny, kv):
    catalog, config, ctx = tiny
    if kv:
        ctx = context(catalog, tiny_config(concepts={**CONCEPTS, "kv": True}))
    parts = ctx.parts
    concepts = resolve(catalog, [parse_source(s) for s in _sources(catalog)])
    unet_before = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    with concept_objective(ctx, concepts) as objective:
        tokens, (rows,) = objective.concepts, objective.concepts.encoders  # SD: one text encoder's rows
        before = rows.embedding.weight.detach().clone()
        optimiser = torch.optim.AdamW([g for g in objective.parameter_groups(1e-2)], weight_decay=0.1)
        for step in range(3):
            objective.loss(step_generator(0, step, 0))[0].backward()
            touched = {id(p) for module in (parts.unet, parts.text_encoder, parts.vae) for p in module.parameters()
                       if p.grad is not None}
            assert touched == {id(p) for p in objective.parameters()}
            assert {id(p) for p in objective.parameters()} - {id(p) for p in objective.kv} == {
                id(rows.embedding.weight)}
            assert bool(objective.kv) == kv and all(name.endswith(("to_k", "to_v")) for name, m in
                                                     parts.unet.named_modules() if hasattr(m, "lora_A"))
            optimiser.step()
            optimiser.zero_grad()
            objective.after_step()
        moved = torch.nonzero((rows.embedding.weight.detach() != before).any(dim=1)).flatten().tolist()
        assert moved == sorted(tokens.ids)
    # the model is given back: no LoRA, the UNet's weights and flags as they were (peft keeps
    # its empty wrapper around a layer once adapted: `base_layer` in the names)
    def unwrapped(state):
        return {k.replace(".base_layer", ""): v for k, v in state.items()}

    after, before = unwrapped(parts.unet.state_dict()), unwrapped(unet_before)
    assert after.keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in after.items())
    assert all(p.requires_grad for p in parts.unet.parameters())


def test_every_e_step_masks_are_binary_recorded_and_scored(tiny):
    catalog, _, _ = tiny
    row = _row(catalog)
    masks = [r for r in catalog.read("concept_masks").to_pylist() if r["model_id"] == row["model_id"]]
    # 2 mug photos + 1 box photo, for the initial masks and after steps 2 and 4
    assert sorted({(r["iteration"], r["step"]) for r in masks}) == [(0, 0), (1, 2), (2, 4)]
    assert len(masks) == 3 * 3
    for r in masks:
        pixels = np.asarray(Image.open(catalog.blob_path(r["file"])))
        assert set(np.unique(pixels)) <= {0, 255}
        assert 0 <= r["iou_ingest"] <= 1 and 0 <= r["coverage"] <= 1
    # iteration 0 is the ingest mask itself (binarised): IoU 1
    assert all(r["iou_ingest"] == pytest.approx(1.0) for r in masks if r["iteration"] == 0)
    log = [r for r in catalog.read("train_log").to_pylist() if r["adapter_id"] == row["model_id"]]
    assert sorted(r["step"] for r in log if r["metric"] == "mask_iou") == [2, 4]
    report = registry.set_report(context(catalog, tiny[1]), "scene")
    assert "<red_mug> from subject:red_mug" in report and "refined by otsu" in report


@pytest.mark.parametrize("how", ["otsu", pytest.param("crf", marks=pytest.mark.skipif(
    not crf_installed(), reason="pydensecrf2 is not installed (`make setup` installs it)"))])
def test_refiners_recover_two_disjoint_regions_from_soft_maps(how):
    rng = np.random.default_rng(0)
    truth = np.zeros((2, 48, 48), bool)
    truth[0, 8:24, 8:24] = True  # a square concept ...
    truth[1, 30:44, 4:44] = True  # ... and a strip below it
    photo = np.full((48, 48, 3), 40, np.uint8)
    photo[truth[0]], photo[truth[1]] = (200, 30, 30), (30, 30, 200)
    photo.flags.writeable = False  # as np.asarray(PIL image) gives it
    soft = np.clip(truth * 0.8 + rng.uniform(0, 0.3, truth.shape), 0, 1)
    # the maps arrive at 1/4 resolution, as the attention level does
    maps = torch.nn.functional.avg_pool2d(torch.from_numpy(soft).float()[None], 4)[0]
    hard = refine(maps, photo, how)
    assert hard.shape == truth.shape and hard.dtype == bool
    assert not (hard[0] & hard[1]).any()
    assert iou(hard[0], truth[0]) > 0.7 and iou(hard[1], truth[1]) > 0.7


def test_a_resumed_run_repeats_the_same_em(tiny, tmp_path):
    catalog, config, _ = tiny
    straight = ConceptWeights.read(catalog.blob_path(_row(catalog)["file"]))
    other = ingested_catalog(tmp_path, per_subject=2)
    assert learn_concepts(context(other, config), "scene", _sources(other), stop_after=3)["interrupted_at"] == 3
    resumed = learn_concepts(context(other, config), "scene", _sources(other))
    for token, vector in straight.vectors.items():
        torch.testing.assert_close(ConceptWeights.read(other.blob_path(resumed["file"])).vectors[token], vector)
    def masks(cat):
        return sorted((r["iteration"], r["concept"], r["file"].split("/")[-1]) for r in cat.read("concept_masks").to_pylist())
    assert [m[:2] for m in masks(other)] == [m[:2] for m in masks(catalog)]


def test_a_composition_samples_and_the_export_reproduces_it_with_stock_diffusers(tiny, tmp_path):
    catalog, config, ctx = tiny
    ours = registry.sample(ctx, "concepts", None, PROMPT, 1)[0]
    assert ours["model_id"] == _row(catalog)["model_id"] and ours["prompt"] == PROMPT
    out = tmp_path / "export"
    files = {p.name for p in registry.export_set(ctx, "scene", out)}
    assert {"learned_embeds-0.safetensors", "learned_embeds-1.safetensors", "README.md"} <= files

    assert _stock_difference(catalog, config, out, ours) <= 1
    with pytest.raises(TuningError, match="no concept set .* holds <teapot>"):
        registry.sample(ctx, "concepts", None, "a photo of <teapot>", 1)


def _stock_difference(catalog, config, out, sample) -> int:
    """The largest pixel difference between `sample` and stock diffusers' image of its prompt
    and seed from the export in `out` (its LoRA too, when there is one)."""
    pipe = StableDiffusionPipeline.from_pretrained(catalog.root / MODELS_DIR / "tiny-sd")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if (out / "pytorch_lora_weights.safetensors").exists():
        pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    for embeds in sorted(out.glob("learned_embeds-*.safetensors")):
        pipe.load_textual_inversion(str(embeds))
    cfg = config.generate
    theirs = pipe(sample["prompt"], num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, height=cfg.resolution,
                  width=cfg.resolution, generator=torch.Generator("cpu").manual_seed(sample["seed"])).images[0]
    ours = np.asarray(Image.open(catalog.blob_path(sample["file"])), dtype=int)
    return int(np.abs(np.asarray(theirs, dtype=int) - ours).max())


def test_learn_and_compose_through_the_cli(tmp_path, capfd):
    from tests.flows.test_methods_flow import _cli

    catalog = ingested_catalog(tmp_path, per_subject=2)
    config = tiny_config(concepts={**CONCEPTS, "kv": True})
    assert _cli(catalog, config, "concepts", "learn", "scene", "--from", "image:nope.jpg") == 2
    err = capfd.readouterr().err
    assert "concepts scene: no ingested photo 'nope.jpg'" in err and "Traceback" not in err
    assert _cli(catalog, config, "concepts", "learn", "scene", *[a for s in _sources(catalog) for a in ("--from", s)],
                "--steps", "2") == 0
    out = capfd.readouterr().out
    assert "<beach>" in out and "IoU ingest" in out
    assert _cli(catalog, config, "generate", "--method", "concepts", "--prompt", PROMPT, "--n", "2") == 0
    samples = [r for r in catalog.read("samples").to_pylist() if r["method"] == "concepts"]
    assert len(samples) == 2 and {r["subject_id"] for r in samples} == {None}
    out = tmp_path / "export"
    assert _cli(catalog, config, "concepts", "export", "scene", "--out", str(out)) == 0
    assert (out / "pytorch_lora_weights.safetensors").exists()  # K/V trained: the LoRA beside the tokens
    assert _stock_difference(catalog, config, out, samples[0]) <= 1
    assert _cli(catalog, config, "generate", "--method", "concepts", "--prompt", "a photo of <teapot>") == 2
    assert "holds <teapot>" in capfd.readouterr().err
    assert _cli(catalog, config, "concepts", "evaluate", "scene") == 0
    out = capfd.readouterr().out
    scores = catalog.read("concept_scores").to_pylist()
    prompts = ["a photo of <red_mug>", "a photo of <beach>", "a photo of <red_mug> and <beach>"]
    assert [r["prompt"] for r in scores if r["metric"] == "clip_t"] == prompts
    assert {(r["prompt"], r["concept"]) for r in scores if r["metric"] == "mdino"} <= {
        (prompts[0], "<red_mug>"), (prompts[1], "<beach>"), (prompts[2], "<red_mug>"), (prompts[2], "<beach>")}
    assert "[random-test scorer: not a quality measure]" in out and "clip_t" in out
    assert _cli(catalog, config, "concepts", "evaluate", "scene") == 0  # already scored so: reused
    assert len(catalog.read("concept_scores").to_pylist()) == len(scores)


def test_drawn_demo_photos_are_scored_against_their_exact_masks(tiny, tmp_path):
    from subjectflow.demo_photos import DEMO_SUBJECTS, drawn_mask, write_photo_sets
    from tests.ingest.helpers import ingest
    from subjectflow.catalog import init_catalog

    _, config, _ = tiny
    root = write_photo_sets(tmp_path / "drawn", DEMO_SUBJECTS[:1], photos_per_subject=2, size=96)
    photo = root / "red_mug" / "00.jpg"
    mask = np.asarray(drawn_mask(photo.read_bytes(), str(photo)))
    assert 0.05 < (mask > 127).mean() < 0.7  # the mug, not the frame
    data = photo.read_bytes()
    assert drawn_mask(data[:-3] + bytes([data[-3] ^ 1]) + data[-2:], str(photo)) is None  # not the drawing
    catalog = init_catalog(tmp_path / "catalog", config)
    ingest(root, catalog, config.ingest)
    learn_concepts(context(catalog, config.model_copy(update={"concepts": config.concepts.model_copy(
        update={"steps": 2})})), "drawn", ["subject:red_mug"])
    rows = catalog.read("concept_masks").to_pylist()
    assert len(rows) == 2 * 2 and all(r["iou_exact"] is not None for r in rows)
    # GrabCut's ingest mask against the drawn truth: a real overlap, not a perfect one
    assert all(0.3 < r["iou_exact"] <= 1 for r in rows if r["iteration"] == 0)
    assert all(r["iou_exact"] is None for r in tiny[0].read("concept_masks").to_pylist())  # block photos: unknown
