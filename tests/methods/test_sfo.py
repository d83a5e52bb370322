"""SFO math on tiny CPU tensors, checked against direct computations (METHODS.md section 1)."""

import copy
import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from subjectflow.methods.sfo.loss import PairBatch, logit_normal, logit_normal_timesteps, noised_pair, sfo_loss, targets
from subjectflow.training.diffusion import denoising_loss as sft_loss

SHAPE = (4, 3, 5, 5)


def sd_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                         beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's: its sigmas are shifted at sampling, by the image's token count."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def err(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error, written out directly."""
    return ((pred - target) ** 2).flatten(1).mean(1)


def ks_statistic(samples: torch.Tensor, cdf) -> float:
    """One-sample Kolmogorov-Smirnov D = sup |F_n(x) - F(x)|."""
    xs = sorted(samples.double().tolist())
    n = len(xs)
    return max(max((i + 1) / n - cdf(x), cdf(x) - i / n) for i, x in enumerate(xs))


def logit_normal_cdf(mean: float, std: float):
    def cdf(x: float) -> float:
        if x <= 0.0:
            return 0.0
        if x >= 1.0:
            return 1.0
        z = (math.log(x / (1 - x)) - mean) / std
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))
    return cdf


def ks_critical(n: int) -> float:
    return 1.628 / math.sqrt(n)  # alpha = 0.01, large-n asymptotic


# --- loss ---------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [1.0, 1000.0, 5000.0])
def test_loss_is_log2_when_policy_equals_reference(beta):
    policy_pos, policy_neg = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    target_pos, target_neg = randn(*SHAPE, seed=3), randn(*SHAPE, seed=4)
    loss, metrics = sfo_loss(policy_pos, policy_neg, policy_pos.clone(), policy_neg.clone(),
                             target_pos, target_neg, beta=beta)
    assert abs(loss.item() - math.log(2)) < 1e-6
    assert abs(metrics["loss"] - math.log(2)) < 1e-6
    assert metrics["reward_margin"] == 0.0
    assert metrics["accuracy"] == 0.0  # a tie is not a win
    assert metrics["policy_error_pos"] == pytest.approx(metrics["ref_error_pos"])


def test_loss_and_metrics_match_a_direct_computation():
    tensors = [randn(*SHAPE, seed=s) for s in range(6)]
    beta = 3.0
    loss, metrics = sfo_loss(*tensors, beta=beta)
    policy_pos, policy_neg, ref_pos, ref_neg, target_pos, target_neg = tensors
    diff = (err(policy_pos, target_pos) - err(policy_neg, target_neg)) - (err(ref_pos, target_pos) - err(ref_neg, target_neg))
    expected = torch.log1p(torch.exp(beta * diff)).mean()  # -log sigmoid(-x) = log(1 + e^x)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert metrics["reward_margin"] == pytest.approx((-diff).mean().item(), rel=1e-6)
    assert metrics["accuracy"] == (diff < 0).float().mean().item()
    assert metrics["ref_error_neg"] == pytest.approx(err(ref_neg, target_neg).mean().item(), rel=1e-6)
    assert set(metrics) == {"loss", "reward_margin", "accuracy", "policy_error_pos",
                            "policy_error_neg", "ref_error_pos", "ref_error_neg"}


