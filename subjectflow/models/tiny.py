"""The embedded models: "tiny-sd" (the default), "tiny-sdxl", "tiny-sd3" and "tiny-flux",
randomly initialised Stable Diffusion 1.x, SDXL, SD3 and FLUX.1 pipelines.

Tests and demos need a model of the real SD 1.x classes (UNet2DConditionModel with
self/cross `Attention`, AutoencoderKL, CLIPTextModel, CLIPTokenizer, DDPMScheduler) but
the machines have no weights and no network. So the project builds one itself, from a
fixed seed, in the diffusers layout, and everything downstream loads it with the same
`from_pretrained` calls it uses for real models. Its images are noise-like: never
present numbers measured on it as quality.

Sizes follow diffusers' own pipeline test configs, so a 64 px, 2-step generation takes
well under a second on a CPU. tiny-sdxl has SDXL's parts at the same sizes: two CLIP text
encoders (the second with a projection, whose pooled output conditions the UNet with the
size "time ids"), a UNet with `addition_embed_type="text_time"` and SDXL's VAE scale.
tiny-flux has FLUX.1-dev's: a FluxTransformer2DModel with guidance embedding, a CLIP and a
T5 encoder (its Unigram tokenizer written here over the same corpus), FLUX's VAE shift and
scale, and its flow-matching scheduler with resolution-dependent shifting. tiny-sd3 has
SD3's: an SD3Transformer2DModel, two CLIP encoders with projections and a T5, SD3's VAE
shift and scale, and its flow-matching scheduler (shift 3).
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch, diffusers and transformers take seconds to import; load them on use
    from diffusers import DiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTokenizer, T5TokenizerFast

TINY_SD = "tiny-sd"
TINY_SDXL = "tiny-sdxl"
TINY_SD3 = "tiny-sd3"
TINY_FLUX = "tiny-flux"
TINY_MODELS = (TINY_SD, TINY_SDXL, TINY_SD3, TINY_FLUX)

MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
_MAX_MERGES = 480  # at most 512 byte symbols + 480 merges + 2 specials
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
T5_MAX_LENGTH = 512

# DreamBench's object prompt templates ("{}" = "sks <class noun>") and class nouns,
# plus the product words the pipeline itself writes into prompts. The BPE learnt over
# them turns these words into single tokens, as CLIP's real vocabulary would.
_TEMPLATES = (
    "a photo of a {}", "a {} in the jungle", "a {} in the snow", "a {} on the beach",
    "a {} on a cobblestone street", "a {} on top of pink fabric", "a {} on top of a wooden floor",
    "a {} with a city in the background", "a {} with a mountain in the background",
    "a {} with a blue house in the background", "a {} on top of a purple rug in a forest",
    "a {} with a wheat field in the background",
    "a {} with a tree and autumn leaves in the background",
    "a {} with the eiffel tower in the background", "a {} floating on top of water",
    "a {} floating in an ocean of milk", "a {} on top of green grass with sunflowers around it",
    "a {} on top of a mirror", "a {} on top of the sidewalk in a crowded street",
    "a {} on top of a dirt road", "a {} on top of a white rug", "a red {}", "a purple {}",
    "a shiny {}", "a wet {}", "a cube shaped {}",
    # DreamBench's live-subject prompts
    "a {} wearing a red hat", "a {} wearing a santa hat", "a {} wearing a rainbow scarf",
    "a {} wearing a black top hat and a monocle", "a {} in a chef outfit",
    "a {} in a firefighter outfit", "a {} in a police outfit", "a {} wearing pink glasses",
    "a {} wearing a yellow shirt", "a {} in a purple wizard outfit",
)
_CLASS_NOUNS = (
    "teapot backpack bowl can candle clock sneaker boot toy glasses vase dog cat mug bottle "
    "box lamp bag chair shoe watch cup plush animal cartoon"
).split()
_EXTRA_WORDS = (
    "black white red orange yellow green blue purple pink brown grey gold silver product "
    "studio picture image close up"
).split()


def _corpus_word_counts() -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for noun in _CLASS_NOUNS:
        for template in _TEMPLATES:
            counts.update(re.findall(r"[a-z]+", template.format(f"sks {noun}")))
    counts.update(_EXTRA_WORDS)
    return counts


def _learn_merges(word_counts: collections.Counter[str], byte_symbol: dict[int, str],
                  max_merges: int) -> list[tuple[str, str]]:
    """Plain BPE (Sennrich et al.) over byte-level symbols, CLIP style: the last symbol
    of each word carries `</w>`. Ties break on the pair itself, so it is deterministic."""
    words: dict[tuple[str, ...], int] = {}
    for word, count in sorted(word_counts.items()):
        symbols = [byte_symbol[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        words[tuple(symbols)] = count
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break  # every corpus word is already one token
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        words = {_merge(symbols, best): count for symbols, count in words.items()}
    return merges


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def write_tokenizer_files(folder: Path) -> Path:
    """Write CLIP-format vocab.json + merges.txt. The vocabulary is laid out like CLIP's:
    256 byte symbols, the same with `</w>`, one token per merge, then the two specials,
    so any text still tokenises (byte fallback) while domain words are single tokens."""
    try:  # transformers < 5 keeps it beside the slow CLIP tokenizer
        from transformers.models.clip.tokenization_clip import bytes_to_unicode
    except ImportError:  # transformers 5 dropped the slow tokenizer; the mapping lives here
        from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_symbol = bytes_to_unicode()
    merges = _learn_merges(_corpus_word_counts(), byte_symbol, _MAX_MERGES)
    tokens = list(byte_symbol.values())
    tokens += [t + END_OF_WORD for t in tokens]
    tokens += ["".join(pair) for pair in merges]
    tokens += [BOS, EOS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def build_tokenizer() -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="tiny-sd-tokenizer-") as folder:
        return CLIPTokenizer.from_pretrained(write_tokenizer_files(Path(folder)), model_max_length=MAX_LENGTH)


def build_t5_tokenizer() -> T5TokenizerFast:
    """A Unigram tokenizer in T5's format (a "▁" marks a word start, "</s>" ends the text):
    each corpus word is one piece, and single characters spell out any other word."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = sorted(_corpus_word_counts())
    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in words]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {T5_EOS}", special_tokens=[(T5_EOS, 1)])
    with tempfile.TemporaryDirectory(prefix="tiny-t5-tokenizer-") as folder:
        tokenizer.save(str(Path(folder) / "tokenizer.json"))
        (Path(folder) / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "T5Tokenizer", "model_max_length": T5_MAX_LENGTH, "extra_ids": 0,
            "pad_token": T5_PAD, "eos_token": T5_EOS, "unk_token": T5_UNK}))
        return T5TokenizerFast.from_pretrained(folder)


