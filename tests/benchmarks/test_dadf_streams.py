"""benchmarks/dadf_streams.py: stream statistics against brute force on a 2-step checkpoint, subsets, clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_recon.models.image.dadf import DADF
from tests.benchmarks.conftest import load_script
from tests.conftest import cpu_engine, folder_datamodule

TINY = {
    "backbone": "tf_efficientnet_lite0",
    "weights": None,
    "embed_dim_per_scale": 16,
    "depth": 1,
    "num_heads": 2,
    "flow_steps": 2,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def streams() -> ModuleType:
    """``benchmarks/dadf_streams.py`` as a module."""
    return load_script("dadf_streams")


@pytest.fixture(scope="module")
def checkpoint(folder_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dual-stream DADF trained 1 reconstruction + 1 flow step at 64 px on the 80-px folder dataset."""
    root = tmp_path_factory.mktemp("dadf_streams")
    model = DADF(**TINY, reconstruction_steps=1, image_size=64, visualizer=False, evaluator=False)
    engine = cpu_engine(root, max_steps=2)
    engine.fit(model, datamodule=folder_datamodule(folder_dataset, batch_size=4))
    path = root / "dadf.ckpt"
    engine.trainer.save_checkpoint(path)
    return path


def _argv(data_root: Path, ckpt: str, results: Path, *extra: str) -> list[str]:
    argv = ["--ckpt", ckpt, "--dataset", "folder", "--data-root", str(data_root), "--image-size", "64"]
    return [*argv, "--batch-size", "3", "--results-dir", str(results), *extra]


def _images(files: list[Path], model: DADF) -> torch.Tensor:
    """The files read as anomalib reads them (RGB, [0, 1]) and put through the checkpoint's pre-processor."""
    raw = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    return model.pre_processor.transform(raw.float() / 255.0)


def _brute_force(model: DADF, images: torch.Tensor) -> list[dict]:
    """Per scale from the stage-1 loss path (patchified tokens): variance of f, both MSEs and the mutual MSE."""
    with torch.no_grad():
        out = model.model.reconstruction_outputs(images)
        features = model.model.extract(images)
    stats = []
    for s, f in enumerate(features):
        f = f.double().numpy()
        variance = float(np.mean([f[:, c].var() for c in range(f.shape[1])]))
        x, m, t = (a[s].double().numpy() for a in (out.self_tokens, out.memory_tokens, out.targets))
        stats.append(
            {
                "variance": variance,
                "mse_self": float(((x - t) ** 2).mean()),
                "mse_memory": float(((m - t) ** 2).mean()),
                "mutual_mse": float(((x - m) ** 2).mean()),
            }
        )
    return stats


# ---------------------------------------------------------------------------------------------------- fast
def test_ckpt_labels_and_paths(streams: ModuleType):
    assert streams.parse_ckpt("dual=/tmp/a/model.ckpt") == ("dual", Path("/tmp/a/model.ckpt"))
    assert streams.parse_ckpt("/tmp/a=b/model.ckpt") == ("/tmp/a=b/model.ckpt", Path("/tmp/a=b/model.ckpt"))
    with pytest.raises(SystemExit):
        streams.parse(["--ckpt", "a=/x.ckpt", "a=/y.ckpt"])


def test_subset_is_seeded_and_batched(streams: ModuleType, folder_dataset: Path, tmp_path: Path):
    def paths(seed: int, images: int) -> list[list[str]]:
        args = streams.parse([*_argv(folder_dataset, "x.ckpt", tmp_path, "--split", "test"), "--images", str(images)])
        args.seed = seed
        batches, total = streams.select_batches(args)
        assert total == 8
        return [list(b.image_path) for b in batches]

    first = paths(0, 5)
    assert [len(b) for b in first] == [3, 2]
    flat = [p for b in first for p in b]
    assert len(set(flat)) == 5 and flat == sorted(flat)
    assert paths(0, 5) == first
    assert paths(1, 5) != first
    assert sum(len(b) for b in paths(0, 50)) == 8  # more than the split: all of it


def test_self_only_rows_have_no_memory_columns_and_features_only_is_refused(streams: ModuleType):
    model = DADF(**TINY, use_memory=False, image_size=64, visualizer=False, evaluator=False).eval()
    gen = torch.Generator().manual_seed(0)
    batch = SimpleNamespace(image=torch.rand(4, 3, 64, 64, generator=gen), gt_label=torch.tensor([0, 1, 1, 0]))
    rows = streams.measure(model, [batch], "self", "test")
    subsets = [("all", 4)] * 3 + [("normal", 2)] * 3 + [("anomalous", 2)] * 3
    assert [(r["subset"], r["n_images"]) for r in rows] == subsets
    for row in rows:
        assert row["mse_memory"] is row["explained_memory"] is row["mutual_mse"] is None
        assert row["explained_self"] == pytest.approx(1 - row["mse_self"] / row["variance"])
    with pytest.raises(ValueError, match="flow_input='features'"):
        streams.check_measurable(DADF(**TINY, flow_input="features", image_size=64, visualizer=False), "feat")