def test_gradient_pulls_positive_toward_target_and_pushes_negative_away():
    beta = 1000.0
    target_pos, target_neg = randn(*SHAPE, seed=3), randn(*SHAPE, seed=4)
    ref_pos, ref_neg = randn(*SHAPE, seed=5).requires_grad_(), randn(*SHAPE, seed=6).requires_grad_()
    # Slightly off the reference so the sigmoid weights differ per sample.
    policy_pos = (ref_pos.detach() + 1e-4 * randn(*SHAPE, seed=7)).requires_grad_()
    policy_neg = (ref_neg.detach() + 1e-4 * randn(*SHAPE, seed=8)).requires_grad_()
    loss, _ = sfo_loss(policy_pos, policy_neg, ref_pos, ref_neg, target_pos, target_neg, beta=beta)
    loss.backward()

    with torch.no_grad():
        diff = (err(policy_pos, target_pos) - err(policy_neg, target_neg)) - (err(ref_pos, target_pos) - err(ref_neg, target_neg))
        batch, per_sample = SHAPE[0], math.prod(SHAPE[1:])
        weight = (beta * torch.sigmoid(beta * diff) * 2 / (batch * per_sample)).view(-1, 1, 1, 1)
        torch.testing.assert_close(policy_pos.grad, weight * (policy_pos - target_pos))
        torch.testing.assert_close(policy_neg.grad, -weight * (policy_neg - target_neg))
        # Descent direction: toward target_pos, away from target_neg.
        assert ((-policy_pos.grad) * (target_pos - policy_pos)).flatten(1).sum(1).gt(0).all()
        assert ((-policy_neg.grad) * (policy_neg - target_neg)).flatten(1).sum(1).gt(0).all()
    assert ref_pos.grad is None and ref_neg.grad is None  # the reference never learns


@pytest.mark.parametrize("scheduler", [sd_scheduler(), flux_scheduler()], ids=["ddpm", "flow-matching"])
def test_one_sgd_step_on_a_tiny_policy_raises_the_margin(scheduler):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    latents_pos, latents_neg = randn(8, 4, 6, 6, seed=10), randn(8, 4, 6, 6, seed=11)
    pair = noised_pair(latents_pos, latents_neg, scheduler, generator)
    target_pos, target_neg = targets(pair, latents_pos, latents_neg, scheduler)

    policy = torch.nn.Conv2d(4, 4, kernel_size=1)  # a "denoiser" over x_t
    reference = copy.deepcopy(policy).requires_grad_(False)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-4)

    def step_loss():
        x, _ = pair.stacked()
        policy_pos, policy_neg = policy(x).chunk(2)
        ref_pos, ref_neg = reference(x).chunk(2)
        return sfo_loss(policy_pos, policy_neg, ref_pos, ref_neg, target_pos, target_neg, beta=1000.0)

    loss_before, before = step_loss()
    assert abs(before["loss"] - math.log(2)) < 1e-6
    optimizer.zero_grad()
    loss_before.backward()
    optimizer.step()
    _, after = step_loss()

    assert after["reward_margin"] > before["reward_margin"] + 1e-6
    assert after["loss"] < before["loss"]
    assert after["accuracy"] > 0.5  # most pairs now favour the positive (one step need not flip all)
    # The policy's error moved in favour of positives relative to the frozen reference.
    assert (after["policy_error_pos"] - after["ref_error_pos"]) < (after["policy_error_neg"] - after["ref_error_neg"])


@pytest.mark.parametrize("shapes", [
    [SHAPE] * 5 + [(4, 3, 5, 4)],
    [(2, 3)] * 3 + [(3, 3)] * 3,
    [(0, 3)] * 6,
    [()] * 6,
])
def test_mismatched_or_batchless_shapes_raise(shapes):
    with pytest.raises(ValueError, match="SFO inputs"):
        sfo_loss(*[torch.zeros(s) for s in shapes])


def test_beta_must_be_positive():
    tensors = [torch.zeros(2, 3)] * 6
    with pytest.raises(ValueError, match="beta"):
        sfo_loss(*tensors, beta=0.0)


# --- pairs and targets -------------------------------------------------------------------

