"""The SteerMoE math, pooling and parameter counts, checked against hand computations."""

import pytest
import torch

from steermoe_core.config import ModelConfig, SteeringConfig
from steermoe_core.model.adapter import count_adapter_parameters
from steermoe_core.model.steering import SteeringMoE, pool_frames


def test_steering_equals_hand_computation():
    torch.manual_seed(0)
    L, E, D = 3, 4, 5
    s = SteeringMoE(L, D, SteeringConfig(num_experts=E))
    h = torch.randn(2, 6, D)
    for layer in range(L):
        W = s.router.weight[layer * E : (layer + 1) * E]
        b = s.router.bias[layer * E : (layer + 1) * E]
        g = torch.softmax(h @ W.T + b, dim=-1)
        expected = h + s.scales[layer] * (g @ s.vectors[layer])
        torch.testing.assert_close(s(layer, h), expected)


def test_router_slice_equals_full_router_then_slice():
    """Computing only layer l's slice is the reference's math at 1/L of the cost."""
    torch.manual_seed(1)
    L, E, D = 4, 8, 16
    s = SteeringMoE(L, D, SteeringConfig(num_experts=E))
    h = torch.randn(3, 7, D)
    full = s.router(h)
    for layer in range(L):
        torch.testing.assert_close(s.router_logits(layer, h), full[..., layer * E : (layer + 1) * E])


def test_top_k_renormalises_and_temperature_sharpens():
    torch.manual_seed(2)
    s = SteeringMoE(1, 4, SteeringConfig(num_experts=6, top_k=2))
    logits = torch.randn(5, 6)
    g = s.gates(logits)
    assert ((g > 0).sum(-1) == 2).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(5))
    sharp = SteeringMoE(1, 4, SteeringConfig(num_experts=6, temperature=0.1)).gates(logits)
    assert (sharp.max(-1).values > torch.softmax(logits, -1).max(-1).values).all()


def test_load_balance_loss_is_one_when_balanced_and_grows_when_collapsed():
    s = SteeringMoE(1, 2, SteeringConfig(num_experts=2, load_balance_weight=1.0)).train()
    with torch.no_grad():
        s.router.weight.zero_()
        s.router.bias.copy_(torch.tensor([0.0, 0.0]))
    s(0, torch.randn(1, 4, 2))
    # uniform gates (0.5, 0.5), the argmax tie goes to expert 0: E * (1 * 0.5 + 0 * 0.5) = 1
    assert s.aux_loss.item() == pytest.approx(1.0, abs=1e-3)
    s.reset_aux()
    with torch.no_grad():
        s.router.bias.copy_(torch.tensor([10.0, -10.0]))
    s(0, torch.randn(1, 4, 2))
    assert s.aux_loss.item() == pytest.approx(2.0, abs=1e-3)


@pytest.mark.parametrize("mode", ["avg", "max", "stack"])
def test_pooling_ignores_padded_frames(mode):
    torch.manual_seed(3)
    x = torch.randn(1, 6, 3)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    poisoned = x.clone()
    poisoned[0, 5] = 1e4
    a, m = pool_frames(x, mask, 4, mode)
    b, _ = pool_frames(poisoned, mask, 4, mode)
    torch.testing.assert_close(a, b)
    assert m.tolist() == [[True, True]]
    if mode == "avg":
        torch.testing.assert_close(a[0, 1], x[0, 4])
        torch.testing.assert_close(a[0, 0], x[0, :4].mean(0))
    if mode == "max":
        torch.testing.assert_close(a[0, 0], x[0, :4].max(0).values)
    if mode == "stack":
        assert a.shape == (1, 2, 12)
        torch.testing.assert_close(a[0, 0], x[0, :4].reshape(-1))


@pytest.mark.parametrize("L,E,D,H", [(32, 8, 1280, 3584), (32, 8, 1280, 896), (4, 8, 384, 576), (6, 3, 512, 2048)])
def test_parameter_breakdown_matches_formula(L, E, D, H):
    counts = count_adapter_parameters(L, D, H, ModelConfig(steering=SteeringConfig(num_experts=E)))
    assert counts["steering_vectors"] == L * E * D
    assert counts["router"] == D * L * E + L * E
    assert counts["scales"] == L
    assert counts["projector"] == D * H + H
    assert counts["total"] == L * E * D + D * L * E + L * E + L + D * H + H


def test_whisper_large_v3_qwen7b_is_5_246_752_not_1_8m():
    counts = count_adapter_parameters(32, 1280, 3584, ModelConfig())
    assert counts == {"steering_vectors": 327_680, "router": 327_936, "scales": 32, "projector": 4_591_104, "total": 5_246_752}


def test_variants_change_the_counts():
    cfg = ModelConfig()
    cfg.steering.placement = "post_encoder"
    assert count_adapter_parameters(32, 1280, 3584, cfg)["steering_vectors"] == 8 * 1280
    cfg.steering.placement = "none"
    assert count_adapter_parameters(32, 1280, 3584, cfg)["total"] == 1280 * 3584 + 3584
    cfg.projector.pooling = "stack"
    assert count_adapter_parameters(32, 1280, 3584, cfg)["projector"] == 4 * 1280 * 3584 + 3584


def test_vocab_posterior_feeds_the_llm_mixtures_of_its_own_embeddings():
    """A confident token reads as the LLM's own embedding of that word; an unsure one as a weighted
    mean of its candidates; the option adds no parameters and off it passes tokens through."""
    from steermoe_core.config import ProjectorConfig
    from steermoe_core.model.adapter import Adapter

    torch.manual_seed(2)
    vocab = torch.randn(50, 16)
    on = Adapter(2, 8, 16, ModelConfig(projector=ProjectorConfig(vocab_posterior=True)))
    off = Adapter(2, 8, 16, ModelConfig())
    assert on.parameter_counts() == off.parameter_counts()
    confident = 20.0 * vocab[[7, 3]]  # dot product with its own row dominates every other
    torch.testing.assert_close(on.llm_inputs(confident[None], vocab)[0], vocab[[7, 3]], atol=1e-3, rtol=0)
    unsure = torch.randn(1, 4, 16, requires_grad=True)
    mixed = on.llm_inputs(unsure, vocab)
    torch.testing.assert_close(mixed, torch.softmax(unsure @ vocab.T, -1) @ vocab)
    mixed.sum().backward()
    assert unsure.grad.abs().sum() > 0  # the LLM's loss reaches the projector through the softmax
    assert off.llm_inputs(unsure, vocab) is unsure
