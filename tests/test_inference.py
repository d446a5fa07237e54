"""The one predictor computes what the eager model computes, on the caller's model or on its own
folded copy, and every command's embedding is the same function of the model."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import finegrain
from finegrain.data import ImageDataset, demo_root, load_splits
from finegrain.data.transforms import eval_transform
from finegrain.errors import FinegrainError
from finegrain.eval.corruptions import load_eval_crop
from finegrain.eval.embed import embed_paths, image_transform
from finegrain.eval.inference import InferenceOptions, Predictor, embed_batch, embedding_mode, fold_batchnorm
from finegrain.eval.retrieval_eval import embed_loader
from finegrain.preprocessing import Preprocessing
from test_models import randomize_bn

CPU = torch.device("cpu")
FAST = InferenceOptions(channels_last=True, fold_bn=True)


@pytest.mark.parametrize("name", ["resnet50d", "assemble_resnet50", "r50_sk_original", "se_mobilenet_v1"])
def test_folded_fast_path_matches_eager(name):
    torch.manual_seed(0)
    model = finegrain.create_model(name, num_classes=5, base_width=16).eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    fast = Predictor(model, CPU, FAST)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.model.modules())
    assert torch.allclose(fast(x), expected, atol=1e-4, rtol=1e-4)
    # The original model is untouched (the fast path works on a copy).
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_fold_counts_every_conv_bn_pair():
    model = finegrain.create_model("assemble_resnet50", base_width=8).eval()
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert fold_batchnorm(model) == bns


def test_live_model_gives_eager_logits_and_keeps_every_module_mode():
    """Training-time evaluation: exactly model(x) in eval mode, and the trainer's modes come back
    as they were, a deliberately frozen (eval) submodule included."""
    torch.manual_seed(0)
    model = finegrain.create_model("resnet50d", num_classes=4, base_width=8)
    model.train()
    model.layer1.eval()
    x = torch.randn(6, 3, 32, 32)
    loader = DataLoader(TensorDataset(x, torch.arange(6)), batch_size=4)
    logits, labels = Predictor(model, CPU).predict(loader)
    modes = {name: module.training for name, module in model.named_modules()}
    assert modes[""] and not modes["layer1"] and not modes["layer1.0"] and modes["layer2"]
    with torch.no_grad():
        expected = model.eval()(x)
    assert torch.equal(logits, expected) and torch.equal(labels, torch.arange(6))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_an_empty_loader_is_refused_by_name():
    model = finegrain.create_model("resnet50d", num_classes=4, base_width=8)
    empty = DataLoader(TensorDataset(torch.zeros(0, 3, 32, 32), torch.zeros(0)), batch_size=4)
    with pytest.raises(FinegrainError, match="evaluation data set is empty"):
        Predictor(model, CPU).predict(empty)


def test_raw_frames_are_normalised_as_the_classification_eval_does():
    """Robustness feeds uint8 crops; the predictor normalises them by the checkpoint's
    preprocessing, and the logits are the classification evaluation's (float transform)."""
    torch.manual_seed(0)
    model = finegrain.create_model("resnet50d", num_classes=8, base_width=8).eval()
    pre = Preprocessing(model.preprocessing.mean, model.preprocessing.std, 48, 56, 48)
    samples = load_splits("folder", demo_root())["test"].samples[:6]
    raw = torch.stack([torch.from_numpy(load_eval_crop(s.path, pre)).permute(2, 0, 1) for s in samples])
    dataset = ImageDataset(samples, eval_transform(pre))
    floats = torch.stack([dataset[i][0] for i in range(len(samples))])
    from_raw = Predictor(model, CPU, preprocessing=pre).logits_in_batches(raw, batch_size=4)
    assert from_raw.shape == (6, 8)
    assert torch.allclose(from_raw, Predictor(model, CPU)(floats), atol=1e-4, rtol=1e-4)


def test_the_embedding_of_a_classifier_is_its_pooled_pre_logits():
    torch.manual_seed(0)
    model = finegrain.create_model("se_mobilenet_v1", num_classes=4, base_width=8).eval()
    assert embedding_mode(model) == "pooled_features"
    randomize_bn(model)
    x = torch.randn(3, 3, 32, 32)
    embedded = Predictor(model, CPU).embed(x)
    with torch.no_grad():
        expected = F.normalize(model.forward_features(x).mean(dim=(2, 3)), dim=1)
    assert torch.equal(embedded, expected)


def test_the_index_and_the_retrieval_evaluation_share_one_embedding(tmp_path):
    """embed_paths (the index), embed_loader (retrieval evaluation) and Predictor.embed give the
    same rows for the same photos: there is one definition of a model's embedding."""
    torch.manual_seed(0)
    model = finegrain.create_embedder("assemble_resnet50", embedding_size=16, base_width=8).eval()
    model.preprocessing = Preprocessing(model.preprocessing.mean, model.preprocessing.std, 32, 32, 32)
    samples = load_splits("folder_zeroshot", demo_root())["test"].samples[:5]
    indexed = embed_paths(model, [s.path for s in samples], model.preprocessing, batch_size=2, device=CPU,
                          progress=False)
    dataset = ImageDataset(samples, image_transform(model, model.preprocessing))
    evaluated, _ = embed_loader(model, DataLoader(dataset, batch_size=2), CPU)
    direct = embed_batch(model, torch.stack([dataset[i][0] for i in range(len(samples))]))
    assert indexed.ok_paths == [str(s.path) for s in samples]
    assert torch.equal(torch.from_numpy(indexed.embeddings), evaluated)
    assert torch.allclose(evaluated, direct.detach(), atol=1e-6)
    assert torch.allclose(evaluated.norm(dim=1), torch.ones(5), atol=1e-5)


def test_embed_loader_refuses_a_classifier():
    model = finegrain.create_model("se_mobilenet_v1", num_classes=4, base_width=8)
    loader = DataLoader(TensorDataset(torch.zeros(2, 3, 32, 32), torch.zeros(2)), batch_size=2)
    with pytest.raises(FinegrainError, match="no forward_embedding"):
        embed_loader(model, loader, CPU)


def test_bf16_embeddings_agree_with_fp32():
    torch.manual_seed(0)
    model = finegrain.create_embedder("assemble_resnet50", embedding_size=32, base_width=16).eval()
    randomize_bn(model)
    x = torch.randn(4, 3, 64, 64)
    fp32 = Predictor(model, CPU, FAST).embed(x)
    bf16 = Predictor(model, CPU, InferenceOptions(dtype=torch.bfloat16, channels_last=True, fold_bn=True)).embed(x)
    assert torch.nn.functional.cosine_similarity(fp32, bf16).min() > 0.99


def test_biglittle_rejects_tiny_inputs_clearly():
    model = finegrain.create_model("assemble_resnet50", base_width=8).eval()
    with pytest.raises(FinegrainError, match="at least 32x32"):
        model(torch.randn(1, 3, 24, 24))
