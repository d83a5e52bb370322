"""OneActor's maths: projector, feature capture, token offsets, cluster guidance, the
guided sampler and the tuning objective (METHODS.md section 3; Wang et al. 2024,
arXiv 2404.10267, Eq. 19 for the guidance).

The base model stays frozen; a projector phi maps the UNet's mid-block input h of an image
to an offset delta that is added to the text embedding at the subject word's tokens.
Where the released code is defective (METHODS.md lists how) this follows the paper, with
the release's behaviour as an option where it matters for comparison.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import safetensors.torch
import torch
from diffusers import UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from ...models.families import Prompt
from ...training.diffusion import Metrics, denoising_target, noised, per_sample_error, unet_eps

_FORMAT = "oneactor-projector"
# The release's object templates (its imagenet_templates_small), a few of them.
TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a close-up photo of a {}", "a bright photo of the {}", "a good photo of a {}",
)


# --- projector ---------------------------------------------------------------------------

class _Residual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # The release adds a 1x1 shortcut exactly where a block changes shape.
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride) if stride != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.shortcut is None else self.shortcut(x)))


def _halve(n: int) -> int:
    return (n + 1) // 2  # a 3x3/7x7 stride-2 conv with "same" padding rounds up


class Projector(nn.Module):
    """phi: h [B, C, S, S] -> delta [B, text_width], the release's conv ResNet.

    7x7 stride-2 conv C -> C/2 + BN + ReLU, two residual blocks at C/2, then halving stages
    (two residual blocks each, channels and resolution halved) while the map is larger
    than 2x2, at most two; flatten, linear, LayerNorm. This reproduces all three layouts
    the release hard-codes: SDXL 1280x32x32 -> 160x4x4, SD 2.1 1280x12x12 -> 160x2x2,
    SD 1.5 1280x8x8 -> 320x2x2 (one stage fewer).
    """

    def __init__(self, in_channels: int, text_width: int, size: int) -> None:
        super().__init__()
        self.in_channels, self.text_width, self.size = in_channels, text_width, size
        channels, side = in_channels // 2, _halve(size)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 7, stride=2, padding=3),
                                   nn.BatchNorm2d(channels), nn.ReLU(),
                                   _Residual(channels, channels), _Residual(channels, channels)]
        for _ in range(2):
            if side <= 2 or channels < 2:
                break
            layers += [_Residual(channels, channels // 2, stride=2), _Residual(channels // 2, channels // 2)]
            channels, side = channels // 2, _halve(side)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels * side * side, text_width), nn.LayerNorm(text_width))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight)

    @classmethod
    def for_unet(cls, unet: UNet2DConditionModel, text_width: int, sample_size: int | None = None) -> Projector:
        """Sized for `unet`'s mid-block input at latent size `sample_size` (default the
        UNet's own): C = block_out_channels[-1], S = sample_size halved once per down block
        but the last (the last has no downsampler)."""
        config = unet.config
        size = sample_size if sample_size is not None else config.sample_size
        if not isinstance(size, int):
            raise ValueError(f"the projector needs a square latent; got sample_size {size!r}, pass sample_size=<int>")
        for _ in range(len(config.down_block_types) - 1):
            size = _halve(size)
        return cls(int(config.block_out_channels[-1]), text_width, size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.size, self.size)
        if tuple(h.shape[1:]) != expected:
            raise ValueError(f"projector was built for h of shape [B, {', '.join(map(str, expected))}], got "
                             f"{list(h.shape)}; build it with "
                             "Projector.for_unet(unet, width, sample_size=<latent size>)")
        param = self.head[1].weight
        return self.head(self.features(h.to(param.device, param.dtype)))

    def project(self, h: torch.Tensor, batch_stats: bool = False) -> torch.Tensor:
        """Inference: delta [B, text_width] from h [B, C, S, S]. BatchNorm uses its running
        statistics, so each delta depends on its own h only; `batch_stats` reproduces the
        release, which left BN in train mode (delta depends on the batch). Neither changes
        the module: its mode and running statistics are restored."""
        norms = [m for m in self.modules() if isinstance(m, nn.BatchNorm2d)]
        modes = [m.training for m in norms]
        saved = [{k: v.clone() for k, v in m.named_buffers()} for m in norms]
        try:
            for m in norms:
                m.train(batch_stats)
            return self(h)
        finally:
            for m, mode, buffers in zip(norms, modes, saved):
                m.train(mode)
                for k, v in buffers.items():
                    getattr(m, k).copy_(v)


_FEATURES = "cluster."  # key prefix of the cluster features stored beside the weights


def projector_bytes(projector: Projector, features: dict[str, torch.Tensor] | None = None) -> bytes:
    """One safetensors file: the weights (BN statistics included), the constructor args in
    its metadata and, under `cluster.`, the cluster features sampling projects."""
    state = {k: v.detach().contiguous().cpu() for k, v in projector.state_dict().items()}
    state.update({_FEATURES + k: v.detach().contiguous().cpu() for k, v in (features or {}).items()})
    meta = {"format": _FORMAT, "in_channels": str(projector.in_channels),
            "text_width": str(projector.text_width), "size": str(projector.size)}
    return safetensors.torch.save(state, metadata=meta)


def load_projector(data: bytes, device: torch.device | str = "cpu") -> tuple[Projector, dict[str, torch.Tensor]]:
    """(projector in eval mode, the features stored with it) from `projector_bytes`' file."""
    # safetensors' python API reads metadata only from files; the header is 8 bytes of
    # little-endian length followed by JSON, so read it directly from the bytes.
    (length,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + length]).get("__metadata__") or {}
    if meta.get("format") != _FORMAT:
        raise ValueError(f"not a OneActor projector file (metadata format {meta.get('format')!r}, "
                         f"expected {_FORMAT!r}); write it with projector_bytes()")
    projector = Projector(int(meta["in_channels"]), int(meta["text_width"]), int(meta["size"]))
    tensors = safetensors.torch.load(data)
    features = {k[len(_FEATURES):]: v.to(device) for k, v in tensors.items() if k.startswith(_FEATURES)}
    projector.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(_FEATURES)})
    return projector.to(device).eval(), features


