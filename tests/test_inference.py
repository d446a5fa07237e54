"""The inference fast path computes what the eager model computes."""
import pytest
import torch

import finegrain
from finegrain.errors import FinegrainError
from finegrain.eval.inference import InferenceModel, InferenceOptions, fold_batchnorm
from test_models import randomize_bn


@pytest.mark.parametrize("name", ["resnet50d", "assemble_resnet50", "r50_sk_original", "se_mobilenet_v1"])
def test_folded_fast_path_matches_eager(name):
    torch.manual_seed(0)
    model = finegrain.create_model(name, num_classes=5, base_width=16).eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    fast = InferenceModel(model, InferenceOptions(), torch.device("cpu"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.model.modules())
    assert torch.allclose(fast(x), expected, atol=1e-4, rtol=1e-4)
    # The original model is untouched (the fast path works on a copy).
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_fold_counts_every_conv_bn_pair():
    model = finegrain.create_model("assemble_resnet50", base_width=8).eval()
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert fold_batchnorm(model) == bns


def test_bf16_embeddings_agree_with_fp32():
    torch.manual_seed(0)
    model = finegrain.create_embedder("assemble_resnet50", embedding_size=32, base_width=16).eval()
    randomize_bn(model)
    x = torch.randn(4, 3, 64, 64)
    cpu = torch.device("cpu")
    fp32 = InferenceModel(model, InferenceOptions(), cpu).embed(x)
    bf16 = InferenceModel(model, InferenceOptions(dtype=torch.bfloat16), cpu).embed(x)
    assert torch.nn.functional.cosine_similarity(fp32, bf16).min() > 0.99


def test_biglittle_rejects_tiny_inputs_clearly():
    model = finegrain.create_model("assemble_resnet50", base_width=8).eval()
    with pytest.raises(FinegrainError, match="at least 32x32"):
        model(torch.randn(1, 3, 24, 24))
