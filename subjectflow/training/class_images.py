"""Prior-preservation class images (DreamBooth, Ruiz et al. 2023, eq. 2): the base model's
own samples of "a photo of {class}", kept in the `class_images` table one row per image, so
every subject of a class, every method and every re-run shares them; a larger count samples
only the images it adds. diffusers' train_dreambooth.py writes them to a --class_data_dir;
here the catalog is that folder, versioned with the rest."""

from __future__ import annotations

import json

import pyarrow as pa
import torch

from ..catalog.schemas import CLASS_IMAGES
from ..catalog.store import utcnow
from ..config import Config, stable_hash
from ..ingest.photo import encode_png
from ..progress import progress
from .artefacts import file_latents
from .data import class_prompt
from .sampling import sampling_pipeline

STEPS = 50  # the pipeline default train_dreambooth.py samples its class images with
BATCH = 4  # its --sample_batch_size default


def class_image_params(config: Config, base: str, class_name: str, index: int) -> dict:
    return {"base": base, "prompt": class_prompt(class_name), "index": index, "seed": config.train.seed,
            "steps": STEPS, "guidance": config.generate.guidance, "resolution": config.train.resolution}


def planned_class_images(config: Config, base: str, class_name: str) -> list[tuple[str, dict]]:
    """(class_image_id, params) of the `sft.class_images` images a run trains with."""
    params = [class_image_params(config, base, class_name, i) for i in range(config.sft.class_images)]
    return [(stable_hash(p), p) for p in params]


def class_image_latents(ctx, class_name: str) -> torch.Tensor:
    """[N, C, h, w] latents of the class's prior images, on the UNet's device; those the
    catalog lacks are sampled (batched) and recorded first, a batch at a time, so an
    interrupted run keeps what it made."""
    planned = planned_class_images(ctx.config, ctx.base, class_name)
    have = {r["class_image_id"]: r for r in ctx.catalog.read(CLASS_IMAGES.name).to_pylist()}
    todo = [(key, params) for key, params in planned if key not in have]
    if todo:
        ctx.say(f"sampling {len(todo)} of {len(planned)} class images of {class_prompt(class_name)!r} "
                f"for prior preservation ({STEPS} steps each)")
        for row in _sample(ctx, class_name, todo):
            have[row["class_image_id"]] = row
        ctx.made.append(f"{len(todo)} {class_name} class images")
    if len(planned) > len(todo):
        ctx.reused.append(f"{len(planned) - len(todo)} {class_name} class images")
    return file_latents(ctx.parts, ctx.catalog, [have[key]["file"] for key, _ in planned], ctx.config.train.resolution)


def _sample(ctx, class_name: str, todo: list[tuple[str, dict]]) -> list[dict]:
    pipe, rows = sampling_pipeline(ctx.parts), []
    with progress(len(todo), "class images", unit="image", say=ctx.say) as shown:
        for start in range(0, len(todo), BATCH):
            batch = todo[start:start + BATCH]
            first = batch[0][1]
            # One generator per image, seeded by its index: image i is the same in any batch
            # and at any count, which is what lets a row be reused by its id.
            images = pipe(first["prompt"], num_images_per_prompt=len(batch), num_inference_steps=STEPS,
                          guidance_scale=first["guidance"], height=first["resolution"], width=first["resolution"],
                          generator=[torch.Generator("cpu").manual_seed(p["seed"] + p["index"]) for _, p in batch]
                          ).images
            made = [{"class_image_id": key, "base_model": ctx.base, "class_prompt": params["prompt"],
                     "index": params["index"], "file": ctx.catalog.put_blob("class_images", encode_png(image), ".png"),
                     "params": json.dumps(params, sort_keys=True), "created_at": utcnow()}
                    for (key, params), image in zip(batch, images)]
            with ctx.catalog.writer():
                ctx.catalog.upsert(CLASS_IMAGES.name, pa.Table.from_pylist(made, schema=CLASS_IMAGES.schema))
            rows += made
            shown.update(len(batch))
    return rows
