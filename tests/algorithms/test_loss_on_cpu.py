import pytest
import torch

from mmupt_megatron.algorithms import PolicyLossConfig, grpo_policy_loss, kl_penalty, truncated_is_weights


def loss_of(logp, old, adv, mask, **cfg):
    config = PolicyLossConfig(**cfg)
    tokens, seqs = int(mask.sum()), mask.shape[0]
    return grpo_policy_loss(logp, old, adv, mask, cfg=config, global_num_tokens=tokens, global_num_seqs=seqs)


def test_on_policy_loss_is_minus_mean_advantage():
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.1, 0.9]]))
    adv, mask = torch.tensor([1.0, -2.0]), torch.ones(2, 2)
    loss, metrics = loss_of(logp, logp.clone(), adv, mask)
    assert loss.item() == pytest.approx(-(1 + 1 - 2 - 2) / 4)
    assert metrics["clip_fraction"].item() == 0.0 and metrics["ratio_mean"].item() == pytest.approx(1.0)


def test_asymmetric_clip_and_dual_clip():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[2.0, 0.5, 10.0, 1.1]]))
    mask = torch.ones(1, 4)
    # positive advantage: ratio 2 clipped at 1.3, ratio 0.5 not clipped (min objective), 10 -> 1.3, 1.1 free
    loss_pos, m = loss_of(logp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.3)
    assert loss_pos.item() == pytest.approx(-(1.3 + 0.5 + 1.3 + 1.1) / 4, rel=1e-5)
    assert m["clip_fraction"].item() == pytest.approx(0.5)
    # negative advantage: ratio 10 would cost 10 but the dual clip caps it at 3
    loss_neg, m = loss_of(logp, old, torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.3, dual_clip=3.0)
    assert loss_neg.item() == pytest.approx((2.0 + 0.8 + 3.0 + 1.1) / 4, rel=1e-5)
    assert m["dual_clip_fraction"].item() == pytest.approx(0.25)


def test_kl_estimators():
    logp, ref = torch.tensor([[-1.0]]), torch.tensor([[-2.0]])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(1.0)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(torch.exp(torch.tensor(-1.0)).item() + 1 - 1)
    assert kl_penalty(torch.tensor([[0.0]]), torch.tensor([[-50.0]]), "k3").item() <= 10.0


def test_kl_term_is_added_with_its_coefficient():
    logp, old = torch.tensor([[-1.0, -1.0]]), torch.tensor([[-1.0, -1.0]])
    ref, mask, adv = torch.tensor([[-2.0, -1.0]]), torch.ones(1, 2), torch.tensor([0.0])
    config = PolicyLossConfig(kl_coef=0.5, kl_estimator="k1")
    loss, metrics = grpo_policy_loss(
        logp, old, adv, mask, cfg=config, global_num_tokens=2, global_num_seqs=1, ref_logprobs_BT=ref
    )
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.0) / 2)
    assert metrics["kl_ref"].item() == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("agg", "expected"),
    [
        ("token-mean", (1 + 2 + 3) / 3),
        ("seq-mean-token-mean", ((1 + 2) / 2 + 3) / 2),
        ("seq-mean-token-sum", (1 + 2 + 3) / 2),
        ("seq-mean-token-sum-norm", (1 + 2 + 3) / (2 * 4)),
    ],
)
def test_aggregations(agg, expected):
    logp = torch.zeros(2, 2)
    adv = torch.tensor([[-1.0, -2.0], [-3.0, -9.0]])  # per-token advantages; loss_t = -A_t on policy
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, _ = loss_of(logp, logp, adv, mask, loss_agg=agg, norm_length=4, dual_clip=None)
    assert loss.item() == pytest.approx(expected)


def test_config_and_shape_errors():
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        PolicyLossConfig(dual_clip=0.5).check()
    with pytest.raises(ValueError, match="needs norm_length"):
        loss_of(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), loss_agg="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="shape mismatch"):
        loss_of(torch.zeros(2, 3), torch.zeros(2, 2), torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        loss_of(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), kl_coef=0.1)


def test_truncated_importance_sampling_weights_the_policy_gradient_only():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.9, 0.2]]))
    engine = torch.log(torch.tensor([[0.5, 0.25, 0.1, 0.4]]))  # ratios old/engine 1, 2, 9, 0.5
    weights, capped = truncated_is_weights(old, engine, 3.0)
    assert torch.allclose(weights, torch.tensor([[1.0, 2.0, 3.0, 0.5]]), atol=1e-6)
    assert capped.tolist() == [[False, False, True, False]]
    logp = old.clone().requires_grad_()
    mask, adv = torch.tensor([[1.0, 1.0, 1.0, 0.0]]), torch.tensor([2.0])
    ref = logp.detach() - 1.0
    config = PolicyLossConfig(kl_coef=0.5, kl_estimator="k1")
    loss, metrics = grpo_policy_loss(logp, old, adv, mask, cfg=config, global_num_tokens=3, global_num_seqs=1,
                                     ref_logprobs_BT=ref, engine_logprobs_BT=engine, rollout_is_cap=3.0)
    # on policy (ratio 1): pg_t = -A * w_t; the k1 KL (1 per token) is not weighted
    assert loss.item() == pytest.approx((-2.0 * (1 + 2 + 3) + 0.5 * 3) / 3, rel=1e-6)
    assert metrics["rollout_is_weight_mean"].item() == pytest.approx(2.0)  # over the 3 trained tokens
    assert metrics["rollout_is_clip_fraction"].item() == pytest.approx(1 / 3)
    (grad,) = torch.autograd.grad(loss, logp)
    # d/dlogp of -A * w * exp(logp - old) at logp = old is -A * w (the weights carry no gradient), + kl_coef
    assert torch.allclose(grad, torch.tensor([[-2.0 + 0.5, -4.0 + 0.5, -6.0 + 0.5, 0.0]]) / 3, atol=1e-6)
    plain, plain_metrics = grpo_policy_loss(logp, old, adv, mask, cfg=config, global_num_tokens=3, global_num_seqs=1,
                                            ref_logprobs_BT=ref)
    assert plain.item() == pytest.approx((-2.0 * 3 + 0.5 * 3) / 3) and "rollout_is_weight_mean" not in plain_metrics


@pytest.mark.parametrize("cap", [1.0, 0.5, -2.0, float("nan")])
def test_a_tis_cap_not_above_one_is_an_error(cap):
    with pytest.raises(ValueError, match="cap must be > 1"):
        truncated_is_weights(torch.zeros(1, 2), torch.zeros(1, 2), cap)
    with pytest.raises(ValueError, match="rollout_is_cap needs engine_logprobs_BT"):
        grpo_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), cfg=PolicyLossConfig(),
                         global_num_tokens=2, global_num_seqs=1, rollout_is_cap=2.0)
