"""Algebra of the Gaussian diffusion module: schedules, noising, x0/eps inverses, DDIM."""

from __future__ import annotations

import math

import pytest
import torch

from superdiffusion.diffusion import GaussianDiffusion, beta_schedule

T = 1000


@pytest.fixture(scope="module")
def diff() -> GaussianDiffusion:
    return GaussianDiffusion(timesteps=T)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _lucidrains_sigmoid(timesteps: int, start=-3, end=3, tau=1) -> torch.Tensor:
    """Verbatim port of denoising-diffusion-pytorch's sigmoid_beta_schedule (the reference's)."""
    t = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64) / timesteps
    v_start, v_end = torch.tensor(start / tau).sigmoid(), torch.tensor(end / tau).sigmoid()
    abar = (-((t * (end - start) + start) / tau).sigmoid() + v_end) / (v_end - v_start)
    abar = abar / abar[0]
    return torch.clip(1 - abar[1:] / abar[:-1], 0, 0.999)


# --- schedules ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("timesteps", [1, 10, 1000])
def test_schedule_shape_range_monotone(name: str, timesteps: int) -> None:
    betas = beta_schedule(name, timesteps)
    assert betas.dtype == torch.float64 and betas.shape == (timesteps,)
    assert (betas > 0).all() and (betas < 1).all()
    abar = torch.cumprod(1 - betas, 0)
    assert (abar > 0).all() and (abar < 1).all()
    assert (abar[1:] < abar[:-1]).all()


def test_schedule_endpoints() -> None:
    lin = beta_schedule("linear", 1000)
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    assert beta_schedule("linear", 10).max().item() == pytest.approx(0.999)  # 1000 / T scaling, clipped
    lin500 = beta_schedule("linear", 500)  # scaled by 1000 / T
    assert lin500[0].item() == pytest.approx(2e-4) and lin500[-1].item() == pytest.approx(0.04)
    for name in ("linear", "cosine", "sigmoid"):
        abar = torch.cumprod(1 - beta_schedule(name, 1000), 0)
        assert abar[0] > 0.999, name  # almost clean at t = 0
        assert abar[-1] < 1e-3, name  # almost pure noise at t = T - 1
    cos = beta_schedule("cosine", 1000)
    assert cos[-1].item() == pytest.approx(0.999)  # clipped
    abar_cos = torch.cumprod(1 - cos, 0)
    s = 0.008
    f = [math.cos((u + s) / (1 + s) * math.pi / 2) ** 2 for u in (0.0, 0.5)]
    expected_mid = f[1] / f[0]
    assert abar_cos[499].item() == pytest.approx(expected_mid, rel=1e-9)


@pytest.mark.parametrize("timesteps", [10, 1000])
def test_sigmoid_matches_reference(timesteps: int) -> None:
    torch.testing.assert_close(beta_schedule("sigmoid", timesteps), _lucidrains_sigmoid(timesteps))


def test_unknown_schedule_names_it() -> None:
    with pytest.raises(ValueError, match="quadratic"):
        beta_schedule("quadratic", 10)
    with pytest.raises(ValueError, match="quadratic"):
        GaussianDiffusion(timesteps=10, schedule="quadratic")


# --- buffers -----------------------------------------------------------------------------------

def test_buffers_float32_and_move() -> None:
    d = GaussianDiffusion(timesteps=50, schedule="cosine")
    names = {"betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"}
    assert names <= set(dict(d.named_buffers()))
    assert all(b.dtype == torch.float32 and b.shape == (50,) for b in d.buffers())
    d64 = GaussianDiffusion(timesteps=50, schedule="cosine").to(torch.float64)
    assert all(b.dtype == torch.float64 for b in d64.buffers())
    x0 = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    assert d64.q_sample(x0, torch.tensor([0, 49]), torch.randn_like(x0)).dtype == torch.float64
    dm = GaussianDiffusion(timesteps=50).to("meta")
    assert all(b.device.type == "meta" for b in dm.buffers())


# --- forward noising and x0 / eps conversions ---------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 2, 8, 8), (4, 2, 4, 5, 6)], ids=["2d", "3d"])
@pytest.mark.parametrize("schedule", ["linear", "cosine", "sigmoid"])
def test_q_sample_then_x0_from_true_noise(shape: tuple[int, ...], schedule: str) -> None:
    d = GaussianDiffusion(timesteps=T, schedule=schedule)
    x0, noise = _rand(*shape, seed=1).tanh(), _rand(*shape, seed=2)
    t = torch.tensor([0, 1, 500, T - 2])  # per-sample, all different
    x_t = d.q_sample(x0, t, noise)
    torch.testing.assert_close(d.predict_x0_from_eps(x_t, t, noise), x0, atol=1e-4, rtol=0)
    # per-sample t really is per sample: each row equals its own scalar-t computation
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(x_t[i], d.q_sample(x0[i : i + 1], ti, noise[i : i + 1])[0])


def test_q_sample_values(diff: GaussianDiffusion) -> None:
    x0, noise = torch.ones(2, 1, 3, 3), torch.full((2, 1, 3, 3), -1.0)
    t = torch.tensor([0, T - 1])
    x_t = diff.q_sample(x0, t, noise)
    a = diff.alphas_cumprod[t]
    expected = (a.sqrt() - (1 - a).sqrt()).view(2, 1, 1, 1).expand_as(x0)
    torch.testing.assert_close(x_t, expected)