# --- features, tokens, offsets -----------------------------------------------------------

@contextlib.contextmanager
def mid_block_input(unet: UNet2DConditionModel) -> Iterator[list[torch.Tensor]]:
    """Within the block, every UNet call appends its mid-block input h [B, C, S, S]
    (detached) to the yielded list: the output of the last down block, OneActor's feature."""
    if getattr(unet, "mid_block", None) is None:
        raise ValueError("this UNet has no mid block (mid_block_type None); OneActor needs its input as the feature h")
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach())

    handle = unet.mid_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def class_token_positions(tokenizer, prompt: str, class_word: str) -> list[int]:
    """Every position of `class_word`'s tokens in the padded input_ids of `prompt` (BOS is
    position 0). A word that BPE splits gets all its sub-tokens (the release crashes there)."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    word = tokenizer(class_word, add_special_tokens=False).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    special = set(tokenizer.all_special_ids)

    def starts_word(i: int) -> bool:  # CLIP ends each word's last token with "</w>"
        return i == 0 or ids[i - 1] in special or tokens[i - 1].endswith("</w>")

    positions = [p for i in range(len(ids) - len(word) + 1)
                 if word and ids[i:i + len(word)] == word and starts_word(i) for p in range(i, i + len(word))]
    if not positions:
        raise ValueError(f"class word {class_word!r} is not in prompt {prompt!r} (within its first "
                         f"{tokenizer.model_max_length} tokens); OneActor puts the subject offset on that word, "
                         f"so write it into the prompt, e.g. 'a photo of a {class_word}'")
    return sorted(set(positions))


def apply_offset(prompt_embeds: Prompt | torch.Tensor, positions: Sequence[int], delta: torch.Tensor,
                 scale: float = 1.0) -> Prompt | torch.Tensor:
    """c' = c + scale·delta at `positions` only: [B, L, D] + delta [B, D] (or [D], [1, D],
    shared); a Prompt's token states take it. A new tensor; every other entry is the
    input's, bit for bit."""
    if isinstance(prompt_embeds, Prompt):  # the token states take the offset; pooled ones stay, as released
        return prompt_embeds.with_states(apply_offset(prompt_embeds.states, positions, delta, scale))
    batch, length, width = prompt_embeds.shape
    index = torch.tensor(sorted(set(positions)), dtype=torch.long, device=prompt_embeds.device)
    if index.numel() == 0 or index.min() < 0 or index.max() >= length:
        raise ValueError(f"token positions {list(positions)} must be non-empty and within 0..{length - 1}")
    offset = (scale * delta.to(prompt_embeds)).reshape(-1, 1, width).expand(batch, index.numel(), width)
    return prompt_embeds.index_add(1, index, offset)