def build_pipeline(seed: int = 0, name: str = TINY_SD) -> DiffusionPipeline:
    """The tiny pipeline `name` in memory. Each module is created right after re-seeding,
    so its weights depend only on `seed`, not on what was built before it."""
    import torch

    if name not in TINY_MODELS:
        raise ValueError(f"no embedded model {name!r}; they are {', '.join(TINY_MODELS)}")
    tokenizer = build_tokenizer()
    build = {TINY_SD: _seeded_pipeline, TINY_SDXL: _seeded_sdxl, TINY_SD3: _seeded_sd3, TINY_FLUX: _seeded_flux}[name]
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        return build(tokenizer, seed)


def _text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
        projection_dim=32, layer_norm_eps=1e-5, max_position_embeddings=MAX_LENGTH,
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def _vae(seed: int, scaling_factor: float, **flux: float | bool):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # Two blocks -> vae_scale_factor 2: 64 px images are 32x32 latents, the UNet's sample_size.
    return AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4, norm_num_groups=32, sample_size=64, scaling_factor=scaling_factor, **flux,
    )


def _scheduler():
    from diffusers import DDPMScheduler

    # SD 1.x's and SDXL's noise schedule. (SD's `set_alpha_to_one` belongs to DDIM/PNDM, not DDPM.)
    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type="epsilon", clip_sample=False, steps_offset=1,
    )


