"""Token methods' training cost against SFT, measured in one run on the same UNet.

Both rows run the project's shared loop (subjectflow.training.loop.train) on one UNet and
the same photo latents: "SFT" = SftObjective with a rank --rank LoRA on every attention
projection and fixed text embeddings (one photo per step); "DETEX" = DetexObjective: a
rank --rank LoRA on the cross-attention K/V only, the subject token's row and the two
mappers, the prompt re-encoded by the text encoder every step (gradients reach the token
through it), the masked loss and the row restore after each step. Each row's s/step is
its best of --rounds interleaved rounds of --steps timed steps after --warmup; "to train"
is s/step times the method's default step count (400 for both), an extrapolation,
printed as such. Concept tokens (METHODS.md section 5: E-step cost, dense-CRF time per
image) are not built yet, so they have no row.

Models: tiny = the project's build_pipeline(seed=0) UNet and text encoder, 64 px; sd15 =
SD 1.5's UNet and CLIP ViT-L/14 text encoder architectures (49408-token vocabulary),
random weights (speed does not depend on them; nothing is downloaded), 512 px, with the
project's tiny tokenizer (its ids are a subset of the vocabulary). Latents, masks and
mapper features are random tensors of the real shapes.

Run: .venv/bin/python bench/tokens.py                   (tiny, CPU, fp32)
     python bench/tokens.py --arch sd15 --device cuda   (SD 1.5, 512 px, bf16)
Writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from oneactor import checked_timing_arguments, time_training, timing_arguments  # bench/ is on sys.path
from subjectflow.config import DetexConfig, TrainConfig
from subjectflow.methods.detex.model import ATTRIBUTES, AttributeMapper, DetexObjective, training_prompt
from subjectflow.methods.sft import SftObjective
from subjectflow.models.tiny import build_pipeline, build_tokenizer
from subjectflow.training.adapters import add_lora, freeze_all_but
from subjectflow.training.tokens import KV_TARGETS, added_tokens, cross_attention
from tune import build_unet

PHOTOS = 4
# CLIP ViT-L/14's text tower, SD 1.5's text encoder.
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 projection_dim=768, max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")


def text_encoder(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    tokenizer = build_tokenizer()
    if args.arch == "tiny":
        encoder = build_pipeline(seed=0).text_encoder
    else:
        torch.manual_seed(0)
        encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id))
    encoder = encoder.to(device, dtype).eval()
    encoder.requires_grad_(False)
    return tokenizer, encoder


def main() -> None:
    args = parse_args()
    unet, scheduler, device, dtype, factor = build_unet(args)
    tokenizer, encoder = text_encoder(args, device, dtype)
    side = args.resolution // factor
    autocast = None if dtype == torch.float32 else dtype
    width = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    photos = torch.randn(PHOTOS, 4, side, side, generator=g).to(device)
    masks = (torch.rand(PHOTOS, 1, args.resolution, args.resolution, generator=g) > 0.5).float().to(device)
    features = 4 * DetexConfig().feature_grid ** 2
    pose, background = (torch.randn(PHOTOS, features, generator=g).to(device) for _ in range(2))
    embeds = torch.randn(1, 77, width, generator=g).to(device)

    sft = SftObjective(unet, scheduler, photos, embeds, add_lora(unet, args.rank, "sft", seed=0), 1, "sft")
    kv = add_lora(unet, args.rank, "detex", seed=0, targets=KV_TARGETS)
    mappers = torch.nn.ModuleDict({name: AttributeMapper(features, DetexConfig().mapper_hidden, width, 0.02)
                                   for name in ("pose", "background")}).to(device)
    rows: dict[str, list[float]] = {"SFT": [], "DETEX": []}
    with added_tokens(tokenizer, encoder, {"<bench>": "mug"}, ATTRIBUTES) as concepts:
        detex = DetexObjective(unet, scheduler, encoder, concepts, training_prompt("<bench>", "mug"), photos, masks,
                               pose, background, mappers, kv, DetexConfig().kv_learning_rate)
        for r in range(args.rounds):
            for name in (("SFT", "DETEX") if r % 2 == 0 else ("DETEX", "SFT")):
                unet.set_adapters([name.lower()])
                freeze_all_but(unet, name.lower())
                if name == "DETEX":
                    with cross_attention(unet):
                        rows[name].append(time_training(name, detex, args, device, autocast, args.out / "work"))
                else:
                    rows[name].append(time_training(name, sft, args, device, autocast, args.out / "work"))
            print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.4f} s" for k, v in rows.items()), flush=True)

    best = {k: min(v) for k, v in rows.items()}
    steps = {"SFT": TrainConfig().steps, "DETEX": DetexConfig().steps}
    ratio = best["DETEX"] / best["SFT"]
    result = {"arch": args.arch, "device": device.type, "precision": args.precision, "resolution": args.resolution,
              "s_per_step": best, "to_train_s": {k: best[k] * steps[k] for k in best}, "rounds": rows,
              "ratios": {"detex_over_sft_per_step": ratio},
              "trainable_parameters": {"SFT": sum(p.numel() for p in sft.parameters()),
                                       "DETEX": sum(p.numel() for p in detex.parameters())}}
    print(f"\n{args.arch} UNet + text encoder, {device.type} {args.precision}, {args.resolution} px (latent {side}); "
          f"best of {args.rounds} rounds")
    print(f"{'training':<10}{'s/step':>9}{'steps/s':>9}{'steps':>7}{'to train (s, extrapolated)':>28}")
    for name in best:
        print(f"{name:<10}{best[name]:9.4f}{1 / best[name]:9.2f}{steps[name]:7d}{best[name] * steps[name]:28.1f}")
    print(f"DETEX / SFT per step: {ratio:.2f} (DETEX also runs the text encoder forward and backward each step)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    timing_arguments(p)
    p.add_argument("--out", type=Path, default=Path("bench/out/tokens"), help="scratch and results.json")
    return checked_timing_arguments(p)


if __name__ == "__main__":
    main()
