"""The shared training loop and LoRA adapters on the real tiny model."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from subjectflow.catalog.layout import MODELS_DIR
from subjectflow.config import TrainConfig
from subjectflow.methods.sft import train_sft
from subjectflow.training.loop import make_optimizer
from subjectflow.training.subjects import TuningError, load_subject
from tests.training.conftest import context, ingested_catalog, tiny_config


def lora_tensors(catalog, row):
    return load_file(catalog.blob_path(row["file"]))


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    config = tiny_config()
    straight = ingested_catalog(tmp_path / "a")
    done = train_sft(context(straight, config), load_subject(straight, "red_mug"))

    resumed = ingested_catalog(tmp_path / "b")
    subject = load_subject(resumed, "red_mug")
    interrupted = train_sft(context(resumed, config), subject, stop_after=3)
    assert interrupted == {"adapter_id": done["adapter_id"], "interrupted_at": 3}
    finished = train_sft(context(resumed, config), subject)  # a fresh model, as in a new process

    assert finished["adapter_id"] == done["adapter_id"] and finished["final_loss"] == done["final_loss"]
    a, b = lora_tensors(straight, done), lora_tensors(resumed, finished)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = sorted({r["step"] for r in resumed.read("train_log").to_pylist() if r["metric"] == "loss"})
    assert steps == list(range(1, 7))  # the resumed history continues the interrupted one


def test_an_adapter_loads_into_a_plain_diffusers_pipeline_and_changes_its_output(two_subjects):
    config = tiny_config(train={"steps": 8, "learning_rate": 5e-2})
    row = train_sft(context(two_subjects, config), load_subject(two_subjects, "blue_box"))

    pipe = StableDiffusionPipeline.from_pretrained(two_subjects.root / MODELS_DIR / "tiny-sd")
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return np.asarray(pipe("a photo of sks box", num_inference_steps=2, height=32, width=32,
                               generator=torch.Generator().manual_seed(0)).images[0], dtype=float)

    before = sample()
    path = two_subjects.blob_path(row["file"])
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    after = sample()
    assert np.abs(after - before).mean() > 0.5


@pytest.mark.parametrize("option", [
    {"train": {"optimizer": "sgd"}},
    {"train": {"optimizer": "prodigy", "learning_rate": 1.0}, "sfo": {"learning_rate": 1.0},
     "joint": {"learning_rate": 1.0}, "oneactor": {"learning_rate": 1.0},
     "detex": {"learning_rate": 1.0, "kv_learning_rate": 1.0},
     "concepts": {"learning_rate": 1.0, "kv_learning_rate": 1.0}},
    {"train": {"gradient_accumulation": 2, "batch_size": 2}},
    {"train": {"gradient_checkpointing": True}},
    {"sft": {"prior_preservation": True, "class_images": 2}},
])
def test_every_training_option_runs_a_step(tmp_path, option):
    one_step = {"train": {"steps": 1, **option.get("train", {})}}
    config = tiny_config(**{**option, **one_step})
    catalog = ingested_catalog(tmp_path, subjects=("vase",), per_subject=2)
    row = train_sft(context(catalog, config), load_subject(catalog, "vase"))
    assert row["steps"] == 1 and np.isfinite(row["final_loss"])
    metrics = {r["metric"] for r in catalog.read("train_log").to_pylist()}
    assert ("prior_loss" in metrics) == bool(option.get("sft", {}).get("prior_preservation"))


def test_8bit_adamw_is_refused_off_a_gpu_with_the_setting_to_use_instead():
    config = TrainConfig(optimizer="adamw8bit")
    with pytest.raises(TuningError, match=r"adamw8bit runs on CUDA GPUs only .* use --set train.optimizer=adamw"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], config, 1e-4)


class Quadratic:
    """The loop's Objective on two numbers: fast, and it can be told to diverge."""

    def __init__(self, diverge_at=None):
        self.w, self.calls, self.diverge_at = torch.nn.Parameter(torch.zeros(2)), 0, diverge_at

    def parameters(self):
        return [self.w]

    def loss(self, generator):
        self.calls += 1
        loss = ((self.w - torch.randn(2, generator=generator)) ** 2).sum()
        if self.calls == self.diverge_at:
            loss = loss * float("inf")
        return loss, {"loss": loss.item()}

    def adapter_state(self):
        return {"w": self.w.detach().clone()}

    def load_adapter_state(self, state):
        self.w.data.copy_(state["w"])


