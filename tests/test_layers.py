"""Unit tests of the paper's building blocks, each alone."""
import torch
import torch.nn.functional as F

from finegrain.layers.blur_pool import BlurPool2d, binomial_filter
from finegrain.layers.drop_block import DropBlock2d, drop_block
from finegrain.layers.gem import gem
from finegrain.layers.padding import avg_pool_same, max_pool_same
from finegrain.layers.selective_kernel import SelectiveKernel


def test_binomial_filter_values():
    expected = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16
    assert torch.allclose(binomial_filter(3), expected)
    five = binomial_filter(5)
    assert torch.allclose(five[2], torch.tensor([1.0, 4, 6, 4, 1]) * 6 / 256)
    assert abs(float(five.sum()) - 1) < 1e-6


def test_blur_uses_reflect_padding():
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    out = BlurPool2d(3, 2)(x)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    expected = (padded[0, 0, 0:3, 0:3] * binomial_filter(3)).sum()
    assert out.shape == (1, 1, 2, 2)
    assert torch.isclose(out[0, 0, 0, 0], expected)
    zero_padded = (F.pad(x, (1, 1, 1, 1))[0, 0, 0:3, 0:3] * binomial_filter(3)).sum()
    assert not torch.isclose(out[0, 0, 0, 0], zero_padded)


def test_tf_same_max_pool_pads_after_at_even_sizes():
    x = torch.randn(1, 2, 8, 8)
    out = max_pool_same(x)
    expected = F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), 3, 2)
    assert torch.equal(out, expected)
    assert not torch.equal(out, F.max_pool2d(x, 3, 2, 1))
    odd = torch.randn(1, 2, 7, 7)
    assert torch.equal(max_pool_same(odd), F.max_pool2d(odd, 3, 2, 1))


def test_tf_same_avg_pool_excludes_padding():
    x = torch.ones(1, 1, 4, 4)
    assert torch.allclose(avg_pool_same(x, 2, 1), torch.ones(1, 1, 4, 4))
    y = torch.arange(4.0).reshape(1, 1, 2, 2)
    out = avg_pool_same(y, 2, 1)
    assert torch.allclose(out[0, 0], torch.tensor([[1.5, 2.0], [2.5, 3.0]]))


def test_sk_attention_weights_sum_to_one_across_branches():
    torch.manual_seed(0)
    for kind in ("doubled", "original"):
        sk = SelectiveKernel(8, 8, kind=kind).eval()
        captured = {}
        sk.fc2.register_forward_hook(lambda m, i, o: captured.update(logits=o))
        sk(torch.randn(2, 8, 6, 6))
        weights = captured["logits"].flatten(1).unflatten(1, (2, 8)).softmax(dim=1)
        assert torch.allclose(weights.sum(dim=1), torch.ones(2, 8))
        assert sk.fc1.out_channels == 32  # d = max(F // r, L) with L = 32


def test_sk_output_is_convex_combination_of_branches():
    sk = SelectiveKernel(4, 4).eval()
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        both = sk.act(sk.bn(sk.conv(x)))
        a, b = both[:, :4], both[:, 4:]
        out = sk(x)
    low, high = torch.minimum(a, b), torch.maximum(a, b)
    assert bool(((out >= low - 1e-6) & (out <= high + 1e-6)).all())


def test_drop_block_identity_at_eval_and_at_keep_prob_one():
    block = DropBlock2d(7)
    block.keep_prob = 0.5
    x = torch.randn(2, 4, 14, 14)
    assert torch.equal(block.eval()(x), x)
    block.train().keep_prob = 1.0
    assert torch.equal(block(x), x)


def test_drop_block_drops_about_one_minus_keep_prob_in_7x7_blocks():
    torch.manual_seed(0)  # the masks draw from torch's RNG, which the trainer seeds per step
    x = torch.ones(1, 64, 28, 28)
    out = drop_block(x, keep_prob=0.9, block_size=7)
    dropped = float((out == 0).float().mean())
    assert 0.05 < dropped < 0.15, dropped
    # Contiguous blocks: every dropped pixel lies in a fully dropped 7x7 window (of the seed grid).
    zero = (out[0] == 0).float()
    windows = F.avg_pool2d(zero[:, None], 7, 1)[:, 0] == 1
    covered = F.max_pool2d(windows[:, None].float(), 7, 1, padding=0)  # shape check only
    assert covered.shape[-1] == 28 - 12
    recovered = F.max_pool2d(F.pad(windows.float()[:, None], (6, 6, 6, 6)), 7, 1)[:, 0]
    assert torch.equal(recovered.bool(), zero.bool())
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1.0 / (1 - dropped)), rtol=1e-4)


def test_drop_block_gamma_scale_reduces_drop_rate():
    torch.manual_seed(1)
    x = torch.ones(1, 256, 14, 14)
    full = float((drop_block(x, 0.7, 7, 1.0) == 0).float().mean())
    quarter = float((drop_block(x, 0.7, 7, 0.25) == 0).float().mean())
    assert quarter < full / 2


def test_gem_matches_release_formula():
    x = torch.rand(2, 3, 4, 4) * 3
    expected = (x.clamp_min(1e-6) ** 3).sum(dim=(2, 3)).clamp_min(1e-6).mul(1 / 16) ** (1 / 3)
    assert torch.allclose(gem(x, 3.0), expected, atol=1e-6)
    assert torch.allclose(gem(x, 1.0), x.mean(dim=(2, 3)), atol=1e-5)
    zeros = torch.zeros(1, 1, 4, 4)
    assert torch.allclose(gem(zeros), torch.tensor([[(1e-6 / 16) ** (1 / 3)]]))
