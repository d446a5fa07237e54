"""Fidelity of the model zoo against reference implementations we did not write."""
import pytest
import torch
import torchvision

import finegrain
from finegrain.eval.throughput import count_macs
from finegrain.errors import FinegrainError
from finegrain.models import VARIANTS, load_model, save_model, set_drop_block_keep_prob
from finegrain.models.resnet import BigLittleStage


def randomize_bn(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5, generator=gen)
            module.bias.data.normal_(0, 0.1, generator=gen)
            module.running_mean.normal_(0, 0.1, generator=gen)
            module.running_var.uniform_(0.5, 1.5, generator=gen)


@pytest.mark.parametrize("name", ["resnet50", "resnet101", "resnet152"])
def test_torchvision_state_dict_gives_same_logits(name, tmp_path):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None).eval()
    randomize_bn(reference)
    path = tmp_path / "tv.pth"
    torch.save(reference.state_dict(), path)
    ours = finegrain.create_model(name, weights=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max() < 1e-4


def test_timm_resnet50d_state_dict_gives_same_logits(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.create_model("resnet50d", pretrained=False).eval()
    randomize_bn(reference)
    path = tmp_path / "timm.pth"
    torch.save(reference.state_dict(), path)
    ours = finegrain.create_model("resnet50d", weights=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max() < 1e-4


@pytest.mark.parametrize("name, params", [("assemble_resnet50", 41_848_489), ("assemble_resnet152", 117_006_249)])
def test_official_parameter_counts(name, params):
    with torch.device("meta"):
        model = finegrain.create_model(name, num_classes=1001)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == params


# Table 14 of the paper (TF profiler float_ops / 2), in GMACs at the paper's resolution.
TABLE_14 = [("resnet50", 224, 4.1), ("resnet50d", 224, 4.4), ("r50d_sk", 224, 6.2),
            ("r50d_sk_bl", 256, 5.4), ("assemble_resnet50", 256, 7.5), ("assemble_resnet152", 256, 20.6)]


@pytest.mark.parametrize("name, resolution, gmacs", TABLE_14)
def test_macs_within_5_percent_of_table_14(name, resolution, gmacs):
    with torch.device("meta"):
        model = finegrain.create_model(name, num_classes=1001)
    macs = count_macs(model, resolution) / 1e9
    assert abs(macs - gmacs) / gmacs < 0.05, macs


def test_biglittle_stage_shapes_at_224_and_256():
    model = finegrain.create_model("assemble_resnet50", base_width=8).eval()
    for size, expected in ((224, [28, 14, 14, 7]), (256, [32, 16, 16, 8])):
        x = model.maxpool(model.act1(model.bn1(model.conv1(torch.randn(1, 3, size, size)))))
        sides = []
        for stage in range(1, 5):
            x = getattr(model, f"layer{stage}")(x)
            sides.append(x.shape[-1])
        assert sides == expected
    assert isinstance(model.layer1, BigLittleStage)


def test_biglittle_accepts_sizes_that_are_not_multiples_of_32():
    model = finegrain.create_model("assemble_resnet50", base_width=8, num_classes=5).eval()
    for size in (32, 100, 97):
        assert model(torch.randn(1, 3, size, size)).shape == (1, 5)


def test_stride_free_stage4_doubles_final_map():
    normal = finegrain.create_model("assemble_resnet50", base_width=8).eval()
    free = finegrain.create_model("assemble_resnet50", base_width=8, stage4_stride=1).eval()
    x = torch.randn(1, 3, 224, 224)
    assert normal.forward_features(x).shape[-1] == 7
    assert free.forward_features(x).shape[-1] == 14


def test_embedder_outputs_unit_vectors():
    model = finegrain.create_embedder("r50d_sk", embedding_size=32, base_width=8).eval()
    emb = model.forward_embedding(torch.randn(3, 3, 64, 64))
    assert emb.shape == (3, 32)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)


def test_every_registered_variant_builds_and_runs():
    for name in VARIANTS:
        width = 16 if "mobilenet" in name else 8
        model = finegrain.create_model(name, num_classes=3, base_width=width).eval()
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3), name


def test_drop_block_keep_prob_reaches_stage_3_and_4_only():
    model = finegrain.create_model("assemble_resnet50", base_width=8)
    assert set_drop_block_keep_prob(model, 0.8) == 2  # one shared module per stage
    assert set_drop_block_keep_prob(finegrain.create_model("resnet50", base_width=8), 0.8) == 0


def test_save_and_load_round_trip(tmp_path):
    model = finegrain.create_model("assemble_resnet50", num_classes=7, base_width=8).eval()
    randomize_bn(model)
    path = save_model(model, tmp_path / "m.safetensors", {"note": "test"})
    loaded = load_model(path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.preprocessing == model.preprocessing
    assert loaded.metadata["note"] == "test"


def test_unknown_name_lists_valid_ones():
    with pytest.raises(FinegrainError, match="assemble_resnet50"):
        finegrain.create_model("resnet51")


def test_unknown_override_is_named():
    with pytest.raises(FinegrainError, match="base_widht"):
        finegrain.create_model("resnet50", base_widht=8)


def test_mismatched_weights_name_the_differing_keys(tmp_path):
    small = finegrain.create_model("resnet50", base_width=8)
    path = save_model(small, tmp_path / "small.safetensors")
    with pytest.raises(FinegrainError, match=r"shape conv1\.weight"):
        finegrain.create_model("resnet50", weights=str(path))
    with pytest.raises(FinegrainError, match="do not fit 'assemble_resnet50'"):
        finegrain.create_model("assemble_resnet50", weights=str(path))
