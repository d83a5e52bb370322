"""DETEX on the tiny model: what trains, what sampling reads, and that the export is what a
plain diffusers user loads."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save

from subjectflow.catalog.layout import MODELS_DIR
from subjectflow.methods import registry
from subjectflow.methods.detex import detex_objective, train_detex
from subjectflow.methods.detex.model import AttributeMapper, DetexWeights
from subjectflow.training.loop import step_generator
from subjectflow.training.subjects import TuningError, load_subject, scored_as
from tests.training.conftest import context, ingested_catalog, tiny_config

DETEX = {"steps": 4, "mapper_hidden": 16, "learning_rate": 1e-2, "kv_learning_rate": 1e-2}
PROMPT = "a photo of {subject} on a beach"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    catalog = ingested_catalog(tmp_path_factory.mktemp("detex"), subjects=("red_mug",))
    config = tiny_config(detex=DETEX)
    ctx = context(catalog, config)
    registry.tune(ctx, "detex", "red_mug")
    return catalog, config, ctx


def _sample(catalog, config, **generate):
    ctx = context(catalog, config.model_copy(update={"generate": config.generate.model_copy(update=generate)}))
    return [Image.open(catalog.blob_path(r["file"])) for r in registry.sample(ctx, "detex", "red_mug", PROMPT, 1)]


def test_only_the_token_row_kv_lora_and_mappers_receive_gradients(tiny):
    catalog, _, ctx = tiny
    parts = ctx.parts
    embedding_before = parts.text_encoder.get_input_embeddings().weight.detach().clone()
    unet_before = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    with detex_objective(ctx, load_subject(catalog, "red_mug")) as objective:
        objective.loss(step_generator(0, 0, 0))[0].backward()
        touched = {id(p) for module in (parts.unet, parts.text_encoder, parts.vae, objective.mappers)
                   for p in module.parameters() if p.grad is not None}
        assert touched == {id(p) for p in objective.parameters()}
        assert all(name.endswith(("to_k", "to_v")) for name, m in parts.unet.named_modules()
                   if hasattr(m, "lora_A") and "detex" in m.lora_A)
        for p in objective.parameters():
            p.grad = None
    # the model is given back: no new rows, no LoRA, no processors of ours
    assert torch.equal(parts.text_encoder.get_input_embeddings().weight, embedding_before)
    assert parts.unet.state_dict().keys() == unet_before.keys()
    assert all(torch.equal(v, unet_before[k]) for k, v in parts.unet.state_dict().items())


def test_training_leaves_every_other_embedding_row_as_loaded(tiny):
    catalog, _, ctx = tiny
    with detex_objective(ctx, load_subject(catalog, "red_mug")) as objective:
        (concepts,) = objective.concepts.encoders  # SD: one text encoder's rows
        before = concepts.embedding.weight.detach().clone()
        optimiser = torch.optim.AdamW([g for g in objective.parameter_groups(1e-2)], weight_decay=0.1)
        for step in range(2):
            objective.loss(step_generator(0, step, 0))[0].backward()
            optimiser.step()
            optimiser.zero_grad()
            objective.after_step()
        after = concepts.embedding.weight.detach()
        moved = torch.nonzero((after != before).any(dim=1)).flatten().tolist()
        assert moved == [concepts.ids[0]]  # the subject token; the placeholders' rows are replaced, never read


def test_a_resumed_tuning_equals_an_uninterrupted_one(tiny, tmp_path):
    catalog, config, _ = tiny
    straight = DetexWeights.read(catalog.blob_path(registry.current(context(catalog, config), "detex",
                                                                    load_subject(catalog, "red_mug"))[0]["detex"]["file"]))
    other = ingested_catalog(tmp_path, subjects=("red_mug",))
    subject = load_subject(other, "red_mug")
    assert train_detex(context(other, config), subject, stop_after=2)["interrupted_at"] == 2
    resumed = DetexWeights.read(other.blob_path(train_detex(context(other, config), subject)["file"]))
    assert straight.tensors.keys() == resumed.tensors.keys()
    for key, value in straight.tensors.items():
        torch.testing.assert_close(resumed.tensors[key], value, msg=key)


def test_subject_only_sampling_never_calls_the_mappers(tiny, monkeypatch):
    catalog, config, _ = tiny

    def refuse(self, x):
        raise AssertionError("a mapper ran")

    monkeypatch.setattr(AttributeMapper, "forward", refuse)
    assert _sample(catalog, config)
    with pytest.raises(AssertionError, match="a mapper ran"):
        _sample(catalog, config, keep_pose="1")


def test_a_photos_mapper_input_changes_only_the_samples_that_keep_it(tiny, tmp_path):
    catalog, config, ctx = tiny
    path = catalog.blob_path(registry.current(ctx, "detex", load_subject(catalog, "red_mug"))[0]["detex"]["file"])
    original = path.read_bytes()
    settings = [{}, {"keep_pose": "1"}, {"keep_background": "1"}, {"keep_pose": "2"}]
    before = [np.asarray(_sample(catalog, config, **s)[0]) for s in settings]
    weights = DetexWeights.read(path)
    tensors = dict(weights.tensors)
    for name in ("pose", "background"):
        features = tensors[f"detex.{name}_features"].clone()
        features[0] += 5.0  # photo 1's features only
        tensors[f"detex.{name}_features"] = features
    try:
        path.write_bytes(save(tensors, metadata={"format": "pt", "detex.token": weights.token,
                                                 "detex.photos": json.dumps(weights.photos)}))
        after = [np.asarray(_sample(catalog, config, **s)[0]) for s in settings]
    finally:
        path.write_bytes(original)
    same = [np.array_equal(a, b) for a, b in zip(before, after)]
    assert same == [True, False, False, True]


def test_a_photo_that_is_not_in_the_set_is_named_with_the_choices(tiny):
    catalog, config, _ = tiny
    with pytest.raises(TuningError, match=r"generate.keep_pose 'nope.jpg' is not one of red_mug's training photos"):
        _sample(catalog, config, keep_pose="nope.jpg")
    ctx = context(catalog, config.model_copy(update={"generate": config.generate.model_copy(
        update={"keep_background": "1"})}))
    registry.tune(ctx, "sft", "red_mug")
    with pytest.raises(TuningError, match="sft does not learn a photo's pose or background.*detex"):
        registry.sample(ctx, "sft", "red_mug", PROMPT, 1)


def test_the_export_loads_with_stock_diffusers_calls_and_reproduces_the_sample(tiny, tmp_path):
    catalog, config, ctx = tiny
    out = tmp_path / "export"
    files = {p.name for p in registry.export(ctx, "detex", "red_mug", out)}
    assert {"pytorch_lora_weights.safetensors", "learned_embeds.safetensors", "README.md", "detex.safetensors"} <= files
    assert (out / "manifest.json").exists()
    ours = registry.sample(ctx, "detex", "red_mug", PROMPT, 1)[0]

    pipe = StableDiffusionPipeline.from_pretrained(catalog.root / MODELS_DIR / "tiny-sd")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    cfg = config.generate
    theirs = pipe(ours["prompt"], num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, height=cfg.resolution,
                  width=cfg.resolution, generator=torch.Generator("cpu").manual_seed(ours["seed"])).images[0]
    difference = np.abs(np.asarray(theirs, dtype=int) - np.asarray(Image.open(catalog.blob_path(ours["file"])), dtype=int))
    assert difference.max() <= 1
    assert "load_textual_inversion" in (out / "README.md").read_text()


def test_tune_and_generate_with_kept_attributes_through_the_cli(tmp_path, capfd):
    from tests.flows.test_methods_flow import _cli

    catalog = ingested_catalog(tmp_path, subjects=("red_mug",), per_subject=2)
    assert _cli(catalog, tiny_config(detex=DETEX), "tune", "--method", "detex", "--subject", "red_mug",
                "--steps", "2") == 0
    assert "--steps 2 sets detex.steps" in capfd.readouterr().out
    # the config's 4 steps would make another adapter: said in one line, with the --set that uses this one
    assert _cli(catalog, tiny_config(detex=DETEX), "generate", "--method", "detex", "--subject", "red_mug") == 2
    err = capfd.readouterr().err
    assert "detex.steps 2 there, 4 now" in err and "`--set detex.steps=2` uses it" in err and "Traceback" not in err
    evaluate = {"prompts": 1, "images_per_prompt": 1, "methods": ["detex"]}
    cli = lambda *args: _cli(catalog, tiny_config(detex={**DETEX, "steps": 2}, evaluate=evaluate), *args)  # noqa: E731
    photos = load_subject(catalog, "red_mug").images
    assert cli("generate", "--method", "detex", "--subject", "red_mug", "--keep-pose", "2",
               "--keep-background", photos[0]["image_id"][:8]) == 0
    row = catalog.read("samples").to_pylist()[-1]
    assert json.loads(row["params"]) == {"keep_pose": photos[1]["image_id"], "keep_background": photos[0]["image_id"]}
    assert row["prompt"].endswith(", with <pose> pose, in <background> background")
    # with and without a kept pose: two evaluations, reported apart
    assert cli("evaluate") == 0 and cli("evaluate", "--set", "generate.keep_pose=1") == 0
    metrics = catalog.read("metrics").to_pylist()
    assert {scored_as(m) for m in metrics} == {"detex", "detex [keep pose 1]"}
    assert len({m["evaluation_id"] for m in metrics}) == 2
    capfd.readouterr()
    assert cli("generate", "--method", "sft", "--subject", "red_mug", "--keep-pose", "1") == 2
    err = capfd.readouterr().err
    assert "sft does not learn a photo's pose or background" in err and "Traceback" not in err


def test_a_configured_image_encoder_feeds_the_mappers_and_names_the_adapter(tmp_path):
    from subjectflow.evaluation.scorers import random_dino

    encoder = tmp_path / "dino"
    random_dino().model.save_pretrained(encoder)
    catalog = ingested_catalog(tmp_path, subjects=("red_mug",), per_subject=2)
    config = tiny_config(detex={**DETEX, "steps": 2, "image_encoder": str(encoder)})
    row = registry.tune(context(catalog, config), "detex", "red_mug").artefact
    weights = DetexWeights.read(catalog.blob_path(row["file"]))
    width = random_dino().model.config.hidden_size
    assert weights.features("pose").shape == weights.features("background").shape == (2, width)
    assert json.loads(row["params"])["features"].startswith(f"{encoder}@")
    plain = tiny_config(detex={**DETEX, "steps": 2})
    assert registry.artefact_ids(context(catalog, plain), "detex", load_subject(catalog, "red_mug"))["detex"] != \
        row["adapter_id"]
    assert _sample(catalog, config, keep_pose="1")  # sampling reads the stored features, not the encoder
