"""The rails every model stands on (components/module.py), on a toy model through anomalib's Engine: the checks
run where they must (before the pre-processor, before the post-processor/evaluator), and they run in a real fit,
test and predict, not only when called by hand."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from anomalib import LearningType
from anomalib.data import Batch, InferenceBatch
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from torch import nn
from torch.utils.data import DataLoader

from anomalib_recon.components.guards import InputImageError, NonFiniteError, UntrainedModelError
from anomalib_recon.components.module import ModelGuard, ReconModuleMixin
from tests.conftest import cpu_engine, folder_datamodule

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _ToyModel(nn.Module):
    """Map = weight · channel mean; score = max of the map."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, images: torch.Tensor) -> Any:
        amap = images.mean(dim=1, keepdim=True) * self.weight
        if self.training:
            return amap
        return InferenceBatch(pred_score=amap.flatten(1).amax(dim=1), anomaly_map=amap)


class Toy(ReconModuleMixin, AnomalibModule):
    """The smallest model on the rails; ``loss_scale`` makes the loss NaN/inf on purpose."""

    def __init__(self, zero_shot: bool = False, loss_scale: float = 1.0) -> None:
        object.__setattr__(self, "zero_shot", zero_shot)  # anomalib's constructor reads learning_type
        super().__init__(visualizer=False)
        self.model = _ToyModel()
        self.loss_scale = loss_scale
        self.lr = 0.1
        self.validated_at: list[int] = []

    @property
    def learning_type(self) -> LearningType:
        return LearningType.ZERO_SHOT if self.zero_shot else LearningType.ONE_CLASS

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        return {"num_sanity_val_steps": 0}

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        return PostProcessor()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=self.lr)

    def training_step(self, batch: Batch, *args, **kwargs) -> dict:
        del args, kwargs
        return {"loss": (self.model(batch.image) - 0.5).pow(2).mean() * self.loss_scale}

    def validation_step(self, batch: Batch, *args, **kwargs) -> Any:
        del args, kwargs
        if self.trainer.state.fn == "fit":
            self.validated_at.append(self.trainer.global_step)
        return batch.update(**self.model(batch.image)._asdict())


@pytest.fixture
def data(tiny_category: Path) -> object:
    return folder_datamodule(tiny_category)


def test_the_guard_runs_first_among_the_model_callbacks():
    callbacks = Toy().configure_callbacks()
    assert isinstance(callbacks[0], ModelGuard)
    assert [type(c).__name__ for c in callbacks[2:]] == ["PreProcessor", "PostProcessor", "Evaluator"]


def test_max_steps_mid_epoch_ends_with_a_validation_of_the_final_weights(data, tmp_path):
    model = Toy()
    engine = cpu_engine(tmp_path, max_steps=3)  # 8 images in batches of 4: step 3 is in the middle of epoch 2
    engine.fit(model, datamodule=data)
    assert engine.trainer.global_step == 3
    assert model.validated_at[-1] == 3, model.validated_at


def test_a_nan_loss_stops_training_naming_the_cause(data, tmp_path):
    with pytest.raises(NonFiniteError, match=r"training loss is nan at step 0.*learning rate.*lr=0\.1"):
        cpu_engine(tmp_path, max_steps=2).fit(Toy(loss_scale=float("nan")), datamodule=data)
    model = Toy()
    with torch.no_grad():
        model.model.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match=r"weights \['model\.weight'\] are already non-finite"):
        cpu_engine(tmp_path, max_steps=2).fit(model, datamodule=data)


def test_untrained_models_are_refused_and_zero_shot_models_are_not(data, tmp_path):
    with pytest.raises(UntrainedModelError, match="ckpt_path"):
        cpu_engine(tmp_path).test(Toy(), datamodule=data)
    with pytest.raises(UntrainedModelError, match="predict"):
        cpu_engine(tmp_path).predict(Toy(), datamodule=data)
    (metrics,) = cpu_engine(tmp_path).test(Toy(zero_shot=True), datamodule=data)
    assert 0.0 <= metrics["image_AUROC"] <= 1.0


def test_trained_or_loaded_models_test_and_non_finite_scores_name_the_checkpoint(data, tmp_path):
    model = Toy()
    engine = cpu_engine(tmp_path, max_steps=1)
    engine.fit(model, datamodule=data)
    engine.test(model, datamodule=data)  # trained in this process: allowed
    ckpt = tmp_path / "toy.ckpt"
    engine.trainer.save_checkpoint(ckpt)
    cpu_engine(tmp_path).test(Toy(), datamodule=data, ckpt_path=ckpt)  # loaded from a checkpoint: allowed
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"]["model.weight"] = torch.tensor([float("nan")])
    torch.save(state, tmp_path / "nan.ckpt")
    with pytest.raises(NonFiniteError, match=r"checkpoint '.*nan\.ckpt' holds non-finite weights \(model\.weight\)"):
        cpu_engine(tmp_path).test(Toy(), datamodule=data, ckpt_path=tmp_path / "nan.ckpt")


