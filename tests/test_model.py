"""Backbone creation: timm ViTs, weights from a local file through timm's pretrained path, heads."""
import pytest
import torch

from helpers import TINY_VIT
from inflora_ray.config import ModelConfig
from inflora_ray.core.model import ContinualViT, build_model, create_backbone

KW = TINY_VIT["kwargs"]


def test_weights_file_loads_through_timm(tmp_path):
    torch.manual_seed(123)
    src = create_backbone(ModelConfig(name="vit_tiny_patch16_224", img_size=16, kwargs=KW))
    path = tmp_path / "backbone.pth"
    torch.save(src.state_dict(), path)
    torch.manual_seed(7)  # a different random init, overwritten by the file
    loaded = create_backbone(ModelConfig(name="vit_tiny_patch16_224", img_size=16, kwargs=KW,
                                         weights_file=str(path)))
    for (k, a), (k2, b) in zip(src.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_weights_file_with_wrong_shapes_fails_clearly(tmp_path):
    src = create_backbone(ModelConfig(name="vit_tiny_patch16_224", img_size=16, kwargs=KW))
    path = tmp_path / "backbone.pth"
    torch.save(src.state_dict(), path)
    with pytest.raises(RuntimeError, match="could not create 'vit_tiny_patch16_224'"):
        create_backbone(ModelConfig(name="vit_tiny_patch16_224", img_size=16, weights_file=str(path),
                                    kwargs={**KW, "embed_dim": 96}))


def test_heads_concatenate_for_class_incremental_inference():
    model = build_model(ModelConfig(name="vit_tiny_patch16_224", img_size=16, kwargs=KW), rank=4)
    model.add_head(2, torch.Generator().manual_seed(0))
    model.add_head(3, torch.Generator().manual_seed(1))
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
    assert logits.shape == (4, 5) and sum(h.out_features for h in model.heads) == 5
    torch.testing.assert_close(logits[:, 2:], model.heads[1](feats))
    assert model(x, num_heads=1).shape == (4, 2)
    # the backbone is frozen; adapters exist on every block
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert len(model.adapters) == 2


def test_linear_probe_has_no_adapters():
    model = build_model(ModelConfig(name="vit_tiny_patch16_224", img_size=16, kwargs=KW), rank=None)
    assert model.adapters == [] and isinstance(model, ContinualViT)


def test_non_vit_is_refused():
    from inflora_ray.config import ConfigError, ModelConfig as MC
    with pytest.raises(ConfigError, match="vit_"):
        MC(name="resnet18")