def test_a_diverged_loss_stops_the_run_and_names_the_last_good_checkpoint(tmp_path):
    from subjectflow.config import TrainConfig
    from subjectflow.training.loop import checkpoints, train
    from subjectflow.training.subjects import TuningError

    with pytest.raises(TuningError, match=r"diverged: loss inf at step 4 \(last good checkpoint: .*checkpoint-2\)"):
        train(Quadratic(diverge_at=4), TrainConfig(steps=6, checkpoint_every=2), tmp_path, 6, 0.1)
    assert [step for step, _ in checkpoints(tmp_path)] == [2]


def test_without_a_terminal_progress_is_logged_as_lines(tmp_path, capsys):
    from subjectflow.config import TrainConfig
    from subjectflow.training.loop import train

    train(Quadratic(), TrainConfig(steps=5, checkpoint_every=5), tmp_path, 5, 0.1)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train ")]
    assert len(lines) == 1 and lines[0].startswith("train 5/5 steps loss ") and "step/s" in lines[0]


def test_fp16_trains_with_a_loss_scaler_whose_state_resumes_exactly(tmp_path):
    from subjectflow.config import TrainConfig
    from subjectflow.training.loop import checkpoints, train

    config = TrainConfig(steps=6, checkpoint_every=2)
    straight = Quadratic()
    train(straight, config, tmp_path / "a", 6, 0.1, autocast_dtype=torch.float16)
    resumed = Quadratic()
    train(resumed, config, tmp_path / "b", 6, 0.1, autocast_dtype=torch.float16, stop_after=3)
    again = Quadratic()
    train(again, config, tmp_path / "b", 6, 0.1, autocast_dtype=torch.float16)
    assert torch.equal(straight.w, again.w) and not torch.equal(straight.w, torch.zeros(2))
    state = torch.load(checkpoints(tmp_path / "b")[-1][1] / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0  # plain tensors and numbers: loads with weights_only


def test_warmup_scales_the_first_steps_and_clipping_bounds_the_gradient(tmp_path):
    from subjectflow.config import TrainConfig
    from subjectflow.training.loop import step_generator, train

    x1 = torch.randn(2, generator=step_generator(0, 0, 0))  # the first step's target
    warm = Quadratic()
    train(warm, TrainConfig(steps=1, optimizer="sgd", warmup_steps=2, max_grad_norm=0.0), tmp_path / "w", 1, 0.1)
    # SGD from w = 0: grad = -2·x1, lr 0.1 at half strength -> w = 0.1·x1
    torch.testing.assert_close(warm.w.detach(), 0.1 * x1)

    clipped = Quadratic()
    result = train(clipped, TrainConfig(steps=1, optimizer="sgd", max_grad_norm=1e-3), tmp_path / "c", 1, 1.0)
    assert torch.linalg.norm(clipped.w.detach()).item() == pytest.approx(1e-3, rel=1e-4)
    assert result.history[0]["grad_norm"] == pytest.approx(torch.linalg.norm(2 * x1).item(), rel=1e-5)


def test_a_fused_reference_equals_the_adapter_and_the_base_comes_back_bit_for_bit():
    from subjectflow.models.tiny import build_pipeline
    from subjectflow.training.adapters import add_lora, fused, trained_adapter

    unet = build_pipeline(seed=0).unet.eval()
    for p in add_lora(unet, 4, "ref", seed=0):
        p.data.normal_(0, 0.2)  # B starts at zero: give the reference a real delta
    before = {k: v.clone() for k, v in unet.state_dict().items() if "ref" not in k}
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500])
    states = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)

    def eps():
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=states).sample

    with_adapter = eps()
    with fused(unet, "ref"):
        assert "ref" not in getattr(unet, "peft_config", {})
        torch.testing.assert_close(eps(), with_adapter, rtol=1e-4, atol=1e-5)
        with trained_adapter(unet, 4, "policy", seed=1) as trainable:
            assert trainable and all(p.requires_grad for p in trainable)
            unet.disable_adapters()  # the SFO reference pass: the fused weights alone
            torch.testing.assert_close(eps(), with_adapter, rtol=1e-4, atol=1e-5)
            unet.enable_adapters()
    after = {k: v for k, v in unet.state_dict().items() if "ref" not in k and "policy" not in k}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not getattr(unet, "peft_config", {})  # both adapters gone: the next task finds the UNet as it was


def test_a_progress_inside_another_reports_only_through_the_outer_one_off_a_terminal(capsys):
    from subjectflow.progress import progress

    with progress(2, "evaluate", unit="prompt") as prompts:
        for _ in range(2):
            with progress(3, "generate", unit="image") as images:
                for _ in range(3):
                    images.update()
            prompts.update()
    with progress(3, "generate", unit="image") as alone:  # on its own, it reports its end
        alone.update(3)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["evaluate", "generate"], lines
