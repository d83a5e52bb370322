"""CDNS negatives and SFO on the real tiny model."""

import torch

from subjectflow.methods.cdns import Degradation, blur_radius, generic_prompt
from subjectflow.methods.sfo import logit_normal_timesteps
from subjectflow.tuning.adapters import load_lora_file
from subjectflow.tuning.data import encode_latents, encode_prompt, instance_prompt, load_images
from subjectflow.tuning.runs import (
    find_adapter, load_subject, negative_pipeline, negatives_for_subject, open_model, planned_negatives,
    render_negative, target_adapter_id, train_sfo, tune_subject,
)
from tests.tuning.conftest import ingested_catalog, tiny_config


def test_sfo_resolves_its_dependencies_then_reuses_them(two_subjects):
    config = tiny_config()
    parts, base = open_model(two_subjects, config)
    said = []
    first = tune_subject(two_subjects, "red_mug", "sfo", config, parts, base, say=said.append)
    assert [m.split()[0:2] for m in first.made] == [["sft", "adapter"], ["3", "negatives"], ["sfo", "adapter"]]
    assert any("starts from an SFT adapter" in s for s in said) and any("CDNS negatives" in s for s in said)
    again = tune_subject(two_subjects, "red_mug", "sfo", config, parts, base, say=said.append)
    assert again.made == [] and again.adapter["adapter_id"] == first.adapter["adapter_id"]
    # Changing any degradation parameter names new negatives (and so a new SFO adapter).
    subject = load_subject(two_subjects, "red_mug")
    stronger = tiny_config(negatives={"steps": 4, "strength": 0.7})
    old_ids = {nid for nid, _, _ in planned_negatives(subject, config, first.adapter["parent_adapter_id"], base)}
    new_ids = {nid for nid, _, _ in planned_negatives(subject, stronger, first.adapter["parent_adapter_id"], base)}
    assert old_ids and not old_ids & new_ids
    assert target_adapter_id(subject, "sfo", stronger, base) != first.adapter["adapter_id"]
    sfo = find_adapter(two_subjects, first.adapter["adapter_id"])
    assert sfo["method"] == "sfo" and find_adapter(two_subjects, sfo["parent_adapter_id"])["method"] == "sft"
    metrics = {r["metric"] for r in two_subjects.read("train_log").to_pylist() if r["adapter_id"] == sfo["adapter_id"]}
    assert {"loss", "reward_margin", "accuracy"} <= metrics


def test_a_negative_is_degraded_as_cdns_says_and_its_record_reproduces_it(two_subjects):
    config = tiny_config(train={"resolution": 32})
    parts, base = open_model(two_subjects, config)
    outcome = tune_subject(two_subjects, "blue_box", "sft", config, parts, base)
    negatives = negatives_for_subject(two_subjects, "blue_box", config, parts, base).negatives
    assert len(negatives) == 3
    row = negatives[0]
    assert row["blur_radius"] == blur_radius(32) == 5.0 * 32 / 512
    assert row["prompt"] == generic_prompt("box") and row["generator_adapter_id"] == outcome.adapter["adapter_id"]

    record = {k: row[k] for k in ("blur_radius", "strength", "steps", "guidance", "seed")}
    degradation = Degradation(generic_prompt=row["prompt"], **record)
    image = next(r for r in two_subjects.read("images").to_pylist() if r["image_id"] == row["image_id"])
    pipe = negative_pipeline(parts)
    load_lora_file(parts.unet, two_subjects.blob_path(outcome.adapter["file"]), "sft")
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
    parts, base = open_model(catalog, config)
    subject = load_subject(catalog, "teapot")
    prepared = negatives_for_subject(catalog, "teapot", config, parts, base)
    sft, negatives = prepared.adapter, prepared.negatives
    train_pairs, held_out = negatives[:4], negatives[4:]
    sfo = train_sfo(catalog, subject, config, parts, base, sft, train_pairs)

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