def test_raw_images_are_checked_before_the_pre_processor(tmp_path, tiny_category):
    """0-255 images would pass the pre-processor's Normalize silently; the guard stops them first."""
    from anomalib.data import PredictDataset

    dataset = PredictDataset(tiny_category / "test" / "good", image_size=(64, 64))
    scaled = [dataset[i] for i in range(len(dataset))]
    for item in scaled:
        item.image.mul_(255)
    loader = DataLoader(scaled, batch_size=2, collate_fn=dataset.collate_fn)
    model = Toy()
    model._recon_trained = True  # as after a fit: predict runs without a validation first
    with pytest.raises(InputImageError, match="divide by 255"):
        cpu_engine(tmp_path).predict(model, dataloaders=loader)


def test_direct_calls_check_inputs_and_outputs():
    model = Toy().eval()
    out = model(torch.rand(2, 3, 16, 16))
    assert out.pred_score.shape == (2,)
    with pytest.raises(InputImageError, match="uint8"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with torch.no_grad():
        model.model.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"Non-finite weights: model\.weight"):
        model(torch.rand(1, 3, 16, 16))


@pytest.mark.parametrize("size", [(0, 0), (-5, 64), (64,)])
def test_export_sizes_are_checked_before_exporting(tmp_path, size):
    with pytest.raises(ValueError, match="input_size must be a positive int or"):
        Toy().to_onnx(tmp_path, input_size=size)
    assert not list(tmp_path.iterdir())


def test_model_input_size_is_the_resize_else_image_size_else_the_default(monkeypatch, caplog):
    from anomalib.pre_processing import PreProcessor

    model = Toy()  # anomalib's default pre-processor: Resize(256)
    assert model.model_input_size(64) == (256, 256)
    model.pre_processor = PreProcessor()  # no Resize
    assert model.model_input_size(64) == (64, 64)
    assert model.model_input_size((48, 32)) == (48, 32)
    assert "no Resize" not in caplog.text  # the user said the size
    monkeypatch.setattr(Toy, "default_image_size", (96, 80))
    with caplog.at_level(logging.WARNING, logger="anomalib_recon.components.module"):
        assert model.model_input_size(None) == (96, 80)
    assert "Toy: no Resize in the pre-processor and no image_size; building for (96, 80) inputs." in caplog.text
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        model.model_input_size(0)


def test_export_records_no_gradients(tmp_path, monkeypatch):
    """anomalib's probe forward and the export trace run without autograd (OpenVINO's export goes through
    ``to_onnx`` too): with it, a memory-bank model kept every distance block alive and SCLVI's export at the
    paper's bank ran out of memory."""
    model = Toy()
    model._recon_trained = True
    grad_enabled: list[bool] = []
    forward = _ToyModel.forward

    def spy(self, images):
        grad_enabled.append(torch.is_grad_enabled())
        return forward(self, images)

    monkeypatch.setattr(_ToyModel, "forward", spy)
    assert torch.is_grad_enabled()
    path = model.to_onnx(tmp_path, input_size=(16, 16))
    assert path.exists()
    assert grad_enabled and not any(grad_enabled)  # the probe and the trace
    assert torch.is_grad_enabled()  # and the caller's mode is restored


def _fit_warnings(model, data, tmp_path, caplog) -> list[str]:
    """Messages of the warnings a 2-step fit raises (filters as the caller had them)."""
    import warnings

    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, "anomalib_recon"):
        warnings.simplefilter("always")
        cpu_engine(tmp_path, max_steps=2).fit(model, datamodule=data)
    assert warnings.filters == before  # nothing of ours stays installed
    return [str(w.message) for w in caught]


def test_a_frozen_part_is_named_instead_of_lightnings_eval_mode_warning(data, tmp_path, caplog):
    model = Toy()
    model.model.frozen = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval().requires_grad_(False)
    messages = _fit_warnings(model, data, tmp_path, caplog)
    assert not [m for m in messages if "in eval mode" in m]
    assert "Toy: frozen, kept in eval mode while training: model.frozen." in caplog.text


@pytest.mark.parametrize("part", ["trainable", "dropout"])
def test_an_eval_mode_part_that_trains_keeps_the_warning(data, tmp_path, caplog, part):
    """A trainable layer, or one without parameters (a Dropout), left in eval mode is likely a mistake."""
    model = Toy()
    model.model.frozen = nn.Sequential(nn.Linear(2, 2)).eval().requires_grad_(False)
    model.model.other = (nn.Linear(2, 2) if part == "trainable" else nn.Dropout(0.5)).eval()
    messages = _fit_warnings(model, data, tmp_path, caplog)
    assert [
        m for m in messages if "3 module(s) in eval mode at the start of training" in m
    ]  # frozen, its Linear, other
    assert "frozen, kept in eval mode" not in caplog.text


def test_a_skipped_final_validation_is_warned_about(data, tmp_path, caplog):
    model = Toy()
    engine = cpu_engine(tmp_path, max_steps=6, check_val_every_n_epoch=2)  # last step ends epoch 3: no validation
    with caplog.at_level(logging.WARNING, logger="anomalib_recon.components.module"):
        engine.fit(model, datamodule=data)
    assert model.validated_at == [4]
    assert "last validation ran at step 4, training ended at step 6" in caplog.text
