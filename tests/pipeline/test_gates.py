"""Exit gates: architecture, the two decision samplers and their gradients, the cascade's
expected exit layer, the routing and decision costs, and a gate that learns a synthetic rule."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from pipeline.config import GatesConfig
from pipeline.norm import FinalNorm
from pipeline.teacher import TeacherWeights
from pipeline.gates import (
    ExitGate,
    build_gates,
    gates_state_dict,
    load_gates,
    exit_decision_cost,
    expected_exit_layer,
    gate_loss,
    gate_targets,
    gumbel_sigmoid,
    oracle_exit_layer,
    routing_loss,
    straight_through_bernoulli,
)




def make_teacher(hidden: int, norm_kind: str = "rms", norm_bias: bool = False, seed: int = 0) -> TeacherWeights:
    g = torch.Generator().manual_seed(seed)
    bias = 0.3 * torch.randn(hidden, generator=g) if norm_bias else None
    return TeacherWeights(lm_head=torch.randn(10, hidden, generator=g),
                          final_norm=1 + 0.5 * torch.randn(hidden, generator=g), norm_kind=norm_kind, final_norm_bias=bias)


def test_architecture():
    teacher = make_teacher(64)
    gate = ExitGate(teacher, hidden_ratio=4, layer=6)
    assert isinstance(gate.norm, FinalNorm) and gate.norm.weight.shape == (64,)
    first, act, last = gate.mlp
    assert isinstance(first, nn.Linear) and (first.in_features, first.out_features) == (64, 16)
    assert isinstance(act, nn.ReLU)
    assert isinstance(last, nn.Linear) and (last.in_features, last.out_features) == (16, 1)
    h = torch.randn(5, 64).half()
    assert gate(h).shape == (5,) and gate(h).dtype == torch.float32
    torch.testing.assert_close(gate.exit_probability(h), torch.sigmoid(gate(h)))

    gates = build_gates(GatesConfig(hidden_ratio=8), [6, 12], teacher)
    assert list(gates) == ["6", "12"] and gates["12"].mlp[0].out_features == 8 and gates["12"].layer == 12
    with pytest.raises(TypeError, match="TeacherWeights"):
        build_gates(GatesConfig(), [6], 64)  # type: ignore[arg-type]


@pytest.mark.parametrize("norm_kind, norm_bias", [("rms", False), ("layer", True), ("layer", False)])
def test_gate_norm_is_a_trainable_copy_of_the_final_norm(norm_kind, norm_bias):
    """Gates read the same normalised state as heads and the logit lens, each with its own copy."""
    teacher = make_teacher(32, norm_kind, norm_bias)
    gates = build_gates(GatesConfig(), [2, 4], teacher)
    h = 3 * torch.randn(7, 32) + 1
    for gate in gates.values():
        torch.testing.assert_close(gate.norm(h), teacher.apply_norm(h))
        assert gate.norm.weight.requires_grad and gate.norm.weight.data_ptr() != teacher.final_norm.data_ptr()
    assert gates["2"].norm.weight.data_ptr() != gates["4"].norm.weight.data_ptr()
    assert ("2.norm.bias" in gates_state_dict(gates)) == norm_bias


@pytest.mark.parametrize("features", ["hidden", "hidden+confidence", "hidden+confidence+change"])
def test_save_load_round_trip_and_mismatched_teacher(features):
    teacher = make_teacher(32, "layer", norm_bias=True)
    cfg = GatesConfig(hidden_ratio=8, features=features)
    gates = build_gates(cfg, [2, 4], teacher)
    with torch.no_grad():
        for p in gates.parameters():
            p.add_(torch.randn_like(p))
        for g in gates.values():
            g.set_feature_stats(torch.rand(4), torch.rand(4) + 0.5)
    # the features a gate reads travel with its state, whatever the loading config says
    loaded = load_gates(GatesConfig(hidden_ratio=8), teacher, gates_state_dict(gates))
    h, conf = torch.randn(5, 32), torch.rand(5, 4)
    for key in gates:
        assert loaded[key].features == features
        assert torch.equal(gates[key](h, conf), loaded[key](h, conf))
    with pytest.raises(ValueError, match="does not fit a gate on this teacher.*rms norm"):
        load_gates(cfg, make_teacher(32), gates_state_dict(gates))


def test_straight_through_bernoulli():
    p = torch.tensor([0.0, 0.3, 0.5, 0.9, 1.0], requires_grad=True)
    g = torch.Generator().manual_seed(0)
    d = straight_through_bernoulli(p, g)
    assert set(d.tolist()) <= {0.0, 1.0}
    assert d[0].item() == 0.0 and d[-1].item() == 1.0
    upstream = torch.tensor([1.0, -2.0, 3.0, 0.5, 7.0])
    d.backward(upstream)
    torch.testing.assert_close(p.grad, upstream)  # d(out)/dp = identity

    many = straight_through_bernoulli(torch.full((20_000,), 0.3), g)
    assert set(many.unique().tolist()) == {0.0, 1.0}
    assert many.mean().item() == pytest.approx(0.3, abs=0.02)


def test_gumbel_sigmoid_hard_forward_and_soft_gradient():
    logits = torch.tensor([-3.0, -0.7, 0.4, 2.5], requires_grad=True)
    out = gumbel_sigmoid(logits, tau_forward=1e-6, tau_backward=0.5, generator=torch.Generator().manual_seed(0))
    assert out.tolist() == [0.0, 0.0, 1.0, 1.0]  # tau_f -> 0: the deterministic rule p > 0.5
    out.sum().backward()
    grad = logits.grad
    assert torch.isfinite(grad).all() and (grad > 0).all()
    s = torch.sigmoid(logits.detach() / 0.5)
    torch.testing.assert_close(grad, s * (1 - s) / 0.5, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tau_forward", [1.0, 2.0])
def test_gumbel_sigmoid_samples_at_forward_temperature(tau_forward):
    logits = torch.full((40_000,), 1.0)
    out = gumbel_sigmoid(logits, tau_forward, 1.0, generator=torch.Generator().manual_seed(1))
    assert set(out.unique().tolist()) == {0.0, 1.0}
    assert out.mean().item() == pytest.approx(torch.sigmoid(torch.tensor(1.0 / tau_forward)).item(), abs=0.01)


def test_expected_exit_layer_by_hand():
    p = torch.tensor([[0.5, 0.5], [0.2, 0.9], [1.0, 0.3], [0.0, 0.0]])
    got = expected_exit_layer(p, [6, 12], final_layer=30)
    # row 1: 6*.2 + 12*.8*.9 + 30*.8*.1 = 1.2 + 8.64 + 2.4
    torch.testing.assert_close(got, torch.tensor([6 * 0.5 + 12 * 0.25 + 30 * 0.25, 12.24, 6.0, 30.0]))
    with pytest.raises(ValueError, match="increasing"):
        expected_exit_layer(p, [12, 6], final_layer=30)
    with pytest.raises(ValueError, match="one layer per column"):
        expected_exit_layer(p, [6], final_layer=30)


def test_routing_loss():
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    assert routing_loss(p, [6, 12], 30, torch.tensor([6.0, 12.0, 30.0])).item() == 0.0
    assert routing_loss(p[:1], [6, 12], 30, 6.0).item() == 0.0
    # in fractions of depth: ((6 - 12) / 30)^2
    assert routing_loss(p[:1], [6, 12], 30, 12.0).item() == pytest.approx((6 / 30) ** 2)


def test_gate_targets_and_oracle_exit():
    teacher = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0]])
    head = torch.tensor([[0.0, 2.0, 1.0], [0.0, 0.0, 1.0]])
    assert gate_targets(head, teacher.argmax(-1)).tolist() == [1.0, 0.0]
    assert gate_targets(head.argmax(-1), teacher).tolist() == [1.0, 0.0]
    correct = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    assert oracle_exit_layer(correct, [6, 12], 30).tolist() == [12.0, 6.0, 30.0, 6.0]


def test_decision_cost_by_hand_and_bayes_rule():
    correct = torch.tensor([[0.0, 1.0]])
    # threshold 0.5 -> c = 1: exit at the wrong first head costs 1, exiting at the right second 0
    assert exit_decision_cost(torch.tensor([[1.0, 0.0]]), correct, 0.5).item() == pytest.approx(0.5)
    assert exit_decision_cost(torch.tensor([[0.0, 1.0]]), correct, 0.5).item() == 0.0
    # passing the correct second head too wastes compute: c = 1
    assert exit_decision_cost(torch.tensor([[0.0, 0.0]]), correct, 0.5).item() == pytest.approx(0.5)

    # one gate, a share q of its tokens correct: the cost pushes p up exactly when q > threshold
    for q, sign in [(0.85, -1), (0.75, 1)]:
        y = (torch.arange(1000) < q * 1000).float()[:, None]  # [n, 1]
        p = torch.full((1000, 1), 0.5, requires_grad=True)
        exit_decision_cost(straight_through_bernoulli(p), y, threshold=0.8).backward()
        assert torch.sign(p.grad.sum()).item() == sign


def test_gate_loss_components():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 3, requires_grad=True)
    correct = (torch.rand(64, 3, generator=g) > 0.5).float()
    layers = [4, 8, 12]
    base, parts = gate_loss(logits, correct, GatesConfig(), layers, 16, torch.Generator().manual_seed(1))
    assert set(parts) >= {"loss", "bce", "decision", "routing", "expected_exit_layer", "sampled_exit_rate"}
    assert parts["loss"] == pytest.approx(parts["bce"] + parts["decision"])
    with_routing, parts_r = gate_loss(
        logits, correct, GatesConfig(routing_weight=2.0), layers, 16, torch.Generator().manual_seed(1)
    )
    assert with_routing.item() == pytest.approx(base.item() + 2.0 * parts_r["routing"], rel=1e-5)
    gumbel, _ = gate_loss(logits, correct, GatesConfig(sampling="gumbel", tau_forward=0.5, tau_backward=2.0), layers, 16)
    gumbel.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0

    bad = torch.full((4, 3), float("nan"))
    with pytest.raises(FloatingPointError, match="not finite"):
        gate_loss(bad, correct[:4], GatesConfig(), layers, 16)


@pytest.mark.parametrize("sampling", ["straight_through", "gumbel"])
def test_gate_learns_a_feature_rule(sampling):
    """Correctness of each head depends on one feature of its layer's state (plus noise);
    trained gates must rank held-out tokens by it (AUROC > 0.9)."""
    torch.manual_seed(0)
    hidden, layers, final = 32, [2, 4], 6
    cfg = GatesConfig(sampling=sampling, routing_weight=0.5, tau_forward=1.0, tau_backward=1.0, features="hidden")

    def batch(n):
        hs = [torch.randn(n, hidden) * 3.0 for _ in layers]  # [n, H] per exit layer
        correct = torch.stack(
            [(h[:, k] + 0.3 * torch.randn(n) > (0.5 if k == 0 else -0.5)).float() for k, h in enumerate(hs)], dim=1
        )  # [n, K]
        return hs, correct

    gates = build_gates(cfg, layers, make_teacher(hidden))
    opt = torch.optim.AdamW(gates.parameters(), lr=3e-3)
    train_h, train_c = batch(2048)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        logits = torch.stack([gates[str(layer)](h) for layer, h in zip(layers, train_h)], dim=1)  # [n, K]
        loss, _ = gate_loss(logits, train_c, cfg, layers, final, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()

    test_h, test_c = batch(2048)
    with torch.no_grad():
        for k, layer in enumerate(layers):
            p = gates[str(layer)].exit_probability(test_h[k])
            auc = roc_auc_score(test_c[:, k].numpy(), p.numpy())
            assert auc > 0.9, (layer, auc)
