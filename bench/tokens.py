"""Token methods' training cost against SFT, measured in one run on the same UNet and photos.

Training rows run the project's shared loop (subjectflow.training.loop.train) on one UNet
and the same photo latents: "SFT" = SftObjective with a rank --rank LoRA on every
attention projection and fixed text embeddings (one photo per step); "DETEX" =
DetexObjective: a rank --rank LoRA on the cross-attention K/V only, the subject token's
row and the two mappers, the prompt re-encoded by the text encoder every step (gradients
reach the token through it), the masked loss and the row restore after each step;
"Concepts" = the concept tokens + masks method's M-step (ConceptObjective, built by
subjectflow.methods.concepts.concept_objective as `concepts learn` builds it, with the
config's defaults: tokens only, no K/V LoRA): a random non-empty subset of each photo's
concepts per step, the prompt re-encoded, the loss restricted to the union of their masks.
Each row's s/step is its best of --rounds interleaved rounds of --steps timed steps after
--warmup; "to train" is s/step times the method's default step count (400 each), an
extrapolation, printed as such; Concepts' line adds its E-steps (one every
concepts.e_step_every steps).

The photos: PHOTOS drawn demo photos of one subject (subjectflow.demo_photos), ingested
into a scratch catalog at --resolution and VAE-encoded; the concept set is that subject
("subject:red_mug") and the background of its first photo ("image:ID:background=bg"), so
every row trains on the same PHOTOS latents (DETEX's masks are their ingest masks).

E-step: ConceptObjective.e_step over every photo (the prompt naming its concepts through
the UNet at concepts.e_step_timesteps with the attention recorder on, maps refined into
hard masks by --refine), one untimed then --e-steps timed, from the objective's own
e_step_seconds / refine_seconds. Refinement: subjectflow.methods.concepts.em.refine per
image for each refiner ("crf", the dense CRF, when pydensecrf2 is installed; "otsu") on
the photos at --resolution with soft maps [k, h/4, w/4] (h = the latent side, the
attention level the E-step reads; k = the set's 2 concepts: the photo's ingest mask and
its complement, noised), best of --repeats.

Models: tiny = the project's build_pipeline(seed=0) UNet, VAE and text encoder, 64 px;
sd15 = SD 1.5's UNet, VAE and CLIP ViT-L/14 text encoder architectures (49408-token
vocabulary), random weights (speed does not depend on them; nothing is downloaded),
512 px, with the project's tiny tokenizer padded to CLIP's 49408 ids (so the token
methods' embedding matrix, which each step's optimiser and row restore touch whole, has
SD's size). Text embeddings and DETEX's mapper features are random tensors of the real
shapes.

Run: .venv/bin/python bench/tokens.py                   (tiny, CPU, fp32)
     python bench/tokens.py --arch sd15 --device cuda   (SD 1.5, 512 px, bf16)
Writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from oneactor import checked_timing_arguments, sync, time_training, timing_arguments  # bench/ is on sys.path
from subjectflow.catalog.store import Catalog
from subjectflow.config import ConceptsConfig, DetexConfig, IngestConfig, TrainConfig, load_config
from subjectflow.demo_photos import DEMO_SUBJECTS, write_photo_sets
from subjectflow.ingest import list_source, plan_ingest, process_photos, record_ingest
from subjectflow.methods.base import Context
from subjectflow.methods.concepts import concept_objective
from subjectflow.methods.concepts.em import crf_installed, refine, refiner
from subjectflow.methods.concepts.sources import parse_source, resolve
from subjectflow.methods.detex.model import ATTRIBUTES, AttributeMapper, DetexObjective, training_prompt
from subjectflow.methods.sft import SftObjective
from subjectflow.models.loading import ModelParts
from subjectflow.models.tiny import MAX_LENGTH, build_pipeline, build_tokenizer, write_tokenizer_files
from subjectflow.training.adapters import add_lora, freeze_all_but
from subjectflow.training.subjects import load_subject
from subjectflow.training.tokens import KV_TARGETS, MAP_DOWNSCALE, cross_attention, family_tokens
from tune import build_unet

PHOTOS = 4
SUBJECT = DEMO_SUBJECTS[0]  # red_mug
ROWS = ("SFT", "DETEX", "Concepts")
# CLIP ViT-L/14's text tower, SD 1.5's text encoder.
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 projection_dim=768, max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")
SD15_VAE = dict(  # runwayml/stable-diffusion-v1-5 vae/config.json
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)


def sd15_tokenizer() -> CLIPTokenizer:
    """The tiny tokenizer with unused ids between its merges and its two specials, laid out
    as CLIP's 49408: the same token ids for every word, SD's vocabulary size."""
    with tempfile.TemporaryDirectory(prefix="bench-sd15-tokenizer-") as folder:
        path = write_tokenizer_files(Path(folder))
        vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
        ordered = sorted(vocab, key=vocab.get)
        unused = [f"<unused_{i}>" for i in range(SD15_TEXT["vocab_size"] - len(ordered))]
        tokens = ordered[:-2] + unused + ordered[-2:]
        (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
                                         encoding="utf-8")
        return CLIPTokenizer.from_pretrained(path, model_max_length=MAX_LENGTH)


def text_encoder(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    if args.arch == "tiny":
        tokenizer, encoder = build_tokenizer(), build_pipeline(seed=0).text_encoder
    else:
        tokenizer = sd15_tokenizer()
        torch.manual_seed(0)
        encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id))
    encoder = encoder.to(device, dtype).eval()
    encoder.requires_grad_(False)
    return tokenizer, encoder


def vae(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    if args.arch == "tiny":
        model = build_pipeline(seed=0).vae
    else:
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoencoderKL(**SD15_VAE)
    model = model.to(device, dtype).eval()
    model.requires_grad_(False)
    return model


def photo_catalog(root: Path, resolution: int) -> tuple[Catalog, list[str]]:
    """A scratch catalog holding PHOTOS ingested demo photos of SUBJECT, and the concept
    sources: the subject and its first photo's background."""
    source = write_photo_sets(root / "photos", [SUBJECT], PHOTOS, size=max(resolution, 256))
    catalog = Catalog.create(root / "catalog", root / "catalog" / "dvc.yaml", root / "catalog" / "params.yaml")
    config = IngestConfig(workers=1, resolution=resolution, thumbnail_size=32)
    listing = list_source(str(source))
    plan = plan_ingest(listing, catalog, config.settings_hash())
    record_ingest(catalog, listing, plan, list(process_photos(plan.todo, catalog.root, config)),
                  config.settings_hash())
    first = load_subject(catalog, SUBJECT.name).images[0]["image_id"]
    return catalog, [f"subject:{SUBJECT.name}", f"image:{first[:10]}:background=bg"]