def test_pair_shares_noise_and_timestep():
    scheduler = sd_scheduler()
    latents_pos, latents_neg = randn(16, 4, 8, 8, seed=20), randn(16, 4, 8, 8, seed=21)
    pair = noised_pair(latents_pos, latents_neg, scheduler, torch.Generator().manual_seed(1))

    assert isinstance(pair, PairBatch)
    assert pair.timesteps.dtype == torch.long and pair.timesteps.shape == (16,)
    assert len(set(pair.timesteps.tolist())) > 1  # t varies across pairs, not within one
    abar = scheduler.alphas_cumprod[pair.timesteps].view(-1, 1, 1, 1)
    eps_pos = (pair.noisy_pos - abar.sqrt() * latents_pos) / (1 - abar).sqrt()
    eps_neg = (pair.noisy_neg - abar.sqrt() * latents_neg) / (1 - abar).sqrt()
    torch.testing.assert_close(eps_pos, pair.noise, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_neg, pair.noise, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(pair.noisy_pos, pair.noisy_neg)
    assert not torch.allclose(pair.noise[0], pair.noise[1])  # different pairs, different eps

    x, t = pair.stacked()
    assert torch.equal(x, torch.cat([pair.noisy_pos, pair.noisy_neg]))
    assert torch.equal(t[:16], t[16:])


def test_flow_matching_pair_shares_eps_and_a_logit_normal_t_drawn_directly():
    """The paper's own form (FLUX): x_t = (1-t)·x0 + t·eps, target eps - x0, t = sigmoid(n)."""
    scheduler = flux_scheduler()
    latents_pos, latents_neg = randn(4000, 1, 2, 2, seed=30), randn(4000, 1, 2, 2, seed=31)
    pair = noised_pair(latents_pos, latents_neg, scheduler, torch.Generator().manual_seed(3))

    t = pair.timesteps
    assert t.dtype == torch.float32 and bool(((t > 0) & (t < 1)).all())
    # Continuous and logit-normal: not a pick from the scheduler's 1,000 training sigmas.
    assert len(set(t.tolist())) > 1000
    assert ks_statistic(t, logit_normal_cdf(0.0, 1.0)) < ks_critical(len(t))
    tt = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(pair.noisy_pos, (1 - tt) * latents_pos + tt * pair.noise)
    torch.testing.assert_close(pair.noisy_neg, (1 - tt) * latents_neg + tt * pair.noise)
    target_pos, target_neg = targets(pair, latents_pos, latents_neg, scheduler)
    torch.testing.assert_close(target_pos, pair.noise - latents_pos)
    torch.testing.assert_close(target_neg, pair.noise - latents_neg)


def test_pair_is_reproducible_from_the_generator():
    scheduler = sd_scheduler()
    latents = randn(4, 4, 8, 8, seed=22)
    a = noised_pair(latents, latents * 2, scheduler, torch.Generator().manual_seed(5))
    b = noised_pair(latents, latents * 2, scheduler, torch.Generator().manual_seed(5))
    assert torch.equal(a.noise, b.noise) and torch.equal(a.timesteps, b.timesteps)


def test_pair_rejects_mismatched_latents_and_schedulers_without_add_noise():
    scheduler = sd_scheduler()
    with pytest.raises(ValueError, match="same shape"):
        noised_pair(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 4), scheduler)
    with pytest.raises(ValueError, match="add_noise"):
        noised_pair(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8), object())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_targets_follow_the_prediction_type(prediction_type):
    scheduler = sd_scheduler(prediction_type)
    latents_pos, latents_neg = randn(4, 4, 8, 8, seed=23), randn(4, 4, 8, 8, seed=24)
    pair = noised_pair(latents_pos, latents_neg, scheduler, torch.Generator().manual_seed(2))
    target_pos, target_neg = targets(pair, latents_pos, latents_neg, scheduler)

    abar = scheduler.alphas_cumprod[pair.timesteps].view(-1, 1, 1, 1)
    expected = {
        "epsilon": (pair.noise, pair.noise),
        # v = sqrt(abar)·eps - sqrt(1-abar)·x0 (Salimans & Ho 2022)
        "v_prediction": tuple(abar.sqrt() * pair.noise - (1 - abar).sqrt() * x0 for x0 in (latents_pos, latents_neg)),
        "sample": (latents_pos, latents_neg),
    }[prediction_type]
    torch.testing.assert_close(target_pos, expected[0])
    torch.testing.assert_close(target_neg, expected[1])