# ---------------------------------------------------------------------------------------------------- trained
@pytest.mark.slow
def test_reported_statistics_equal_brute_force(
    streams: ModuleType, checkpoint: Path, folder_dataset: Path, tmp_path: Path
):
    argv = _argv(folder_dataset, f"tiny={checkpoint}", tmp_path, "--split", "train", "--images", "8", "--name", "tr")
    assert streams.main(argv) == 0
    data = json.loads((tmp_path / "dadf_streams_tr.json").read_text())
    assert data["command"].startswith("python benchmarks/dadf_streams.py --ckpt tiny=")
    assert data["n_images"] == 8 and data["checkpoints"][0]["global_step"] == 2
    model = DADF.load_from_checkpoint(checkpoint, weights_only=True, visualizer=False).eval()
    expected = _brute_force(model, _images(sorted((folder_dataset / "train" / "good").glob("*.png")), model))
    rows = data["rows"]
    assert [(r["subset"], r["scale"]) for r in rows] == [("all", 1), ("all", 2), ("all", 3)]
    for row, want in zip(rows, expected, strict=True):
        for key, value in want.items():
            assert row[key] == pytest.approx(value, rel=1e-4), (row["scale"], key)
        assert row["explained_self"] == pytest.approx(1 - row["mse_self"] / row["variance"], rel=1e-9)
        assert row["explained_memory"] == pytest.approx(1 - row["mse_memory"] / row["variance"], rel=1e-9)
    assert rows[0]["mse_self"] != pytest.approx(rows[0]["mse_memory"], rel=1e-6)  # two streams, not one twice
    assert "| tiny | all | 8 | 1 (24×16×16) |" in (tmp_path / "dadf_streams_tr.md").read_text()


@pytest.mark.slow
def test_test_split_reports_normal_and_anomalous(
    streams: ModuleType, checkpoint: Path, folder_dataset: Path, tmp_path: Path
):
    argv = _argv(folder_dataset, f"tiny={checkpoint}", tmp_path, "--split", "test", "--images", "8", "--name", "te")
    assert streams.main(argv) == 0
    rows = {(r["subset"], r["scale"]): r for r in json.loads((tmp_path / "dadf_streams_te.json").read_text())["rows"]}
    assert {subset for subset, _ in rows} == {"all", "normal", "anomalous"}
    model = DADF.load_from_checkpoint(checkpoint, weights_only=True, visualizer=False).eval()
    defects = _brute_force(model, _images(sorted((folder_dataset / "test" / "defect").glob("*.png")), model))
    for scale in (1, 2, 3):
        normal, anomalous, both = rows["normal", scale], rows["anomalous", scale], rows["all", scale]
        assert normal["n_images"] == anomalous["n_images"] == 4
        for key in ("mse_self", "mse_memory", "mutual_mse"):  # same element count per image: the mean of the two
            assert both[key] == pytest.approx((normal[key] + anomalous[key]) / 2, rel=1e-6)
            assert anomalous[key] == pytest.approx(defects[scale - 1][key], rel=1e-4)
        assert anomalous["variance"] == pytest.approx(defects[scale - 1]["variance"], rel=1e-4)


@pytest.mark.slow
def test_not_a_dadf_checkpoint_is_refused(streams: ModuleType, checkpoint: Path, folder_dataset: Path, tmp_path: Path):
    other = torch.load(checkpoint, map_location="cpu", weights_only=True)
    other["anomalib_recon"]["model"] = "GRNR"
    torch.save(other, tmp_path / "grnr.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    for name, match in (("grnr", "trained with GRNR, not DADF"), ("junk", "not a readable DADF checkpoint")):
        with pytest.raises(ValueError, match=f"--ckpt {name}: .* is not a loadable DADF checkpoint") as error:
            streams.main(_argv(folder_dataset, f"{name}={tmp_path / name}.ckpt", tmp_path))
        assert match in str(error.value)
    with pytest.raises(ValueError, match="does not exist"):
        streams.main(_argv(folder_dataset, f"gone={tmp_path / 'gone.ckpt'}", tmp_path))
    with pytest.raises(ValueError, match="--image-size 128 differs"):
        streams.main([*_argv(folder_dataset, str(checkpoint), tmp_path), "--image-size", "128"])
    assert not list(tmp_path.glob("dadf_streams_*"))  # refused before anything is written
