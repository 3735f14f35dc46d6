"""NKAT-ViT algebra: the star-product layer against an explicit numpy computation, the model's
options, and the score definitions (lambda, TPE, Global TPE, Consistency, Robustness)."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nkat_gguf.errors import UserError  # noqa: E402
from nkat_gguf.measure.evaluate import tpe as gguf_tpe  # noqa: E402
from nkat_vit import metrics  # noqa: E402
from nkat_vit.config import ViTConfig  # noqa: E402
from nkat_vit.model import NKATViT, sparsify  # noqa: E402
from nkat_vit.star import StarLinear, layer_strength  # noqa: E402


def _layer(n_in, n_out, strength, rank=3, seed=0):
    torch.manual_seed(seed)
    layer = StarLinear(n_in, n_out, rank=rank, strength=strength)
    with torch.no_grad():  # factors large enough that the star term is far above float noise
        if layer.has_theta:
            layer.theta_a.normal_(0, 1.0)
            layer.theta_b.normal_(0, 1.0)
    return layer


def test_square_theta_is_antisymmetric_and_matches_explicit_star_product():
    s = 0.37
    layer = _layer(12, 12, s)
    A = layer.theta_a.detach().double().numpy()
    B = layer.theta_b.detach().double().numpy()
    M = A @ B.T
    theta = 0.5 * (M - M.T)  # nkat_gguf's antisymmetric structure, computed independently here
    np.testing.assert_allclose(layer.theta().detach().double().numpy(), theta, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(theta, -theta.T)
    x = np.random.default_rng(1).standard_normal((5, 12))
    W = layer.weight.detach().double().numpy()
    b = layer.bias.detach().double().numpy()
    expected = x @ W.T + b + 0.5 * s * (x @ theta.T)  # y = W x + b + 0.5 s (theta x)
    got = layer(torch.from_numpy(x).float()).detach().double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    plain = x @ W.T + b
    assert np.abs(expected - plain).max() > 0.1  # the star term is really there


def test_non_square_theta_is_general_low_rank():
    s = 0.5
    layer = _layer(8, 20, s, rank=2)
    A = layer.theta_a.detach().double().numpy()
    B = layer.theta_b.detach().double().numpy()
    assert not layer.antisymmetric
    assert np.linalg.matrix_rank(A @ B.T) == 2
    x = np.random.default_rng(2).standard_normal((4, 8))
    W, b = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()
    got = layer(torch.from_numpy(x).float()).detach().double().numpy()
    np.testing.assert_allclose(got, x @ W.T + b + 0.5 * s * x @ (A @ B.T).T, rtol=1e-4, atol=1e-4)


def test_strength_zero_is_exactly_a_plain_linear():
    star = _layer(16, 16, 0.0)
    plain = torch.nn.Linear(16, 16)
    plain.load_state_dict(star.state_dict())  # no extra parameters to load or drop
    x = torch.randn(7, 16)
    assert torch.equal(star(x), plain(x))
    assert not star.has_theta
    assert sum(p.numel() for p in star.parameters()) == sum(p.numel() for p in plain.parameters())


def test_theta_learns_through_the_star_term():
    layer = _layer(6, 6, 0.1)
    layer(torch.randn(3, 6)).pow(2).sum().backward()
    assert layer.theta_a.grad is not None and layer.theta_a.grad.abs().sum() > 0


def test_layer_strength_decays_per_block():
    assert layer_strength(0.0024, 0.99, 0) == pytest.approx(0.0024)
    assert layer_strength(0.0024, 0.99, 5) == pytest.approx(0.0024 * 0.99 ** 5)
    model = NKATViT(ViTConfig(image_size=8, patch=2, dim=16, heads=2, depth=3, nkat_strength=0.01, nkat_decay=0.5))
    assert [b.attn.q.strength for b in model.blocks] == pytest.approx([0.01, 0.005, 0.0025])
    assert all(b.attn.o.antisymmetric and not b.fc1.antisymmetric for b in model.blocks)


def test_model_parameter_counts_and_options():
    cfg = dict(image_size=28, patch=2, dim=32, heads=4, depth=2, nkat_rank=4)
    plain = NKATViT(ViTConfig(**cfg, nkat_strength=0.0))
    star = NKATViT(ViTConfig(**cfg, nkat_strength=0.01))
    # per block: q, k, v, o (32x32) and fc1 (32->64), fc2 (64->32); rank 4: (out + in) * 4 each
    per_block = 4 * (32 + 32) * 4 + (64 + 32) * 4 * 2
    assert star.theta_parameter_count() == 2 * per_block
    assert star.parameter_count() - plain.parameter_count() == 2 * per_block
    x = torch.randn(3, 1, 28, 28)
    for extra in ({"stem": "tiny"}, {"stem": "small", "patch": 4}, {"top_k": 5, "temperature": 0.7},
                  {"top_p": 0.9}):
        assert NKATViT(ViTConfig(**(cfg | extra))).eval()(x).shape == (3, 10)
    color = NKATViT(ViTConfig(image_size=32, in_channels=3, patch=4, dim=32, heads=4, depth=1, color_norm=True))
    assert color(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(UserError, match="stem"):
        NKATViT(ViTConfig(stem="huge"))
    with pytest.raises(UserError, match="heads"):
        NKATViT(ViTConfig(dim=30, heads=4))


def test_sparsified_attention_keeps_the_top_keys_and_renormalizes():
    attn = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    k2 = sparsify(attn, 2, 1.0)
    torch.testing.assert_close(k2, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = sparsify(attn, 0, 0.8)  # 0.5 + 0.3 reaches 0.8: the third key is not needed
    torch.testing.assert_close(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = sparsify(attn, 0, 0.81)
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    shuffled = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    torch.testing.assert_close(sparsify(shuffled, 0, 0.8), torch.tensor([[0.0, 0.625, 0.0, 0.375]]))


def test_scores_follow_their_definitions():
    # lambda = 9 (1 + parameters in millions), as the GGUF side's 9 (1 + rho)
    assert metrics.complexity(2_000_000) == pytest.approx(27.0)
    assert metrics.tpe(0.9, 1_000_000) == pytest.approx(0.9 / math.log10(19.0))
    assert metrics.tpe(0.5, 0) == pytest.approx(0.5)
    # one shared formula: a GGUF baseline at PPL 4 and a zero-size model at accuracy 0.25 agree
    assert gguf_tpe(4.0) == pytest.approx(metrics.tpe(0.25, 0))
    acc = {"a": 0.9, "b": 0.6}
    params = {"a": 1_000_000, "b": 3_000_000}
    assert metrics.global_tpe(acc, params) == pytest.approx(0.75 / math.log10(1 + 9 * 3))
    tpes = {"a": 0.6, "b": 0.4}
    assert metrics.consistency(tpes) == pytest.approx(1 - 0.1 / 0.5)
    assert metrics.consistency({"a": 0.6}) is None
    assert metrics.consistency({"a": 0.5, "b": 0.5}) == pytest.approx(1.0)
    assert metrics.robustness(0.8, {"noise": 0.6, "blur": 0.4}) == pytest.approx(0.625)


def test_corruptions_are_fixed_and_change_the_images():
    x = torch.rand(6, 3, 16, 16)
    for name in metrics.CORRUPTIONS:
        a = metrics.corrupt(x, name, torch.Generator().manual_seed(1))
        b = metrics.corrupt(x, name, torch.Generator().manual_seed(1))
        assert a.shape == x.shape and torch.equal(a, b), name
        assert not torch.allclose(a, x), name
    shifted = metrics.corrupt(x, "shift", torch.Generator())
    assert torch.equal(shifted[:, :, 1:, 1:], x[:, :, :-1, :-1])