def soft_maps(masks: torch.Tensor, side: int, rng: np.random.Generator) -> list[torch.Tensor]:
    """Per photo, [2, side, side] stand-ins for token maps: the ingest mask [1, R, R] and its
    complement pooled to the attention level, noised (std 0.2) and divided by their max."""
    made = []
    for mask in masks.float().cpu():
        pair = F.adaptive_avg_pool2d(torch.cat([mask, 1 - mask])[None], side)[0]
        noised = (pair + torch.from_numpy(rng.normal(0, 0.2, pair.shape)).float()).clamp_min(0)
        made.append(noised / noised.amax(dim=(1, 2), keepdim=True).clamp_min(1e-6))
    return made


def time_refine(maps: list[torch.Tensor], photos: np.ndarray, how: str, repeats: int) -> float:
    """Seconds per image: best of `repeats` passes over every photo."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for m, photo in zip(maps, photos):
            refine(m, photo, how)
        best = min(best, (time.perf_counter() - start) / len(maps))
    return best


def main() -> None:
    args = parse_args()
    unet, scheduler, device, dtype, factor = build_unet(args)
    tokenizer, encoder = text_encoder(args, device, dtype)
    side = args.resolution // factor
    autocast = None if dtype == torch.float32 else dtype
    width = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    features = 4 * DetexConfig().feature_grid ** 2
    pose, background = (torch.randn(PHOTOS, features, generator=g).to(device) for _ in range(2))
    embeds = torch.randn(1, 77, width, generator=g).to(device)
    config = load_config(overrides={"train": {"resolution": args.resolution, "seed": 0},
                                    "concepts": {"refine": args.refine}}, environ={})
    cc, how = config.concepts, refiner(config.concepts.refine)
    parts = ModelParts(f"bench-{args.arch}", tokenizer, encoder, vae(args, device, dtype), unet, scheduler)

    rows: dict[str, list[float]] = {name: [] for name in ROWS}
    with tempfile.TemporaryDirectory(prefix="bench-tokens-") as scratch, contextlib.ExitStack() as stack:
        catalog, sources = photo_catalog(Path(scratch), args.resolution)
        ctx = Context(catalog, config, f"bench-{args.arch}", lambda: parts)
        concept_set = resolve(catalog, [parse_source(s) for s in sources])
        em = stack.enter_context(concept_objective(ctx, concept_set))  # tokens in place, the UNet frozen
        photos, masks = em.latents, em.references[:, 0]  # [N, 4, h, w], [N, 1, R, R] the subject's
        sft = SftObjective(unet, scheduler, photos, embeds, add_lora(unet, args.rank, "sft", seed=0), 1, "sft")
        kv = add_lora(unet, args.rank, "detex", seed=0, targets=KV_TARGETS)
        mappers = torch.nn.ModuleDict({name: AttributeMapper(features, DetexConfig().mapper_hidden, width, 0.02)
                                       for name in ("pose", "background")}).to(device)
        tokens = stack.enter_context(family_tokens(parts, {"<bench>": "mug"}, args.resolution, ATTRIBUTES))
        detex = DetexObjective(unet, scheduler, tokens, training_prompt("<bench>", "mug"), photos, masks,
                               pose, background, mappers, kv, DetexConfig().kv_learning_rate)
        # Both token sets are in place at once: each row hands the text encoder its own rows.
        for r in range(args.rounds):
            for name in ROWS if r % 2 == 0 else ROWS[::-1]:
                if name == "Concepts":
                    unet.disable_adapters()  # the method's default: tokens only, the plain UNet
                    freeze_all_but(unet, None)
                    em.concepts.install()
                    rows[name].append(time_training(name, em, args, device, autocast, args.out / "work"))
                    continue
                unet.enable_adapters()
                unet.set_adapters([name.lower()])
                freeze_all_but(unet, name.lower())
                if name == "DETEX":
                    tokens.install()
                    with cross_attention(unet):
                        rows[name].append(time_training(name, detex, args, device, autocast, args.out / "work"))
                else:
                    rows[name].append(time_training(name, sft, args, device, autocast, args.out / "work"))
            print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.4f} s" for k, v in rows.items()), flush=True)

        unet.disable_adapters()
        freeze_all_but(unet, None)
        em.concepts.install()
        em.e_step_seconds.clear()
        em.refine_seconds.clear()
        for _ in range(1 + args.e_steps):  # the first warms the recorder's kernels up, untimed
            sync(device)
            em.e_step(len(em.history))
        e_steps, refines = em.e_step_seconds[1:], em.refine_seconds[len(em.present):]
        present = [len(p) for p in em.present]
        trainable = {"SFT": sum(p.numel() for p in sft.parameters()),
                     "DETEX": sum(p.numel() for p in detex.parameters()),
                     "Concepts": sum(p.numel() for p in em.parameters())}
        maps = soft_maps(masks, side // MAP_DOWNSCALE, np.random.default_rng(0))
        refine_s = {r: time_refine(maps, em.photos, r, args.repeats) if r == "otsu" or crf_installed() else None
                    for r in ("crf", "otsu")}

    best = {k: min(v) for k, v in rows.items()}
    steps = {"SFT": TrainConfig().steps, "DETEX": DetexConfig().steps, "Concepts": ConceptsConfig().steps}
    e_best, e_mean = min(e_steps), float(np.mean(e_steps))
    e_count = steps["Concepts"] // cc.e_step_every  # after steps e_step_every, 2 e_step_every, ...
    concepts_total = best["Concepts"] * steps["Concepts"] + e_count * e_best
    ratio = {k: best[k] / best["SFT"] for k in ("DETEX", "Concepts")}
    crf_ratio = refine_s["crf"] / refine_s["otsu"] if refine_s["crf"] is not None else None
    result = {"arch": args.arch, "device": device.type, "precision": args.precision, "resolution": args.resolution,
              "photos": PHOTOS, "s_per_step": best, "to_train_s": {k: best[k] * steps[k] for k in best},
              "rounds": rows,
              "ratios": {"detex_over_sft_per_step": ratio["DETEX"], "concepts_over_sft_per_step": ratio["Concepts"],
                         "crf_over_otsu_per_image": crf_ratio},
              "trainable_parameters": trainable,
              "concepts": {"sources": sources, "concepts_per_photo": present, "refiner": how,
                           "e_step_every": cc.e_step_every, "e_step_timesteps": list(cc.e_step_timesteps),
                           "e_step_s": e_best, "e_step_mean_s": e_mean, "e_step_s_per_photo": e_best / PHOTOS,
                           "e_step_refine_s_per_photo": float(np.mean(refines)), "e_step_rounds": e_steps,
                           "to_train_with_e_steps_s": concepts_total},
              "refine_s_per_image": refine_s,
              "refine_maps": {"concepts": 2, "side": side // MAP_DOWNSCALE, "photo": args.resolution,
                              "repeats": args.repeats}}

    print(f"\n{args.arch} UNet + text encoder, {device.type} {args.precision}, {args.resolution} px (latent {side}); "
          f"best of {args.rounds} rounds; {PHOTOS} photos")
    print(f"{'training':<10}{'s/step':>9}{'steps/s':>9}{'steps':>7}{'to train (s, extrapolated)':>28}")
    for name in best:
        print(f"{name:<10}{best[name]:9.4f}{1 / best[name]:9.2f}{steps[name]:7d}{best[name] * steps[name]:28.1f}")
    print(f"DETEX / SFT per step: {ratio['DETEX']:.2f} (DETEX also runs the text encoder forward and backward each step)")
    print(f"Concepts / SFT per step: {ratio['Concepts']:.2f} (the text encoder forward and backward each step, "
          f"no LoRA: the gradient reaches the token rows through the frozen UNet)")
    print(f"Concepts to train with its {e_count} E-steps (every {cc.e_step_every} steps): {concepts_total:.1f} s "
          f"(extrapolated; E-steps {e_count * e_best / concepts_total:.0%} of it)")
    print(f"E-step ({how}, {PHOTOS} photos, {sum(present)} concept masks, timesteps "
          f"{','.join(map(str, cc.e_step_timesteps))}): {e_best:.4f} s best of {len(e_steps)} (mean {e_mean:.4f}), "
          f"{e_best / PHOTOS:.4f} s per photo, of which refinement {np.mean(refines):.4f} s")
    shown = {r: "not installed" if s is None else f"{s:.4f} s" for r, s in refine_s.items()}
    level = side // MAP_DOWNSCALE
    print(f"refinement per image ({args.resolution} px photo, 2 maps of {level}x{level}, "
          f"best of {args.repeats}): crf {shown['crf']}, otsu {shown['otsu']}"
          + (f": crf / otsu {crf_ratio:.2f}" if crf_ratio is not None else " (pydensecrf2 is not installed)"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    timing_arguments(p)
    p.add_argument("--refine", choices=("auto", "crf", "otsu"), default=ConceptsConfig().refine,
                   help="the E-step's refiner, as concepts.refine (default auto: crf when pydensecrf2 is installed)")
    p.add_argument("--e-steps", type=int, default=3, help="timed E-steps, after one untimed (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="refinement timing: best of N passes (default 3)")
    p.add_argument("--out", type=Path, default=Path("bench/out/tokens"), help="scratch and results.json")
    args = checked_timing_arguments(p)
    if args.e_steps < 1 or args.repeats < 1:
        p.error("need --e-steps >= 1 and --repeats >= 1")
    if args.refine == "crf" and not crf_installed():
        p.error("--refine crf needs the dense CRF: pip install pydensecrf2 (or --refine otsu)")
    return args


if __name__ == "__main__":
    main()
