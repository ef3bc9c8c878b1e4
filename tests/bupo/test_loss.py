import math

import pytest
import torch

from bupo.loss import group_advantages, policy_loss, zero_variance_groups


def test_grpo_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(r, 4)
    # group 1: mean 0.25, unbiased std sqrt(0.25) = 0.5
    assert torch.allclose(adv[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]), rtol=1e-5)
    assert torch.equal(adv[4:], torch.zeros(4))  # zero-variance group: 0 / (0 + eps) is 0
    dr = group_advantages(r, 4, norm_by_std=False)
    assert torch.allclose(dr[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_rloo_and_reinforce_pp():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    rloo = group_advantages(r, 4, estimator="rloo")
    # i=0: 1 - mean(0, 0, 1) = 2/3; i=1: 0 - mean(1, 0, 1) = -2/3
    assert torch.allclose(rloo, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    rpp = group_advantages(r, 2, estimator="reinforce_pp", eps=0.0)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()
    assert torch.allclose(rpp, (r - 0.5) / std)


def test_bad_advantage_inputs():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.ones(5), 4)
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(torch.ones(4), 4, estimator="ppo")


def test_zero_variance_groups():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    assert zero_variance_groups(r, 2).tolist() == [True, False, True]


def test_policy_loss_hand_computed():
    # token 0: A=+1, ratio e^0.5 > 1.2 -> clipped at 1.2 -> loss -1.2
    # token 1: A=-1, ratio e^-0.5 = 0.607 < 0.8 -> max(0.607, 0.8) = 0.8
    # token 2: A=-1, ratio e^3 = 20.1 -> max(20.1, 0.8) = 20.1, dual clip c=10 -> 10
    # token 3: A=+2, ratio 1 -> -2
    logp = torch.tensor([0.5, -0.5, 3.0, 0.0])
    old = torch.zeros(4)
    adv = torch.tensor([1.0, -1.0, -1.0, 2.0])
    loss, m = policy_loss(logp, old, adv, global_tokens=8.0, clip_low=0.2, clip_high=0.2, dual_clip=10.0)
    expected = (-1.2 + 0.8 + 10.0 - 2.0) / 8.0
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert m["clip_frac"].item() == 2.0  # tokens 0 and 1
    assert m["dual_clip_frac"].item() == 1.0
    assert math.isclose(m["approx_kl"].item(), -3.0, rel_tol=1e-6)


def test_policy_loss_gradient_is_token_mean_over_global_count():
    logp = torch.zeros(3, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 0.5])
    loss, _ = policy_loss(logp, logp.detach(), adv, global_tokens=6.0)
    loss.backward()
    # at ratio 1 the unclipped branch is active: d(-A r)/dlogp = -A
    assert torch.allclose(logp.grad, -adv / 6.0)


def test_entropy_bonus_and_k3_kl():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    ent = torch.tensor([0.5, 1.5])
    ref = torch.tensor([-1.0, -1.0])
    loss, m = policy_loss(logp, logp.detach(), torch.zeros(2), global_tokens=2.0, entropy=ent, entropy_coef=0.1,
                          ref_logp=ref, kl_coef=0.5)
    kl = (torch.exp(ref - logp) - (ref - logp) - 1).detach()
    assert math.isclose(loss.item(), (-(0.1 * ent).sum() + 0.5 * kl.sum()).item() / 2.0, rel_tol=1e-6)
    assert math.isclose(m["kl_ref"].item(), kl.sum().item(), rel_tol=1e-6)
    assert kl[0].item() == 0.0 and kl[1].item() > 0.0


def _loss_and_grad(logp, old, adv, **kw):
    x = torch.tensor(logp, dtype=torch.float32, requires_grad=True)
    loss, metrics = policy_loss(x, torch.tensor(old), torch.tensor(adv), global_tokens=len(logp), **kw)
    loss.backward()
    return loss.detach(), x.grad, metrics


def test_a_huge_log_ratio_gives_a_zero_not_a_nan_gradient():
    """The reported case: log ratio +100 nats, positive advantage -> clipped at 1 + 0.2, loss -1.2, gradient 0."""
    loss, grad, _ = _loss_and_grad([-50.0], [-150.0], [1.0])
    assert loss.item() == pytest.approx(-1.2)
    assert torch.equal(grad, torch.zeros(1))


@pytest.mark.parametrize("logp, old, adv, want_loss", [
    ([-50.0], [-150.0], [-1.0], 10.0),  # negative advantage, ratio huge: the dual clip caps the loss at -A c = 10
    ([-150.0], [-50.0], [1.0], 0.0),  # ratio exp(-100) -> 0, positive advantage: loss -A r ~ 0
    ([-150.0], [-50.0], [-1.0], 0.8),  # ratio ~ 0, negative advantage: clipped at 1 - 0.2
    ([0.0], [-1000.0], [1.0], -1.2),  # 1000 nats
])
def test_extreme_log_ratios_stay_finite(logp, old, adv, want_loss):
    loss, grad, metrics = _loss_and_grad(logp, old, adv)
    assert loss.item() == pytest.approx(want_loss, abs=1e-6)
    assert torch.isfinite(grad).all() and torch.equal(grad, torch.zeros(1))  # every one of these is clipped
    assert all(torch.isfinite(v) for v in metrics.values())


def test_unclipped_gradient_is_unchanged_by_the_bound():
    """Inside the clip range the bound changes nothing: d(-A r)/dlogp = -A r."""
    loss, grad, _ = _loss_and_grad([-1.0], [-1.05], [2.0])
    r = math.exp(0.05)
    assert loss.item() == pytest.approx(-2.0 * r, rel=1e-6)
    assert grad.item() == pytest.approx(-2.0 * r, rel=1e-6)


@pytest.mark.parametrize("gap", [100.0, -100.0, 30.0])
def test_k3_kl_term_is_bounded_and_its_gradient_finite(gap):
    """k3 = exp(d) - d - 1 with d = ref - new: exp(100) overflows fp32; the bounded term stays finite, is at most
    KL_BOUND, and gives a finite gradient."""
    from bupo.loss import KL_BOUND
    x = torch.tensor([-5.0], requires_grad=True)
    loss, metrics = policy_loss(x, x.detach(), torch.zeros(1), global_tokens=1, ref_logp=torch.tensor([-5.0 + gap]),
                                kl_coef=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert 0 <= metrics["kl_ref"].item() <= KL_BOUND


def test_bounded_ratio():
    from bupo.loss import LOG_RATIO_BOUND, bounded_ratio
    x = torch.tensor([-1e4, -3.0, 0.0, 3.0, 1e4, float("inf")], requires_grad=True)
    r = bounded_ratio(x)
    assert torch.isfinite(r).all()
    assert r[1:4].tolist() == pytest.approx([math.exp(-3), 1.0, math.exp(3)], rel=1e-6)
    assert r[4].item() == pytest.approx(math.exp(LOG_RATIO_BOUND), rel=1e-6)
    r.sum().backward()
    assert x.grad[0] == 0 and x.grad[4] == 0 and x.grad[5] == 0 and x.grad[2] == 1


@pytest.mark.parametrize("estimator, norm", [("grpo", True), ("grpo", False), ("rloo", True), ("reinforce_pp", True)])
@pytest.mark.parametrize("value", [0.35, 0.1, 1 / 3, -2.7, 1e-3])
def test_a_group_without_reward_spread_has_exactly_zero_advantage(estimator, norm, value):
    """Seven equal rewards of 0.35: the float32 mean is not exactly 0.35, and the residue divided by 0 + eps used
    to give |A| = 0.029 (GRPO); every estimator now gives exact zeros, also beside a group that has spread."""
    flat = torch.full((7,), value)
    assert group_advantages(flat, 7, estimator=estimator, norm_by_std=norm).tolist() == [0.0] * 7
    if estimator != "reinforce_pp":  # one flat group next to one with spread: the flat one is still exactly 0
        mixed = torch.cat([flat, torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.25])])
        adv = group_advantages(mixed, 7, estimator=estimator, norm_by_std=norm)
        assert adv[:7].tolist() == [0.0] * 7 and bool((adv[7:] != 0).all())


def test_the_float32_residue_of_seven_rewards_of_0_35_is_real():
    """The example of the issue: the residue that the exact-zero rule removes exists (guards the test above)."""
    g = torch.full((1, 7), 0.35)
    assert float((g - g.mean(dim=1, keepdim=True)).abs().max()) > 0


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_size_below_the_estimators_minimum_is_an_error_naming_it(estimator):
    with pytest.raises(ValueError, match=rf"group_size=1 is invalid for estimator '{estimator}'.*>= 2"):
        group_advantages(torch.tensor([1.0, 0.0, 1.0]), 1, estimator=estimator)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="group_size"):
            group_advantages(torch.tensor([1.0, 0.0]), bad, estimator=estimator)


def test_reinforce_pp_accepts_one_sample_per_prompt():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv = group_advantages(r, 1, estimator="reinforce_pp", eps=0.0)
    assert torch.allclose(adv, (r - 0.5) / r.std()) and bool(torch.isfinite(adv).all())