@pytest.mark.parametrize("shape", [(3, 1, 6, 6), (3, 2, 3, 4, 5)], ids=["2d", "3d"])
def test_eps_and_x0_predictions_are_inverses(diff: GaussianDiffusion, shape: tuple[int, ...]) -> None:
    x_t, eps = _rand(*shape, seed=3), _rand(*shape, seed=4)
    t = torch.tensor([3, 400, 900])
    x0 = diff.predict_x0_from_eps(x_t, t, eps)
    torch.testing.assert_close(diff.predict_eps_from_x0(x_t, t, x0), eps, atol=1e-4, rtol=1e-4)
    x0b = _rand(*shape, seed=5).tanh()
    eps_b = diff.predict_eps_from_x0(x_t, t, x0b)
    torch.testing.assert_close(diff.predict_x0_from_eps(x_t, t, eps_b), x0b, atol=1e-4, rtol=1e-4)


# --- DDIM --------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 2, 8, 8), (3, 1, 4, 4, 4)], ids=["2d", "3d"])
def test_ddim_step_with_true_x0_keeps_noise_direction(diff: GaussianDiffusion, shape: tuple[int, ...]):
    x0, noise = _rand(*shape, seed=6).tanh(), _rand(*shape, seed=7)
    t, t_next = torch.tensor([999, 500, 20]), torch.tensor([800, 499, 0])
    x_t = diff.q_sample(x0, t, noise)
    torch.testing.assert_close(diff.ddim_step(x_t, t, x0, t_next), diff.q_sample(x0, t_next, noise),
                               atol=1e-4, rtol=1e-4)
    # a plain int t_next works too, and -1 returns x0 itself (also mixed per sample)
    torch.testing.assert_close(diff.ddim_step(x_t, t, x0, 10), diff.q_sample(x0, 10, noise),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(diff.ddim_step(x_t, t, x0, -1), x0)
    mixed = diff.ddim_step(x_t, t, x0, torch.tensor([-1, 100, -1]))
    torch.testing.assert_close(mixed[[0, 2]], x0[[0, 2]])
    torch.testing.assert_close(mixed[1], diff.q_sample(x0, 100, noise)[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("steps", [1, 2, 7, 50])
@pytest.mark.parametrize("shape", [(2, 2, 8, 8), (2, 1, 4, 4, 4)], ids=["2d", "3d"])
def test_ddim_sample_with_oracle_returns_x0(diff: GaussianDiffusion, steps: int, shape: tuple[int, ...]):
    x0 = _rand(*shape, seed=8).tanh()
    seen: list[torch.Tensor] = []

    def oracle(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert x_t.shape == shape and t.dtype == torch.long and t.shape == (shape[0],)
        seen.append(t)
        return x0

    g = torch.Generator().manual_seed(0)
    out = diff.ddim_sample(oracle, shape, steps=steps, generator=g)
    torch.testing.assert_close(out, x0, atol=1e-6, rtol=0)
    assert [int(t[0]) for t in seen] == diff.ddim_timesteps(steps)


def test_ddim_sample_clip(diff: GaussianDiffusion) -> None:
    shape = (2, 1, 4, 4)
    big = torch.full(shape, 3.0)
    clipped = diff.ddim_sample(lambda x, t: big, shape, steps=5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(clipped, torch.ones(shape))
    raw = diff.ddim_sample(lambda x, t: big, shape, steps=5, generator=torch.Generator().manual_seed(0),
                           clip=None)
    torch.testing.assert_close(raw, big)


def test_ddim_sample_one_step_is_one_x0_prediction(diff: GaussianDiffusion) -> None:
    shape = (2, 2, 5, 5)
    x_T = _rand(*shape, seed=9)

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 2 * x_t + t.view(-1, 1, 1, 1) / T

    out = diff.ddim_sample(model, shape, steps=1, x_T=x_T, clip=None)
    once = model(x_T, torch.full((2,), T - 1))
    torch.testing.assert_close(out, once)
    torch.testing.assert_close(diff.ddim_sample(model, shape, steps=1, x_T=x_T), once.clamp(-1, 1))


def test_ddim_sample_deterministic_with_seed(diff: GaussianDiffusion) -> None:
    shape = (2, 1, 6, 6)

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # depends on x_t, so on the noise
        return torch.tanh(x_t) * (1 - t.view(-1, 1, 1, 1) / (2 * T))

    def run(seed: int) -> torch.Tensor:
        return diff.ddim_sample(model, shape, steps=4, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(123), run(123), run(124)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == shape and a.dtype == torch.float32 and a.abs().max() <= 1


def test_sample_timesteps(diff: GaussianDiffusion) -> None:
    t = diff.sample_timesteps(4096, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (4096,)
    assert t.min() >= 0 and t.max() <= T - 1 and t.unique().numel() > 900
    again = diff.sample_timesteps(4096, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    assert diff.sample_timesteps(3).shape == (3,)


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 37, 250, 999, 1000])
def test_ddim_timesteps(diff: GaussianDiffusion, steps: int) -> None:
    ts = diff.ddim_timesteps(steps)
    assert len(ts) == steps and all(isinstance(t, int) for t in ts)
    assert ts[0] == T - 1
    if steps > 1:
        assert ts[-1] == 0
        assert all(a > b for a, b in zip(ts, ts[1:]))
        gaps = [a - b for a, b in zip(ts, ts[1:])]
        assert max(gaps) - min(gaps) <= 1  # evenly spaced up to rounding
    if steps == T:
        assert ts == list(range(T - 1, -1, -1))


def test_ddim_timesteps_rejects_bad_counts(diff: GaussianDiffusion) -> None:
    for bad in (0, T + 1):
        with pytest.raises(ValueError):
            diff.ddim_timesteps(bad)
