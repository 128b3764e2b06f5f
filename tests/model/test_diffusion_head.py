"""The diffusion reconstruction head and loss: shapes, masking, schedulers, training and DDIM sampling.

A tiny head is trained for a few hundred CPU steps on targets that are a fixed function of the condition,
once per prediction type (module-scoped fixture); the loss must fall and DDIM samples must land nearer the
true targets than noise does.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mmlatent.losses.diffusion import diffusion_loss
from mmlatent.model.diffusion_head import (
    DiffusionHead,
    DiffusionHeadConfig,
    sample,
    sample_scheduler,
    train_scheduler,
)

B, NC, DC, NT, DT = 16, 2, 8, 4, 6


def tiny_cfg(prediction_type: str = "epsilon") -> DiffusionHeadConfig:
    return DiffusionHeadConfig(width=32, layers=1, heads=2, max_tokens=16, prediction_type=prediction_type, sample_steps=10)


def toy_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cond (B, Nc, Dc) and targets (B, Nt, Dt) that are a deterministic function of it."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(B, NC, DC, generator=g)
    w = torch.randn(NC * DC, NT * DT, generator=g) / (NC * DC) ** 0.5
    target = 1.5 * torch.tanh(cond.reshape(B, -1) @ w).reshape(B, NT, DT)  # (B, Nt, Dt)
    return cond, target


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny ops are fastest (and deterministic) on one thread; several threads thrash on shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def eval_loss(head, sched, cond, target) -> float:
    """The diffusion loss at fixed timesteps and noise (16 draws per sample)."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(123)
        return float(diffusion_loss(head, sched, target.repeat(16, 1, 1), cond.repeat(16, 1, 1), generator=gen))


