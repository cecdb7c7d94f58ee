"""Flow matching: sigma tables, timestep density, noising algebra, loss and the Euler sampler."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from fusedit.flow import FlowMatching, euler_sample, sampling_sigmas

# The reference schedule for 25 steps, shift 3 (docs/reference-facts.md, T2I-5).
PUBLISHED_25 = [1.0, 0.98576, 0.97068, 0.95469, 0.93771, 0.91964, 0.90036, 0.87976, 0.85769, 0.834]
PUBLISHED_25 += [0.80849, 0.78095, 0.75112, 0.71871, 0.68337, 0.64469, 0.60215, 0.55516, 0.50299]
PUBLISHED_25 += [0.44471, 0.37919, 0.30501, 0.22031, 0.12268, 0.00893, 0.0]


def sd3_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_training_sigma_table_is_the_shifted_formula():
    table = FlowMatching(sd3_scheduler()).sigma_table
    s = (1000 - torch.arange(1000, dtype=torch.float64)) / 1000
    assert table.dtype == torch.float32 and table.shape == (1000,)
    torch.testing.assert_close(table.double(), 3 * s / (1 + 2 * s), atol=1e-6, rtol=0)
    assert table[0] == 1.0 and abs(table[-1].item() - 0.002994) < 1e-6


def test_training_table_survives_set_timesteps_on_the_scheduler():
    scheduler = sd3_scheduler()
    scheduler.set_timesteps(4)  # someone sampled with the same object before training started
    torch.testing.assert_close(FlowMatching(scheduler).sigma_table, FlowMatching(sd3_scheduler()).sigma_table)


def test_published_25_step_inference_sigmas():
    scheduler = sd3_scheduler()
    sigmas = sampling_sigmas(scheduler, 25)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (26,)
    torch.testing.assert_close(sigmas, torch.tensor(PUBLISHED_25), atol=1e-4, rtol=0)
    assert scheduler.sigmas.shape == (1000,)  # the caller's scheduler was not touched


def test_logit_normal_draws_are_reproducible_and_distributed_right():
    flow = FlowMatching(sd3_scheduler())
    a = flow.sample_sigmas(20000, gen(1))
    assert a.dtype == torch.float32 and a.shape == (20000,)
    torch.testing.assert_close(a, flow.sample_sigmas(20000, gen(1)), atol=0, rtol=0)
    assert not torch.equal(a, flow.sample_sigmas(20000, gen(2)))
    assert torch.isin(a, flow.sigma_table).all()  # values come straight from the table
    # Invert the table: sigma = 3s/(1+2s) -> s = sigma/(3-2 sigma); u lies in [1-s, 1-s+1e-3).
    s = a.double() / (3 - 2 * a.double())
    logit = torch.logit(1 - s + 5e-4)
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1.0) < 0.03


def test_logit_mean_moves_the_density():
    flow = FlowMatching(sd3_scheduler(), logit_mean=1.0, logit_std=0.5)
    s = flow.sample_sigmas(20000, gen(3)).double()
    s = s / (3 - 2 * s)
    logit = torch.logit(1 - s + 5e-4)
    assert abs(logit.mean().item() - 1.0) < 0.03 and abs(logit.std().item() - 0.5) < 0.03


def test_direct_index_matches_the_reference_search():
    """The reference looked t up in scheduler.timesteps; direct indexing must give the same sigma."""
    scheduler = sd3_scheduler()
    flow = FlowMatching(scheduler)
    u = torch.sigmoid(torch.randn(64, generator=gen(4)))
    index = (u * 1000).floor().long()
    searched = [scheduler.sigmas[(scheduler.timesteps == scheduler.timesteps[i]).nonzero()[0, 0]] for i in index]
    torch.testing.assert_close(flow.sigma_table[index], torch.stack(searched))
    torch.testing.assert_close(flow.timesteps(flow.sigma_table[index]), scheduler.timesteps[index])


def test_noising_identities():
    x0 = torch.randn(3, 4, 5, 5, generator=gen(5))
    eps = FlowMatching.sample_noise(x0, gen(6))
    sigmas = torch.tensor([0.0, 0.3, 1.0])
    x_t = FlowMatching.add_noise(x0.bfloat16(), eps, sigmas)
    x0 = x0.bfloat16().float()  # what add_noise saw
    assert x_t.dtype == torch.float32
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[2], eps[2])
    target = eps - x0
    s = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t - s * target, x0)  # the clean sample from a perfect velocity
    torch.testing.assert_close(x_t + (1 - s) * target, eps)  # ... and the noise


@pytest.mark.parametrize("scheme", ["logit_normal", "sigma_sqrt", "cosmap"])
def test_loss_equals_hand_computation(scheme):
    flow = FlowMatching(sd3_scheduler(), weighting_scheme=scheme)
    x0 = torch.randn(2, 3, 4, 4, generator=gen(7))
    eps = torch.randn(2, 3, 4, 4, generator=gen(8))
    sigmas = torch.tensor([0.25, 0.8])
    x_t = flow.add_noise(x0, eps, sigmas)
    pred = torch.randn(2, 3, 4, 4, generator=gen(9)).bfloat16()
    weight = {"logit_normal": [1.0, 1.0], "sigma_sqrt": [0.25**-2, 0.8**-2]}.get(scheme)
    if weight is None:
        weight = [2 / (torch.pi * (1 - 2 * s + 2 * s * s)) for s in (0.25, 0.8)]
    expected = sum(w * ((pred[b].float() - (eps[b] - x0[b])) ** 2).mean() for b, w in enumerate(weight)) / 2
    loss = flow.loss(pred, x0, eps, x_t, sigmas)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    torch.testing.assert_close(loss, expected)


def test_per_sample_mean_then_batch_mean():
    flow = FlowMatching(sd3_scheduler())
    zeros = torch.zeros(2, 1, 2, 2)
    pred = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    per_sample = flow.per_sample_loss(pred, zeros, zeros, zeros, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(per_sample, torch.tensor([1.0, 0.0]))
    assert flow.loss(pred, zeros, zeros, zeros, torch.tensor([0.5, 0.5])).item() == 0.5


def test_preconditioned_loss_compares_clean_samples():
    flow = FlowMatching(sd3_scheduler(), precondition_outputs=True)
    x0 = torch.randn(2, 3, 4, 4, generator=gen(10))
    eps = torch.randn(2, 3, 4, 4, generator=gen(11))
    sigmas = torch.tensor([0.4, 0.9])
    x_t = flow.add_noise(x0, eps, sigmas)
    assert flow.loss(eps - x0, x0, eps, x_t, sigmas).item() < 1e-10
    pred = torch.randn(2, 3, 4, 4, generator=gen(12))
    s = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(flow.loss(pred, x0, eps, x_t, sigmas), ((x_t - s * pred - x0) ** 2).mean())


def test_unknown_weighting_scheme_is_rejected():
    with pytest.raises(ValueError, match="weighting_scheme"):
        FlowMatching(sd3_scheduler(), weighting_scheme="logit-normal")


def test_euler_with_exact_velocity_reaches_the_point_mass():
    target = torch.randn(2, 4, 3, 3, generator=gen(13))
    noise = torch.randn(2, 4, 3, 3, generator=gen(14))
    calls = []

    def oracle(x, t):
        calls.append(x.shape[0])
        return (x - target) / (t / 1000).view(-1, 1, 1, 1)  # (x_t - x0) / sigma = eps - x0

    out = euler_sample(oracle, noise, sampling_sigmas(sd3_scheduler(), 25), guidance_scale=1.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, target, atol=1e-5, rtol=0)
    assert calls == [2] * 25


def test_euler_transports_a_gaussian():
    """Exact velocity for x0 ~ N(m, s^2): many steps give samples with that mean and std."""
    m, s = 2.0, 0.5

    def velocity(x, t):
        sigma = t.view(-1, 1) / 1000
        var = ((1 - sigma) * s) ** 2 + sigma**2
        centred = x - (1 - sigma) * m
        return sigma / var * centred - (m + (1 - sigma) * s**2 / var * centred)

    noise = torch.randn(4000, 1, generator=gen(15))
    out = euler_sample(velocity, noise, sampling_sigmas(sd3_scheduler(), 200))
    assert abs(out.mean().item() - m) < 0.03 and abs(out.std().item() - s) < 0.03


def test_cfg_doubles_the_batch_and_combines_velocities():
    sigmas = torch.tensor([1.0, 0.5])
    seen = {}

    def model(x, t):
        seen.update(batch=x.shape[0], t=t.clone())
        uncond, cond = torch.full_like(x[:2], 1.0), torch.full_like(x[:2], 3.0)
        return torch.cat([uncond, cond]).bfloat16() if x.shape[0] == 4 else cond

    x = torch.zeros(2, 1, 2, 2)
    out = euler_sample(model, x, sigmas, guidance_scale=4.0)
    assert seen["batch"] == 4 and torch.equal(seen["t"], torch.full((4,), 1000.0))
    torch.testing.assert_close(out, torch.full_like(x, -0.5 * (1 + 4 * (3 - 1))))
    out_g1 = euler_sample(model, x, sigmas, guidance_scale=1.0)
    assert seen["batch"] == 2
    torch.testing.assert_close(out_g1, torch.full_like(x, -0.5 * 3.0))


def test_cfg_with_scale_one_equals_conditional_formula():
    """v_u + 1 (v_c - v_u) = v_c: the guided result at g -> 1 matches the conditional-only path."""
    sigmas = sampling_sigmas(sd3_scheduler(), 5)
    x = torch.randn(2, 3, 4, 4, generator=gen(16))

    def model(xx, t):
        doubled = xx.shape[0] == 4
        scale = torch.tensor([0.3, -0.7] * (2 if doubled else 1)).view(-1, 1, 1, 1)
        if doubled:
            scale[:2] = 5.0  # a very different unconditional branch
        return xx * scale

    nearly_one = euler_sample(model, x, sigmas, guidance_scale=1.0 + 1e-6)
    torch.testing.assert_close(nearly_one, euler_sample(model, x, sigmas, guidance_scale=1.0), atol=1e-4, rtol=0)
