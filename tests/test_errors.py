"""Bad input from the user's side of the package gets one clear, early message (issue #12).

* a corrupt or foreign local weights file is named, with what a valid file is (never "weights_only=False");
* a checkpoint of another model, or of settings that change its tensors, says which model and settings it was
  trained with instead of listing hundreds of missing/unexpected keys;
* in anomalib's CLI, our constructor errors come out as one ``anomalib: error: ...`` line, exit code 2.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from anomalib_recon.components.checkpoint import CheckpointMismatchError, check_checkpoint_matches
from anomalib_recon.components.weights import WeightsFileError, check_weights_file
from anomalib_recon.models import NAFRAD, AMINet


class NotATensor:
    """A class torch's safe loader will not unpickle."""


@pytest.mark.parametrize("kind", ["garbage", "foreign_pickle", "truncated", "empty_dict", "safetensors_garbage"])
def test_bad_weights_file_is_named(tmp_path, kind):
    path = tmp_path / ("w.safetensors" if kind == "safetensors_garbage" else "w.pth")
    if kind in {"garbage", "safetensors_garbage"}:
        path.write_bytes(os.urandom(512))
    elif kind == "foreign_pickle":
        torch.save({"net": NotATensor()}, path)
    elif kind == "truncated":
        torch.save({"w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        torch.save({}, path)
    with pytest.raises(WeightsFileError) as info:
        check_weights_file(path, "tf_efficientnet_lite0")
    message = str(info.value)
    assert str(path) in message
    assert "weights_only=False" not in message and "state dict" in message


def test_bad_weights_file_fails_at_model_construction(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsFileError, match=r"broken\.pth"):
        AMINet(backbone="tf_efficientnet_lite0", weights=str(path), embed_dim=32, depth=1, num_heads=2, image_size=64)


def test_partial_weights_file_fails_at_model_construction(tmp_path):
    """A Lite0 state dict missing two thirds of its tensors used to build silently (and score as a different model)."""
    import timm

    state = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    path = tmp_path / "lite0_third.pth"
    torch.save(dict(list(state.items())[: len(state) // 3]), path)
    with pytest.raises(WeightsFileError) as info:
        NAFRAD(backbone="tf_efficientnet_lite0", layers=[1, 2], weights=str(path))
    message = str(info.value)
    assert "lite0_third.pth" in message and "tf_efficientnet_lite0" in message and "missing" in message
    assert message.count("\n") == 0


def test_valid_weights_files_pass(tmp_path):
    state = {"a": torch.ones(2), "b": torch.zeros(3)}
    torch.save(state, tmp_path / "ok.pth")
    check_weights_file(tmp_path / "ok.pth")
    torch.save({"state_dict": state}, tmp_path / "nested.pth")  # Lightning-style nesting
    check_weights_file(tmp_path / "nested.pth")
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "ok.safetensors"))
    check_weights_file(tmp_path / "ok.safetensors")


def _aminet(**kwargs) -> AMINet:
    options = {"backbone": "tf_efficientnet_lite0", "weights": None, "embed_dim": 32, "depth": 1, "num_heads": 2}
    return AMINet(**{**options, "image_size": 64, **kwargs})


def _checkpoint(model) -> dict:
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    return checkpoint


def test_checkpoint_of_other_settings_names_them():
    checkpoint = _checkpoint(_aminet(embed_dim=32))
    with pytest.raises(CheckpointMismatchError) as info:
        _aminet(embed_dim=64).on_load_checkpoint(checkpoint)
    message = str(info.value)
    assert "embed_dim=32 (this model: 64)" in message
    assert "load_from_checkpoint" in message and message.count("\n") == 0


def test_checkpoint_of_other_image_size_names_it():
    checkpoint = _checkpoint(_aminet(image_size=64))
    assert checkpoint["anomalib_recon"] == {"model": "AMINet", "input_size": [64, 64]}
    other = _aminet(image_size=128)
    try:
        other.on_load_checkpoint(checkpoint)
    except CheckpointMismatchError as error:
        assert "image_size=64 (this model: 128)" in str(error)
    else:  # the model re-targets its size on load: then the weights must load as they are
        other.load_state_dict(checkpoint["state_dict"])


def test_checkpoint_of_other_model_names_it():
    checkpoint = _checkpoint(_aminet())
    nafrad = NAFRAD(backbone="tf_efficientnet_lite0", layers=[1, 2], weights=None)
    with pytest.raises(CheckpointMismatchError, match="trained with AMINet, not NAFRAD"):
        nafrad.on_load_checkpoint(checkpoint)


def test_foreign_checkpoint_without_record_is_refused():
    model = _aminet()
    checkpoint = {"state_dict": {"model.memory_bank": torch.zeros(4, 4)}, "hyper_parameters": {"n_features": 100}}
    with pytest.raises(CheckpointMismatchError, match="not written by AMINet"):
        check_checkpoint_matches(model, checkpoint)


def test_same_settings_load_silently():
    model = _aminet()
    check_checkpoint_matches(_aminet(lr=1e-3), _checkpoint(model))  # another lr: every tensor still fits


def test_unreadable_checkpoint_file_is_named(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(pickle.dumps({"x": NotATensor()}))
    with pytest.raises(CheckpointMismatchError) as info:
        AMINet.load_from_checkpoint(path)
    assert "model.ckpt" in str(info.value) and "weights_only=False" not in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backbone", "expected"),
    [("nosuchnet_xyz", "Unknown timm backbone 'nosuchnet_xyz'"), ("resnet18", "OfflineWeightsError")],
)
def test_cli_prints_our_constructor_error_as_one_line(tmp_path: Path, backbone: str, expected: str):
    exe = shutil.which("anomalib")
    if exe is None:
        pytest.skip("the anomalib console script is not on PATH")
    args = [exe, "fit", "--model", "AMINet", "--model.backbone", backbone, "--data", "MVTecAD"]
    args += ["--data.root", str(tmp_path / "absent")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=dict(os.environ))
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("anomalib: error:")]
    assert len(errors) == 1 and expected in errors[0]
    assert "Union subtypes" not in done.stderr and "Traceback" not in done.stderr


def test_checkpoint_trained_with_another_evaluator_loads(tmp_path):
    """The benchmark harness trains with AUPRO in its evaluator (a ``fpr_limit`` buffer); the checkpoint must still
    load into a model built with the default evaluator, with every model tensor restored."""
    from anomalib.metrics import AUPRO, AUROC, Evaluator

    evaluator = Evaluator(
        test_metrics=[AUROC(fields=["pred_score", "gt_label"]), AUPRO(fields=["anomaly_map", "gt_mask"])]
    )
    torch.manual_seed(0)
    trained = _aminet(evaluator=evaluator)
    checkpoint = _checkpoint(trained)
    assert any(k.startswith("evaluator.") for k in checkpoint["state_dict"])
    path = tmp_path / "model.ckpt"
    torch.save({**checkpoint, "pytorch-lightning_version": "2.5.0"}, path)
    torch.manual_seed(1)
    loaded = AMINet.load_from_checkpoint(path, evaluator=True)
    assert not any(k.startswith("evaluator.") for k in loaded.state_dict())
    for key, value in trained.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value)
    # a checkpoint with a real tensor missing is still refused
    del checkpoint["state_dict"][next(k for k in checkpoint["state_dict"] if k.startswith("model."))]
    with pytest.raises(CheckpointMismatchError, match="1 missing"):
        _aminet().on_load_checkpoint(checkpoint)


def test_checkpoint_file_check_names_missing_garbage_and_weights_files(tmp_path):
    from anomalib_recon.components.checkpoint import check_checkpoint_file

    with pytest.raises(CheckpointMismatchError, match="does not exist"):
        check_checkpoint_file(tmp_path / "absent.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x80\x04not a checkpoint at all" * 10)
    with pytest.raises(CheckpointMismatchError, match=r"garbage\.ckpt' is not a readable checkpoint"):
        check_checkpoint_file(garbage)
    weights = tmp_path / "backbone.pth"
    torch.save({"conv.weight": torch.zeros(1)}, weights)
    with pytest.raises(CheckpointMismatchError, match=r"--model\.weights"):
        check_checkpoint_file(weights)
    valid = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, valid)
    check_checkpoint_file(valid)