@dataclass
class Trained:
    cfg: DiffusionHeadConfig
    head: DiffusionHead
    cond: torch.Tensor
    target: torch.Tensor
    loss_before: float
    loss_after: float


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def trained(request) -> Trained:
    torch.manual_seed(0)
    cfg = tiny_cfg(request.param)
    head = DiffusionHead(cfg, target_dim=DT, cond_dim=DC)
    sched = train_scheduler(cfg)
    cond, target = toy_data()
    before = eval_loss(head, sched, cond, target)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(300):
        loss = diffusion_loss(head, sched, target, cond, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return Trained(cfg, head.eval(), cond, target, before, eval_loss(head, sched, cond, target))


def test_forward_shape_and_zero_init():
    cfg = tiny_cfg()
    head = DiffusionHead(cfg, target_dim=DT, cond_dim=DC)
    noisy = torch.randn(3, NT, DT)
    out = head(noisy, torch.tensor([0, 500, 999]), torch.randn(3, NC, DC))
    assert out.shape == (3, NT, DT)
    assert torch.count_nonzero(out) == 0  # zero-initialised output projection


def test_too_many_target_tokens_is_an_error():
    head = DiffusionHead(tiny_cfg(), target_dim=DT, cond_dim=DC)
    with pytest.raises(ValueError, match="max_tokens"):
        head(torch.randn(1, 17, DT), torch.tensor([3]), torch.randn(1, NC, DC))


def test_config_validation():
    with pytest.raises(ValueError, match="heads"):
        DiffusionHeadConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusionHeadConfig(prediction_type="sample")  # type: ignore[arg-type]


def test_cond_mask_hides_masked_vectors():
    torch.manual_seed(0)
    head = DiffusionHead(tiny_cfg(), target_dim=DT, cond_dim=DC)
    torch.nn.init.normal_(head.out.weight, std=0.1)  # make the output depend on its input
    noisy, t = torch.randn(2, NT, DT), torch.tensor([10, 700])
    cond = torch.randn(2, 3, DC)
    mask = torch.tensor([[True, True, False], [False, False, False]])  # row 1: nothing valid
    out = head(noisy, t, cond, mask)
    cond2 = cond.clone()
    cond2[0, 2] = 100.0
    cond2[1] = -50.0
    out2 = head(noisy, t, cond2, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, out2)
    assert not torch.allclose(head(noisy, t, cond2), out)  # without the mask they do count


def test_schedulers_share_betas_and_prediction_type():
    cfg = tiny_cfg("v_prediction")
    tr, sa = train_scheduler(cfg), sample_scheduler(cfg)
    torch.testing.assert_close(tr.alphas_cumprod, sa.alphas_cumprod)
    assert tr.config.prediction_type == sa.config.prediction_type == "v_prediction"
    assert tr.config.num_train_timesteps == sa.config.num_train_timesteps == cfg.num_train_timesteps
    assert not isinstance(tr, torch.nn.Module) and not isinstance(sa, torch.nn.Module)  # no parameters


def test_loss_at_init_is_target_energy():
    """A zero prediction: the loss is E[ε²] = 1 (epsilon) or E[v²] = E[ᾱ] + E[1-ᾱ]·E[x₀²] (v)."""
    cond, target = toy_data()
    for kind in ("epsilon", "v_prediction"):
        cfg = tiny_cfg(kind)
        head, sched = DiffusionHead(cfg, DT, DC), train_scheduler(cfg)
        loss = eval_loss(head, sched, cond, target)
        if kind == "epsilon":
            assert loss == pytest.approx(1.0, abs=0.05)
        else:
            a = sched.alphas_cumprod.mean().item()
            assert loss == pytest.approx(a + (1 - a) * target.pow(2).mean().item(), rel=0.1)


def test_diffusion_loss_trains(trained: Trained):
    assert trained.loss_after < 0.6 * trained.loss_before, (trained.loss_before, trained.loss_after)


def test_gradients_reach_cond_and_denoiser_not_target(trained: Trained):
    sched = train_scheduler(trained.cfg)
    cond = trained.cond.clone().requires_grad_(True)
    target = trained.target.clone().requires_grad_(True)
    trained.head.zero_grad()
    diffusion_loss(trained.head, sched, target, cond, generator=torch.Generator().manual_seed(0)).backward()
    assert cond.grad is not None and cond.grad.abs().sum() > 0
    assert target.grad is None
    assert trained.head.cond.weight.grad.abs().sum() > 0
    trained.head.zero_grad()


def test_no_cond_gradient_before_the_output_layer_moves():
    """The documented price of the zero-initialised output: latents get gradient from the second step on."""
    cfg = tiny_cfg()
    head = DiffusionHead(cfg, DT, DC)
    cond, target = toy_data()
    cond.requires_grad_(True)
    diffusion_loss(head, train_scheduler(cfg), target, cond).backward()
    assert cond.grad.abs().sum() == 0
    assert head.out.weight.grad.abs().sum() > 0


def test_sample_shape_determinism_and_quality(trained: Trained):
    sched = sample_scheduler(trained.cfg)
    draw = lambda seed: sample(  # noqa: E731
        trained.head, sched, trained.cond, (NT, DT), trained.cfg.sample_steps, generator=torch.Generator().manual_seed(seed)
    )
    s1, s2, s3 = draw(7), draw(7), draw(8)
    assert s1.shape == (B, NT, DT) and s1.dtype == torch.float32
    torch.testing.assert_close(s1, s2, rtol=0, atol=0)
    assert not torch.equal(s1, s3)
    noise = torch.randn(B, NT, DT, generator=torch.Generator().manual_seed(9))
    sample_err = (s1 - trained.target).pow(2).mean()
    noise_err = (noise - trained.target).pow(2).mean()
    assert sample_err < noise_err, (float(sample_err), float(noise_err))
    if trained.cfg.prediction_type == "v_prediction":  # well conditioned at high noise: much closer
        assert sample_err < 0.5 * noise_err, (float(sample_err), float(noise_err))


def test_sample_respects_cond_mask():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    head = DiffusionHead(cfg, DT, DC)
    torch.nn.init.normal_(head.out.weight, std=0.01)
    cond = torch.randn(2, 3, DC)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    cond2 = cond.clone()
    cond2[~mask] = 7.0
    a = sample(head, sample_scheduler(cfg), cond, (NT, DT), 5, cond_mask=mask, generator=torch.Generator().manual_seed(0))
    b = sample(head, sample_scheduler(cfg), cond2, (NT, DT), 5, cond_mask=mask, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