def test_unknown_prediction_type_is_rejected():
    scheduler = sd_scheduler()
    scheduler.register_to_config(prediction_type="flow")
    pair = noised_pair(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), scheduler)
    with pytest.raises(ValueError, match="'flow'"):
        targets(pair, torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), scheduler)


# --- timestep sampling -------------------------------------------------------------------

@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (-0.5, 0.7)])
def test_timesteps_follow_the_logit_normal(mean, std):
    n = 20_000
    samples = logit_normal(n, torch.Generator().manual_seed(0), mean, std)
    assert samples.shape == (n,) and samples.dtype == torch.float32
    assert 0.0 <= samples.min().item() and samples.max().item() <= 1.0
    assert ks_statistic(samples, logit_normal_cdf(mean, std)) < ks_critical(n)


def test_the_ks_check_rejects_uniform_timesteps():
    n = 20_000
    uniform = torch.rand(n, generator=torch.Generator().manual_seed(0))
    assert ks_statistic(uniform, logit_normal_cdf(0.0, 1.0)) > ks_critical(n)
    # and a logit-normal with the wrong location (the paper's worse N(2, 1))
    shifted = logit_normal(n, torch.Generator().manual_seed(0), mean=2.0)
    assert ks_statistic(shifted, logit_normal_cdf(0.0, 1.0)) > ks_critical(n)


def test_discrete_timesteps_round_the_continuous_ones_into_range():
    T = 1000
    continuous = logit_normal(5000, torch.Generator().manual_seed(3))
    discrete = logit_normal_timesteps(5000, T, torch.Generator().manual_seed(3))
    assert discrete.dtype == torch.long
    assert torch.equal(discrete, torch.round(continuous * (T - 1)).long())
    assert 0 <= discrete.min().item() and discrete.max().item() <= T - 1
    # extreme locations saturate at the ends instead of leaving the range
    assert logit_normal_timesteps(100, T, torch.Generator().manual_seed(0), mean=40.0).eq(T - 1).all()
    assert logit_normal_timesteps(100, T, torch.Generator().manual_seed(0), mean=-40.0).eq(0).all()


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="std"):
        logit_normal(4, std=0.0)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        logit_normal_timesteps(4, 0)


# --- SFT ---------------------------------------------------------------------------------

def test_sft_loss_is_plain_mse():
    pred, target = randn(*SHAPE, seed=30), randn(*SHAPE, seed=31)
    loss, metrics = sft_loss(pred, target)
    expected = ((pred - target) ** 2).mean().item()
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics == {"loss": pytest.approx(expected, rel=1e-6), "instance_loss": pytest.approx(expected, rel=1e-6)}


def test_sft_loss_with_prior_preservation_and_weights():
    pred, target = randn(*SHAPE, seed=30), randn(*SHAPE, seed=31)
    prior_pred, prior_target = randn(2, 3, 5, 5, seed=32), randn(2, 3, 5, 5, seed=33)
    weights = torch.tensor([1.0, 0.5, 2.0, 0.0])
    loss, metrics = sft_loss(pred, target, prior_pred, prior_target, prior_weight=0.3, weights=weights)

    instance = (((pred - target) ** 2).flatten(1).mean(1) * weights).mean()
    prior = ((prior_pred - prior_target) ** 2).mean()
    assert loss.item() == pytest.approx((instance + 0.3 * prior).item(), rel=1e-6)
    assert metrics["instance_loss"] == pytest.approx(instance.item(), rel=1e-6)
    assert metrics["prior_loss"] == pytest.approx(prior.item(), rel=1e-6)
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-6)


def test_sft_loss_validates_its_inputs():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="both prior_pred and prior_target"):
        sft_loss(x, x, prior_pred=x)
    with pytest.raises(ValueError, match="shapes differ"):
        sft_loss(x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="weights"):
        sft_loss(x, x, weights=torch.ones(3))