def _folder_args(root: Path) -> list[str]:
    args = ["--data", "anomalib.data.Folder", "--data.name", "stripes", "--data.root", str(root)]
    args += ["--data.normal_dir", "train/good", "--data.abnormal_dir", "test/defect"]
    return [*args, "--data.normal_test_dir", "test/good", "--data.num_workers", "0"]


def _anomalib_error(args: list[str], cwd: Path) -> str:
    """Run ``anomalib`` and return its one ``anomalib: error:`` line (exit code 2, no traceback)."""
    exe = shutil.which("anomalib")
    if exe is None:
        pytest.skip("the anomalib console script is not on PATH")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("anomalib: error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_cli_test_refuses_untrained_models_garbage_and_mismatched_checkpoints(tmp_path: Path):
    """``anomalib test`` without ``--ckpt_path`` does not score a random model; a garbage ``--ckpt_path`` is named; a
    checkpoint trained with other ``--model.*`` settings names them, even where the default backbone's weights are
    not available offline (the model is built without them: the checkpoint brings every tensor)."""
    from tests.conftest import cpu_engine, folder_datamodule, write_textured_category

    root = write_textured_category(tmp_path / "stripes")
    small = ["--model", "AMINet", "--model.backbone", "tf_efficientnet_lite0", "--model.embed_dim", "32"]
    small += ["--model.depth", "1", "--model.num_heads", "2", "--model.image_size", "64"]
    error = _anomalib_error(["test", *small, *_folder_args(root)], tmp_path)
    assert "UntrainedModelError" in error and "--ckpt_path" in error

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"PK\x03\x04 truncated zip" * 50)
    error = _anomalib_error(["test", *small, *_folder_args(root), "--ckpt_path", str(garbage)], tmp_path)
    assert "CheckpointMismatchError" in error and "garbage.ckpt" in error and "not a readable checkpoint" in error

    model = _aminet(weights="imagenet")
    engine = cpu_engine(tmp_path / "run", max_steps=1)
    engine.fit(model, datamodule=folder_datamodule(root))
    ckpt = tmp_path / "lite0.ckpt"
    engine.trainer.save_checkpoint(ckpt)
    # default backbone (WideResNet-50, no offline weights) and default widths: the checkpoint's settings are named
    args = ["test", "--model", "AMINet", "--model.image_size", "64", *_folder_args(root), "--ckpt_path", str(ckpt)]
    error = _anomalib_error(args, tmp_path)
    assert "CheckpointMismatchError" in error and "OfflineWeightsError" not in error
    assert "backbone='tf_efficientnet_lite0'" in error and "embed_dim=32" in error