def cluster_guidance(e_uncond: torch.Tensor, e_target: torch.Tensor, e_average: torch.Tensor,
                     eta1: float, eta2: float) -> torch.Tensor:
    """Paper Eq. 19: towards the target cluster, away from the average of the auxiliary one."""
    return e_uncond + eta1 * (e_target - e_uncond) - eta2 * (e_average - e_uncond)


# --- sampling ----------------------------------------------------------------------------

@dataclass(frozen=True)
class GuidanceSettings:
    eta1: float  # towards c + v·delta_tar
    eta2: float  # away from c + delta_aver
    v: float  # scale of the target offset
    guided_steps: int = 20  # cluster guidance on the first steps, plain CFG after
    guidance: float = 7.5  # CFG scale of the plain steps

    def __post_init__(self) -> None:
        if self.guided_steps < 0:
            raise ValueError(f"guided_steps must be >= 0, got {self.guided_steps}")


PRESETS = {
    "paper": GuidanceSettings(eta1=8.5, eta2=1.0, v=0.8),
    # The release passes eta1 as the CFG scale and never applies eta2 (a config key mismatch).
    "released": GuidanceSettings(eta1=7.5, eta2=0.0, v=0.8),
}


def _step_kwargs(scheduler, generator: torch.Generator | None) -> dict:
    # As diffusers' pipelines: DDIM's eta and a generator only where step() takes them.
    accepted = inspect.signature(scheduler.step).parameters
    return {k: v for k, v in (("eta", 0.0), ("generator", generator)) if k in accepted}


