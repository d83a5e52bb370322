"""CDNS negatives and SFO on the real tiny model."""

import torch

from subjectflow.catalog.schemas import ADAPTERS
from subjectflow.methods import registry
from subjectflow.methods.sfo import train_sfo
from subjectflow.methods.sfo.cdns import Degradation, blur_radius, generic_prompt
from subjectflow.methods.sfo.loss import logit_normal_timesteps
from subjectflow.methods.sfo.negatives import negative_pipeline, planned_negatives, render_negative
from subjectflow.training.adapters import load_lora_file
from subjectflow.training.artefacts import find_row
from subjectflow.training.data import encode_latents, encode_prompt, instance_prompt, load_images
from subjectflow.training.subjects import load_subject
from tests.training.conftest import context, ingested_catalog, tiny_config


def test_sfo_resolves_its_dependencies_then_reuses_them(two_subjects):
    config = tiny_config()
    said = []
    ctx = context(two_subjects, config, said.append)
    first = registry.tune(ctx, "sfo", "red_mug")
    assert [m.split()[0:2] for m in first.made] == [["sft", "adapter"], ["3", "negatives"], ["sfo", "adapter"]]
    assert any("starts from the sft adapter" in s for s in said) and any("CDNS negatives" in s for s in said)
    base = ctx.base
    again = registry.tune(context(two_subjects, config, said.append), "sfo", "red_mug")
    assert again.made == [] and again.artefact["adapter_id"] == first.artefact["adapter_id"]
    # Changing any degradation parameter names new negatives (and so a new SFO adapter).
    subject = load_subject(two_subjects, "red_mug")
    stronger = tiny_config(negatives={"steps": 4, "strength": 0.7})
    old_ids = {nid for nid, _, _ in planned_negatives(subject, config, first.artefact["parent_adapter_id"], base)}
    new_ids = {nid for nid, _, _ in planned_negatives(subject, stronger, first.artefact["parent_adapter_id"], base)}
    assert old_ids and not old_ids & new_ids
    stronger_ctx = context(two_subjects, stronger)
    assert registry.artefact_ids(stronger_ctx, "sfo", subject)["sfo"] != first.artefact["adapter_id"]
    sfo = find_row(two_subjects, ADAPTERS, first.artefact["adapter_id"])
    assert sfo["method"] == "sfo" and find_row(two_subjects, ADAPTERS, sfo["parent_adapter_id"])["method"] == "sft"
    metrics = {r["metric"] for r in two_subjects.read("train_log").to_pylist() if r["adapter_id"] == sfo["adapter_id"]}
    assert {"loss", "reward_margin", "accuracy"} <= metrics


def test_a_negative_is_degraded_as_cdns_says_and_its_record_reproduces_it(two_subjects):
    config = tiny_config(train={"resolution": 32})
    ctx = context(two_subjects, config)
    parts = ctx.parts
    outcome = registry.tune(ctx, "sft", "blue_box")
    negatives = registry.negatives(context(two_subjects, config), "sfo", "blue_box").negatives
    assert len(negatives) == 3
    row = negatives[0]
    assert row["blur_radius"] == blur_radius(32) == 5.0 * 32 / 512
    assert row["prompt"] == generic_prompt("box") and row["generator_adapter_id"] == outcome.artefact["adapter_id"]

    record = {k: row[k] for k in ("blur_radius", "strength", "steps", "guidance", "seed")}
    degradation = Degradation(generic_prompt=row["prompt"], **record)
    image = next(r for r in two_subjects.read("images").to_pylist() if r["image_id"] == row["image_id"])
    pipe = negative_pipeline(parts)
    load_lora_file(parts.unet, two_subjects.blob_path(outcome.artefact["file"]), "sft")
    again = render_negative(pipe, two_subjects.blob_path(image["normalised_file"]), degradation, row["resolution"])
    assert again == two_subjects.blob_path(row["file"]).read_bytes()


def denoising_margin(parts, adapters, positives, negatives, embeds, seed=123):
    """Mean over fixed (eps, t) of err(negative) - err(positive): > 0 means the model
    denoises the real photos better than their degraded negatives."""
    parts.unet.set_adapters(adapters)
    generator = torch.Generator().manual_seed(seed)
    margins = []
    with torch.no_grad():
        for _ in range(16):
            noise = torch.randn(positives.shape, generator=generator)
            t = logit_normal_timesteps(positives.shape[0], 1000, generator)
            errors = []
            for x0 in (positives, negatives):
                noisy = parts.noise_scheduler.add_noise(x0, noise, t)
                pred = parts.unet(noisy, t, encoder_hidden_states=embeds.expand(x0.shape[0], -1, -1)).sample
                errors.append(((pred - noise) ** 2).mean(dim=(1, 2, 3)))
            margins.append((errors[1] - errors[0]).mean())
    return torch.stack(margins).mean().item()


def test_sfo_widens_the_margin_between_held_out_positives_and_their_negatives(tmp_path):
    """Measured, not assumed: SFO trains on 4 photos' pairs; 2 other photos are held out."""
    config = tiny_config(train={"steps": 20, "learning_rate": 2e-3}, sfo={"steps": 40, "learning_rate": 2e-3, "beta": 1000.0},
                         negatives={"steps": 4, "strength": 0.6})
    catalog = ingested_catalog(tmp_path, subjects=("teapot",), per_subject=6)
    ctx = context(catalog, config)
    parts = ctx.parts
    subject = load_subject(catalog, "teapot")
    prepared = registry.negatives(ctx, "sfo", "teapot")
    sft, negatives = prepared.artefact, prepared.negatives
    train_pairs, held_out = negatives[:4], negatives[4:]
    sfo = train_sfo(ctx, subject, sft, train_pairs)

    files = {r["image_id"]: r["normalised_file"] for r in subject.images}
    def latents(paths):
        return encode_latents(parts.vae, load_images([catalog.blob_path(p) for p in paths], 32))
    positives = latents([files[n["image_id"]] for n in held_out])
    negative_latents = latents([n["file"] for n in held_out])
    embeds = encode_prompt(parts.tokenizer, parts.text_encoder, instance_prompt("sks", "teapot"))

    load_lora_file(parts.unet, catalog.blob_path(sft["file"]), "sft")
    load_lora_file(parts.unet, catalog.blob_path(sfo["file"]), "sfo")
    sft_only = denoising_margin(parts, ["sft"], positives, negative_latents, embeds)
    with_sfo = denoising_margin(parts, ["sft", "sfo"], positives, negative_latents, embeds)
    print(f"held-out denoising margin: SFT {sft_only:.5f} -> SFT+SFO {with_sfo:.5f}")
    assert with_sfo > sft_only