def _seeded_pipeline(tokenizer: CLIPTokenizer, seed: int) -> DiffusionPipeline:
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32,
    )
    vae = _vae(seed, 0.18215)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _seeded_sdxl(tokenizer: CLIPTokenizer, seed: int) -> DiffusionPipeline:
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    # diffusers' SDXL pipeline test UNet: cross-attention over both encoders' states side by
    # side (32 + 32), and an added embedding of 6 size ids x 8 + the 32-wide pooled text.
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=32,
    )
    vae = _vae(seed, 0.13025)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer))
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=_scheduler(),
    )


def _t5(tokenizer: T5TokenizerFast, seed: int, width: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    ))


def _seeded_sd3(tokenizer: CLIPTokenizer, seed: int) -> DiffusionPipeline:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    t5_tokenizer = build_t5_tokenizer()
    torch.manual_seed(seed)
    # diffusers' SD3 pipeline test transformer, except that T5 is 64 wide: the two CLIPs'
    # states side by side (32 + 32) are padded to T5's width, as SD3 pads 2,048 to 4,096.
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4,
    )
    vae = _vae(seed, 1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer, text_encoder_3=_t5(t5_tokenizer, seed + 2, 64), tokenizer_3=t5_tokenizer,
    )


def _seeded_flux(tokenizer: CLIPTokenizer, seed: int) -> DiffusionPipeline:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    t5_tokenizer = build_t5_tokenizer()
    torch.manual_seed(seed)
    # diffusers' FLUX pipeline test transformer, taking 2x2 patches of 4 latent channels
    # (16 inputs); its rotary axes (4 + 4 + 8) make up the 16-wide attention head.
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    vae = _vae(seed, 0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    text_encoder_2 = _t5(t5_tokenizer, seed + 1, 32)
    # FLUX.1-dev's scheduler: the sigma schedule is shifted by the image's token count at sampling.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer, transformer=transformer,
    )


def build_tiny_sd(dest: Path, seed: int = 0) -> Path:
    return build_tiny(dest, TINY_SD, seed)


def build_tiny(dest: Path, name: str, seed: int = 0) -> Path:
    """Save the tiny pipeline `name` to `dest` (diffusers layout) and return `dest`.

    An existing pipeline at `dest` is returned untouched. The model is written to a
    hidden sibling folder and renamed into place, so a crash or a concurrent builder
    never leaves a half-written model that looks complete.
    """
    dest = Path(dest)
    if (dest / "model_index.json").is_file():
        return dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(
            f"{dest} exists but is not a diffusers pipeline folder (no model_index.json); "
            f"remove it and {name!r} will be rebuilt there"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        pipe = build_pipeline(seed, name)
        pipe.save_pretrained(tmp, safe_serialization=True)
        # transformers 5 saves only tokenizer.json; the CLIP-format files beside it let
        # transformers 4's slow CLIPTokenizer load the folder too, as with real SD repos.
        for folder in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            if type(getattr(pipe, folder, None)).__name__.startswith("CLIPTokenizer"):
                write_tokenizer_files(tmp / folder)
        _fsync_tree(tmp)
        try:
            if dest.exists():
                dest.rmdir()  # empty (checked above); only an absent name takes a rename everywhere
            os.rename(tmp, dest)
        except OSError:
            if not (dest / "model_index.json").is_file():
                raise
            # Another process finished first: keep its model, drop ours.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return dest


def ensure_tiny_sd(models_dir: Path) -> Path:
    return ensure_tiny(models_dir, TINY_SD)


def ensure_tiny(models_dir: Path, name: str) -> Path:
    return build_tiny(Path(models_dir) / name, name)


def _fsync_tree(root: Path) -> None:
    # Durable before the rename: otherwise a power cut could leave model_index.json
    # in place beside truncated weights, which would never be rebuilt.
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