def _denoise(scheduler, latents: torch.Tensor, steps: int, generator: torch.Generator | None,
             model_output: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The scheduler loop; `model_output(i, t, x_t)` is the guided eps or v of step i.
    Guidance combines model outputs, so eps and v_prediction models work alike."""
    scheduler.set_timesteps(steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    kwargs = _step_kwargs(scheduler, generator)
    for i, t in enumerate(scheduler.timesteps):
        latents = scheduler.step(model_output(i, t, latents), t, latents, **kwargs, return_dict=False)[0]
    return latents


def _unet(unet, scheduler, latents: torch.Tensor, t: torch.Tensor, embeds: Prompt) -> torch.Tensor:
    copies = embeds.states.shape[0] // latents.shape[0]
    model_input = scheduler.scale_model_input(torch.cat([latents] * copies), t)
    return embeds.predict(unet, unet.dtype, model_input, t)


def _initial_latents(unet, vae, n: int, height: int | None, width: int | None, generator, dtype) -> torch.Tensor:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    height = height or unet.config.sample_size * factor
    width = width or unet.config.sample_size * factor
    shape = (n, unet.config.in_channels, height // factor, width // factor)
    return randn_tensor(shape, generator=generator, device=unet.device, dtype=dtype)


@torch.no_grad()
def sample(unet, scheduler, vae, cond_embeds: Prompt | torch.Tensor, uncond_embeds: Prompt | torch.Tensor,
           delta_target: torch.Tensor, delta_average: torch.Tensor, positions: Sequence[int],
           settings: GuidanceSettings, steps: int = 30, generator: torch.Generator | None = None,
           height: int | None = None, width: int | None = None, num_images: int = 1,
           latents: torch.Tensor | None = None) -> torch.Tensor:
    """Cluster-guided latents [N, C, h, w] (decode with training.data.decode_image).

    cond/uncond_embeds: encoded prompts of batch 1 (uncond = the negative prompt's, or the
    family's unconditional one); delta_* [D] or [1, D]; `positions` = class_token_positions(...) of the prompt. Steps
    0..guided_steps-1 make one UNet call on [uncond, c + v·delta_tar, c + delta_aver] and
    combine them by `cluster_guidance`; later steps plain CFG on [uncond, c].
    Initial noise is drawn as StableDiffusionPipeline draws it, from `generator`.
    """
    cond, uncond = Prompt.of(cond_embeds), Prompt.of(uncond_embeds)
    if latents is None:
        latents = _initial_latents(unet, vae, num_images, height, width, generator, cond.states.dtype)
    n = latents.shape[0]
    target = apply_offset(cond, positions, delta_target, settings.v)
    average = apply_offset(cond, positions, delta_average)
    guided = Prompt.cat([uncond, target, average]).repeat_interleave(n)
    plain = Prompt.cat([uncond, cond]).repeat_interleave(n)

    def model_output(i: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if i < settings.guided_steps:
            return cluster_guidance(*_unet(unet, scheduler, x, t, guided).chunk(3), settings.eta1, settings.eta2)
        e_uncond, e_cond = _unet(unet, scheduler, x, t, plain).chunk(2)
        return e_uncond + settings.guidance * (e_cond - e_uncond)

    return _denoise(scheduler, latents, steps, generator, model_output)


@torch.no_grad()
def sample_with_features(unet, scheduler, vae, class_embeds: Prompt | torch.Tensor,
                         uncond_embeds: Prompt | torch.Tensor,
                         num_images: int, steps: int = 30, guidance: float = 7.5,
                         generator: torch.Generator | None = None, height: int | None = None,
                         width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The auxiliary cluster: plain-CFG base-model samples of the class prompt
    (class_embeds, batch 1) and, as the release records it, the conditional half's
    mid-block input at the last denoising step: (latents [N, C, h, w], h [N, C', S, S])."""
    cond = Prompt.of(class_embeds)
    latents = _initial_latents(unet, vae, num_images, height, width, generator, cond.states.dtype)
    embeds = Prompt.cat([Prompt.of(uncond_embeds), cond]).repeat_interleave(num_images)
    features: list[torch.Tensor] = []

    def model_output(i: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with mid_block_input(unet) if i == steps - 1 else contextlib.nullcontext() as captured:
            e_uncond, e_cond = _unet(unet, scheduler, x, t, embeds).chunk(2)
        if captured is not None:
            features.append(captured[-1][num_images:])
        return e_uncond + guidance * (e_cond - e_uncond)

    return _denoise(scheduler, latents, steps, generator, model_output), features[-1]


def last_timestep(scheduler, steps: int) -> int:
    """The timestep of the last denoising step of a `steps`-step schedule (the lowest t)."""
    scheduler.set_timesteps(steps)
    return int(scheduler.timesteps[-1])


@torch.no_grad()
def last_step_features(unet, scheduler, latents: torch.Tensor, embeds: Prompt | torch.Tensor, steps: int = 30,
                       noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """h [N, C, S, S] of real photos, which have no sampling trajectory: each latent
    [N, C, h, w] noised to the last step of the `steps`-step schedule (`last_timestep`), one
    conditional UNet call with the class prompt's embeds (batch 1), mid-block input kept."""
    t = last_timestep(scheduler, steps)
    if noise is None:
        noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.full((latents.shape[0],), t, dtype=torch.long, device=latents.device)
    noisy = scheduler.scale_model_input(scheduler.add_noise(latents, noise, timesteps), timesteps[0])
    with mid_block_input(unet) as captured:
        Prompt.of(embeds).predict(unet, unet.dtype, noisy, timesteps)
    return captured[-1]


# --- tuning ------------------------------------------------------------------------------

def template_embeddings(encode: Callable[[str], Prompt], tokenizer, class_word: str,
                        templates: Sequence[str] = TEMPLATES) -> tuple[Prompt, list[list[int]]]:
    """The tuning prompts: each template filled with the class word, encoded by `encode`
    (the family's; batch T), and the class word's token positions in each."""
    prompts = [template.format(class_word) for template in templates]
    return Prompt.cat([encode(p) for p in prompts]), [class_token_positions(tokenizer, p, class_word) for p in prompts]


@dataclass
class Example:
    """One tuning example, slots [target, aux_1..aux_k, average]."""

    x0: torch.Tensor  # [k+2, C, h, w]; the average slot is the target's latent
    h: torch.Tensor  # [k+1, C', S, S] of target and auxiliaries
    noise: torch.Tensor  # [k+2, C, h, w]; the average slot has the target's noise
    timesteps: torch.Tensor  # [k+2], each slot its own uniform t
    templates: list[int]  # per slot; the average slot shares the target's prompt


@dataclass
class OneActorObjective:
    """The shared loop's objective: only the projector trains (the caller freezes the UNet).

    Loss = L_tar + aux_weight·L_aux + average_weight·L_aver (METHODS.md section 3), each
    the eps/v MSE of its slots; the average slot is conditioned on the mean auxiliary delta.
    """

    unet: UNet2DConditionModel
    scheduler: object  # the training (DDPM) scheduler: add_noise and prediction_type
    projector: Projector
    target_latents: torch.Tensor  # [N, C, h, w] the subject's photos
    target_h: torch.Tensor  # [N, C', S, S] their last-step features
    aux_latents: torch.Tensor  # [M, C, h, w] base-model samples of the class prompt
    aux_h: torch.Tensor  # [M, C', S, S] their last-step features
    template_embeds: Prompt | torch.Tensor  # batch T, from template_embeddings()
    template_positions: list[list[int]]  # class-word positions in each template
    aux_per_step: int = 3
    aux_weight: float = 0.5
    average_weight: float = 0.2
    flip_p: float = 0.5  # horizontal flip of the latents (h is not flipped, as in the release)
    _dtype: torch.dtype = field(init=False)

    def __post_init__(self) -> None:
        if len(self.target_latents) != len(self.target_h) or len(self.aux_latents) != len(self.aux_h):
            raise ValueError("every latent needs its feature h in the same row (target and auxiliary)")
        self.template_embeds = Prompt.of(self.template_embeds)
        if len(self.template_positions) != len(self.template_embeds.states):
            raise ValueError("template_positions needs one list of positions per template embedding")
        self._dtype = self.unet.dtype

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.projector.parameters())

    def draw(self, generator: torch.Generator) -> Example:
        """All randomness of a step, from the loop's generator (so resuming is exact)."""
        def randint(high: int, n: int) -> torch.Tensor:
            return torch.randint(0, high, (n,), generator=generator, device=generator.device).cpu()

        k = self.aux_per_step
        target, aux = randint(len(self.target_latents), 1), randint(len(self.aux_latents), k)
        templates = randint(len(self.template_positions), k + 1).tolist()
        flips = (torch.rand(k + 1, generator=generator, device=generator.device) < self.flip_p).cpu().tolist()
        x0 = torch.cat([self.target_latents[target], self.aux_latents[aux]])
        x0 = torch.stack([x.flip(-1) if flip else x for x, flip in zip(x0, flips)])
        x0 = torch.cat([x0, x0[:1]])
        noise = torch.randn((k + 1, *x0.shape[1:]), generator=generator, device=generator.device).to(x0.device)
        t = randint(int(self.scheduler.config.num_train_timesteps), k + 2).to(x0.device)
        h = torch.cat([self.target_h[target], self.aux_h[aux]])
        return Example(x0, h, torch.cat([noise, noise[:1]]), t, templates + templates[:1])

    def loss(self, generator: torch.Generator) -> tuple[torch.Tensor, Metrics]:
        return self.example_loss(self.draw(generator))

    def example_loss(self, example: Example) -> tuple[torch.Tensor, Metrics]:
        self.projector.train()  # batch-statistics BN while tuning, as the release (and BN) trains
        delta = self.projector(example.h)  # [k+1, D]
        deltas = torch.cat([delta, delta[1:].mean(dim=0, keepdim=True)])
        embeds = Prompt.cat([apply_offset(self.template_embeds.at(torch.tensor([j])), self.template_positions[j],
                                          deltas[s]) for s, j in enumerate(example.templates)])
        noisy = noised(self.scheduler, example.x0, example.noise, example.timesteps)
        pred = unet_eps(self.unet, self._dtype, noisy, example.timesteps, embeds)
        errors = per_sample_error(pred, denoising_target(self.scheduler, example.x0, example.noise, example.timesteps))
        parts = torch.stack([errors[0], errors[1:-1].mean(), errors[-1]])
        loss = parts[0] + self.aux_weight * parts[1] + self.average_weight * parts[2]
        values = torch.cat([loss[None], parts]).detach().tolist()
        return loss, dict(zip(("loss", "target_loss", "aux_loss", "average_loss"), values))

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.projector.state_dict().items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        self.projector.load_state_dict(state)
