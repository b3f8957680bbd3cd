"""SCL-VI: pair table, jigsaw/SVDD sampling, NormalizedLinear, affinity kNN, maps, learning, export, errors (tiny)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_recon.models.image.scl_vi import SCLVI
from anomalib_recon.models.image.scl_vi.torch_model import (
    CLASS_OFFSETS,
    NormalizedLinear,
    affinity_score,
    crop,
    distribute_scores,
    jigsaw_grid,
    knn_distances,
    pair_table,
    svdd_positions,
)
from tests.conftest import cpu_engine, folder_datamodule, write_textured_category

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# 64-px inputs: K=64 covers the image (a 1x1 grid), K=32 on a 3x3 grid at stride 16; a narrow encoder (D=16).
TINY = {"image_size": 64, "feature_dim": 16, "width": 0.125, "strides": {64: 4, 32: 16}, "pair_batch_size": 8}


def tiny(**kwargs) -> SCLVI:
    return SCLVI(**{**TINY, **kwargs}, visualizer=False)


def fitted(model: SCLVI, train: torch.Tensor) -> SCLVI:
    """Mean image and memory banks from ``train`` without an Engine (what fit does around training)."""
    model.model.mean_image.copy_(train.mean(0, keepdim=True))
    model.model.mean_ready.fill_(True)
    model.model.eval()
    model.model.build_memory_bank(train.split(4))
    return model


# ---------------------------------------------------------------------------------------------------- pair table
def test_pair_table_has_twelve_balanced_classes_with_the_class_offsets():
    table = pair_table()
    assert table.shape == (144, 3)
    assert torch.equal(torch.bincount(table[:, 2], minlength=12), torch.full((12,), 12))
    for i, j, label in table.tolist():
        assert i < j
        assert (j // 3 - i // 3, j % 3 - i % 3) == CLASS_OFFSETS[label]
    assert len(set(CLASS_OFFSETS)) == 12
    pairs = {(i, j) for i, j, _ in table.tolist()}
    assert len(pairs) == 36  # every pair of the nine cells, each in its class
    for label in range(12):
        rows = table[table[:, 2] == label, :2].tolist()
        counts = {tuple(r): rows.count(r) for r in rows}
        assert len(set(counts.values())) == 1  # each pair of a class equally often


# ---------------------------------------------------------------------------------------------------- sampling
def _unclipped(cells: torch.Tensor, size: int, patch: int) -> torch.Tensor:
    return ((cells > 0) & (cells < size - patch)).flatten(1).all(dim=1)


@pytest.mark.parametrize("patch", [64, 32])
def test_jigsaw_pairs_relative_positions_match_labels(patch):
    gen = torch.Generator().manual_seed(0)
    model = tiny(image_size=512, strides={64: 64, 32: 32}, pair_batch_size=3000).model
    images = torch.rand(2, 3, 512, 512)
    index, c1, c2, label, cells = model.sample_pairs(images, patch, gen)
    keep = _unclipped(cells, 512, patch)
    assert keep.float().mean() > 0.5
    offsets = torch.tensor(CLASS_OFFSETS)[label[keep]]  # (n, 2) rows/cols of the 3x3 grid
    delta = (c2 - c1)[keep]
    step, jitter = 3 * patch // 4, patch // 32
    zero, one, two = offsets == 0, offsets.abs() == 1, offsets.abs() == 2
    assert bool((delta[zero].abs() <= patch // 4 - 1 + jitter).all())
    assert bool((delta * offsets.sign())[one].ge(step - jitter).all())
    assert bool((delta * offsets.sign())[one].le(patch - 1 + jitter).all())
    assert bool((delta * offsets.sign())[two].ge(2 * step).all())
    assert bool((delta * offsets.sign())[two].le(2 * (patch - 1)).all())
    assert set(label[keep].tolist()) == set(range(12))
    # the crops are the images at those corners
    for m in (0, 1, 7):
        y, x = c1[m].tolist()
        torch.testing.assert_close(crop(images, index, c1, patch)[m], images[index[m], :, y : y + patch, x : x + patch])


def test_centre_jitter_fixed_x_independent_of_y():
    patch, size = 64, 512
    cells = jigsaw_grid(4000, (size, size), patch, torch.device("cpu"), torch.Generator().manual_seed(1))
    keep = _unclipped(cells, size, patch)
    cells = cells[keep]
    anchor = torch.stack([cells[:, 3, 0], cells[:, 1, 1]], dim=1)  # cell 3 keeps the anchor's y, cell 1 its x
    jitter = cells[:, 4] - anchor
    assert bool((jitter.abs() <= patch // 32).all())  # the released code puts anchor_y + jitter_y in x
    assert not bool((jitter == 0).all(dim=1).any())
    combos = {tuple(j) for j in jitter.tolist()}
    assert len(combos) == 24  # every non-zero (jy, jx) in [-2, 2]^2, so x and y are drawn independently
    assert abs(float(torch.corrcoef(jitter.T.float())[0, 1])) < 0.1


def test_svdd_pairs_are_nonzero_small_jitters():
    p1, p2 = svdd_positions(2000, (256, 256), 64, torch.device("cpu"), torch.Generator().manual_seed(2))
    assert bool(((p1 >= 0) & (p1 <= 192)).all())
    assert bool(((p2 >= 0) & (p2 <= 192)).all())
    inside = ((p1 >= 2) & (p1 <= 190)).all(dim=1)
    diff = (p2 - p1)[inside]
    assert bool((diff.abs() <= 2).all())
    assert not bool((diff == 0).all(dim=1).any())


# ---------------------------------------------------------------------------------------------------- networks
def test_normalized_linear_trains_only_its_bias():
    torch.manual_seed(0)
    layer = NormalizedLinear(8, 12)
    x = torch.randn(5, 8)
    weight = layer.weight.detach().clone()
    bias = layer.bias.detach().clone()
    expected = x @ (weight / weight.norm(dim=0, keepdim=True)).T + bias
    torch.testing.assert_close(layer(x), expected)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    layer(x).pow(2).sum().backward()
    assert layer.weight.grad is None
    optimizer.step()
    assert torch.equal(layer.weight, weight)
    assert (layer.bias - bias).abs().min() > 1e-3


def test_encoders_output_shapes_and_classifier_logits():
    net = tiny(feature_dim=24).model
    x64, x32 = torch.randn(3, 3, 64, 64), torch.randn(3, 3, 32, 32)
    assert net.enc(x64).shape == (3, 24, 1, 1)
    assert net.enc.enc(x32).shape == (3, 24, 1, 1)
    h = net.enc(x64)
    assert net.classifiers["64"](h, h.flip(0)).shape == (3, 12)
    assert bool((net.enc(x64).abs() <= 1).all())  # tanh


# ---------------------------------------------------------------------------------------------------- scoring
def _affinity_loop(distances: np.ndarray) -> np.ndarray:
    """The spec's formula, one location at a time."""
    out = np.empty(len(distances))
    for n, row in enumerate(distances):
        total = row.sum() or 1.0
        alpha = [a if a != 0 else 1.0 for a in row / total]
        beta = [15.0 if 1 / a > 20 else 1 / a for a in alpha]
        weights = np.exp(beta) / np.exp(beta).sum()
        out[n] = float((weights * row).sum())
    return out


def test_affinity_score_matches_formula_with_alpha_and_beta_rules():
    rng = np.random.default_rng(0)
    distances = np.sort(rng.uniform(0.1, 2.0, (50, 5)), axis=1)
    distances[0] = [0.0, 0.5, 1.0, 1.0, 2.0]  # alpha = 0 -> 1
    distances[1] = 0.0  # zero sum
    distances[2] = [0.01, 1.0, 1.0, 1.0, 1.0]  # beta = 1/alpha = 401 > 20 -> 15
    distances[3] = [0.3, 0.3, 0.3, 0.3, 0.3]
    got = affinity_score(torch.tensor(distances, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, _affinity_loop(distances), rtol=1e-10)
    assert got[1] == 0.0
    assert got[3] == pytest.approx(0.3)
    uncapped = np.exp([401.0, 1.0404, 1.0404, 1.0404, 1.0404])
    assert got[2] != pytest.approx(float((uncapped / uncapped.sum() * distances[2]).sum()), rel=1e-3)
    single = torch.tensor([[0.7], [0.0], [3.0]])
    torch.testing.assert_close(affinity_score(single), single[:, 0])  # k = 1: the nearest distance


def test_knn_chunked_equals_unchunked_and_brute_force():
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(3000, 16, generator=gen)
    queries = torch.cat([torch.randn(2500, 16, generator=gen), bank[:5]])  # some exact matches (distance 0)
    brute = torch.cdist(queries.double(), bank.double()).sort(dim=1).values[:, :5].float()
    full = knn_distances(queries, bank, 5, chunk_size=None)
    chunked = knn_distances(queries, bank, 5, chunk_size=700)
    torch.testing.assert_close(full, brute, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-6)
    assert float(full[-5:, 0].abs().max()) == 0.0
    assert knn_distances(queries[:3], bank[:2], 5).shape == (3, 2)  # k capped at the bank size


def test_distribute_scores_conserves_constants_and_matches_loop():
    gen = torch.Generator().manual_seed(0)
    constant = distribute_scores(torch.full((2, 13, 13), 0.37), 64, (16, 16), (256, 256))
    torch.testing.assert_close(constant, torch.full((2, 1, 256, 256), 0.37))
    scores = torch.rand(2, 5, 4, generator=gen, dtype=torch.float64)
    patch, stride, size = 8, (3, 4), (20, 20)
    total = torch.zeros(2, *size, dtype=torch.float64)
    count = torch.zeros(size, dtype=torch.float64)
    for i in range(5):
        for j in range(4):
            total[:, i * 3 : i * 3 + patch, j * 4 : j * 4 + patch] += scores[:, i, j, None, None]
            count[i * 3 : i * 3 + patch, j * 4 : j * 4 + patch] += 1
    expected = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
    torch.testing.assert_close(distribute_scores(scores, patch, stride, size)[:, 0], expected)


def test_maps_are_affinity_knn_of_the_grid_and_product_fused():
    torch.manual_seed(0)
    model = fitted(tiny(k=3), torch.rand(6, 3, 64, 64))
    net = model.model.eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = net(images)
        x = images - net.mean_image
        maps = {}
        for patch, stride in ((64, 4), (32, 16)):
            windows = [
                x[:, :, i : i + patch, j : j + patch]
                for i in range(0, 65 - patch, stride)
                for j in range(0, 65 - patch, stride)
            ]
            emb = torch.stack([net.encoder(patch)(w).flatten(1) for w in windows], dim=1)  # (B, L, D)
            d = torch.cdist(emb, net.memory_bank(patch)[None]).sort(dim=-1).values[..., :3]
            side = int(math.sqrt(emb.shape[1]))
            maps[patch] = distribute_scores(affinity_score(d).view(2, side, side), patch, (stride, stride), (64, 64))
    assert net.memory_bank(64).shape == (6, 16)
    assert net.memory_bank(32).shape == (6 * 9, 16)
    torch.testing.assert_close(out.anomaly_map, maps[64] * maps[32], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.pred_score, out.anomaly_map.flatten(1).amax(1))
    one = fitted(tiny(k=3, scales=(32,)), torch.rand(6, 3, 64, 64))
    with torch.no_grad():
        assert one.model.eval()(images).anomaly_map.shape == (2, 1, 64, 64)


def test_training_image_scores_zero_with_k1():
    """A training image is in the bank: every window's nearest distance is 0 (k = 1, plain Patch SVDD)."""
    torch.manual_seed(0)
    train = torch.rand(4, 3, 64, 64)
    model = fitted(tiny(k=1), train)
    with torch.no_grad():
        out = model.model.eval()(train[:2])
        other = model.model(torch.rand(2, 3, 64, 64))
    assert float(out.anomaly_map.abs().max()) < 1e-5
    assert bool((other.pred_score > 1e-3).all())


# ---------------------------------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def category(tmp_path_factory) -> Path:
    return write_textured_category(tmp_path_factory.mktemp("scl_vi") / "stripes", n_train=6)


def _load(folder: Path) -> torch.Tensor:
    """The PNGs of a folder as a float batch in [0, 1]."""
    arrays = [np.array(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def _train_images(root: Path) -> torch.Tensor:
    return _load(root / "train" / "good")


def test_mean_image_is_the_mean_training_image_and_banks_follow_training(category, tmp_path):
    model = tiny(evaluator=False, lr=1e-3)
    initial = {k: v.clone() for k, v in model.model.enc.state_dict().items()}
    initial = {f"enc.{k}": v for k, v in initial.items()}
    engine = cpu_engine(tmp_path / "run", max_steps=2)
    engine.fit(model, datamodule=folder_datamodule(category, batch_size=4))
    expected = _train_images(category).mean(dim=0, keepdim=True)
    torch.testing.assert_close(model.model.mean_image, expected, rtol=0, atol=1e-6)
    assert bool(model.model.mean_ready)
    assert int(model.model.trained_steps) == int(model.model.bank_steps) == 2
    # the banks are built after the last step, from the final weights and the whole training set
    bank32 = model.model.memory_bank(32).clone()
    assert bank32.shape == (6 * 9, 16)
    assert model.bank_stats["bank_size_32"] == 54
    model.model.eval()
    model.model.build_memory_bank((_train_images(category),))  # the loader shuffles: compare as sets
    # (equal up to float noise that the D/8-channel GroupNorm of the last layer amplifies with another batch size)
    nearest = torch.cdist(bank32, model.model.memory_bank(32)).min(dim=1).values
    assert float(nearest.max()) < 1e-2
    assert float(nearest.median()) < 1e-5
    model.model.load_state_dict(initial, strict=False)  # the untrained encoder gives a different bank
    model.model.build_memory_bank((_train_images(category),))
    assert float(torch.cdist(bank32, model.model.memory_bank(32)).min(dim=1).values.median()) > 1e-2


@pytest.mark.slow
def test_training_steps_lower_the_loss(category):
    torch.manual_seed(0)
    model = tiny(image_size=128, strides=None, pair_batch_size=32, lr=1e-3)
    images = torch.nn.functional.interpolate(_train_images(category), size=128, mode="bilinear")
    model.model.mean_image.copy_(images.mean(0, keepdim=True))
    optimizer = model.configure_optimizers()
    model.model.train()

    def loss() -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(123)  # the same pairs and noise every time
        return model.loss(model.model.training_outputs(model.model.standardize(images), gen))

    before = {k: float(v.detach()) for k, v in loss().items()}
    for _ in range(10):
        optimizer.zero_grad()
        loss()["loss"].backward()
        optimizer.step()
    after = {k: float(v.detach()) for k, v in loss().items()}
    assert after["loss"] < 0.95 * before["loss"]
    assert after["svdd_32"] < 0.5 * before["svdd_32"]
    assert after["svdd_64"] <= before["svdd_64"]


@pytest.mark.slow
def test_jigsaw_task_is_learnable_when_positions_are_visible():
    """On an image whose colour encodes position, the classifier learns the pair labels: the labels match the crops."""
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 128), torch.linspace(0, 1, 128), indexing="ij")
    images = torch.stack([yy, xx, torch.full_like(xx, 0.5)])[None].repeat(4, 1, 1, 1)
    model = tiny(image_size=128, scales=(32,), strides={32: 16}, svdd_weight=0.0, pair_batch_size=32, lr=1e-3)
    model.model.mean_image.fill_(0.5)
    optimizer = model.configure_optimizers()
    model.model.train()
    losses = []
    for _ in range(40):
        out = model.loss(model.model(images))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["jigsaw_32"]))
    assert sum(losses[-5:]) / 5 < math.log(12) - 0.5  # chance level is ln 12 = 2.48


@pytest.mark.slow
def test_trained_model_scores_defects_above_normals(tmp_path):
    root = write_textured_category(tmp_path / "stripes", n_train=8, n_good=4, n_defect=4, defect=14)
    torch.manual_seed(0)
    model = tiny(scales=(32,), strides={32: 8}, pair_batch_size=16, lr=1e-3, evaluator=False)
    engine = cpu_engine(tmp_path / "run", max_steps=5)
    datamodule = folder_datamodule(root, batch_size=4)
    engine.fit(model, datamodule=datamodule)
    model.eval()
    scores = {}
    for split in ("good", "defect"):
        images = _load(root / "test" / split)
        with torch.no_grad():
            scores[split] = model.model(images).pred_score
    assert float(scores["defect"].min()) > float(scores["good"].max())


@pytest.mark.slow
def test_safe_checkpoint_round_trip_keeps_mean_image_and_banks(category, tmp_path):
    model = tiny(evaluator=False)
    engine = cpu_engine(tmp_path / "run", max_steps=2)
    engine.fit(model, datamodule=folder_datamodule(category, batch_size=4))
    ckpt = tmp_path / "scl_vi.ckpt"
    engine.trainer.save_checkpoint(ckpt)
    loaded = SCLVI.load_from_checkpoint(ckpt, weights_only=True, visualizer=False, evaluator=False)
    assert loaded.model.memory_bank(32).shape == model.model.memory_bank(32).shape == (54, 16)
    torch.testing.assert_close(loaded.model.mean_image, model.model.mean_image)
    assert loaded.model.strides == {64: (4, 4), 32: (16, 16)}
    images = torch.rand(2, 3, 64, 64)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        a, b = model.model(images), loaded.model(images)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map)
    torch.testing.assert_close(a.pred_score, b.pred_score)
    # a weight snapshot older than its banks (as learning_curve.py loads) gets fresh banks when tested
    loaded.model.trained_steps += 1
    loaded.model.memory_bank_32.zero_()
    engine.test(loaded, datamodule=folder_datamodule(category, batch_size=4), verbose=False)
    assert int(loaded.model.bank_steps) == int(loaded.model.trained_steps) == 3
    assert float(loaded.model.memory_bank_32.abs().max()) > 0


@pytest.mark.slow
@pytest.mark.export
def test_onnx_and_openvino_parity_with_banks_in_graph(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    pytest.importorskip("openvino")
    from anomalib_recon.deploy import compile_openvino

    torch.manual_seed(0)
    model = fitted(tiny(evaluator=False), torch.rand(6, 3, 64, 64)).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
    path = model.to_onnx(tmp_path, input_size=(64, 64), opset_version=18)
    graph = onnx.load(str(path)).graph
    assert {"TopK", "ConvTranspose", "Softmax", "MatMul"} <= {node.op_type for node in graph.node}
    stored = {tuple(t.dims) for t in graph.initializer}
    assert (6 * 9, 16) in stored  # the K=32 memory bank
    assert (1, 3, 64, 64) in stored  # the mean image

    session = ort.InferenceSession(str(path))
    names = [o.name for o in session.get_outputs()]
    onnx_out = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()}), strict=True))
    compiled = compile_openvino(path)
    result = compiled(images.numpy())
    ov_out = {o.get_any_name(): result[o] for o in compiled.outputs}
    for outputs in (onnx_out, ov_out):
        for name in ("pred_score", "anomaly_map"):
            np.testing.assert_allclose(outputs[name], getattr(expected, name).numpy(), rtol=1e-4, atol=1e-4)
        assert outputs["anomaly_map"].shape == (2, 1, 64, 64)


# ---------------------------------------------------------------------------------------------------- API & errors
def test_lightning_contract():
    from anomalib import LearningType

    model = tiny()
    assert model.learning_type == LearningType.ONE_CLASS
    assert model.trainer_arguments == {"num_sanity_val_steps": 0}
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["lr"] == 1e-4
    transforms = model.pre_processor.transform.transforms
    assert len(transforms) == 1  # Resize only: the mean image replaces ImageNet normalisation
    assert tuple(model.input_size) == (64, 64)
    assert tuple(model.model.mean_image.shape) == (1, 3, 64, 64)
    assert SCLVI(visualizer=False).model.strides == {64: (16, 16), 32: (4, 4)}  # the paper at 256 px
    assert SCLVI(image_size=128, visualizer=False).model.strides == {64: (8, 8), 32: (2, 2)}
    for value in model.hparams.values():
        assert value is None or isinstance(value, (str, int, float, bool, list, tuple, dict))


def test_jigsaw_only_skips_svdd_pairs():
    model = tiny(svdd_weight=0.0)
    out = model.model.train()(torch.rand(2, 3, 64, 64))
    assert out.svdd == {}
    losses = model.loss(out)
    torch.testing.assert_close(losses["loss"], losses["jigsaw_64"] + losses["jigsaw_32"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 96, "strides": None}, "image_size 96x96 is not supported"),
        ({"image_size": 48}, "smaller than the 64-px patches"),
        ({"strides": {64: 4, 32: 5}}, "does not tile"),
        ({"scales": (48,)}, "scales must be"),
        ({"feature_dim": 12}, "feature_dim"),
        ({"k": 0}, "k >= 1"),
        ({"coreset_ratio": 0.0}, "coreset_ratio"),
        ({"svdd_weight": -1.0}, "svdd_weight"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_input_errors():
    net = tiny().model.eval()
    with pytest.raises(ValueError, match="no memory bank yet"):
        net(torch.rand(1, 3, 64, 64))
    net = fitted(tiny(), torch.rand(4, 3, 64, 64)).model.eval()
    with pytest.raises(ValueError, match=r"RGB batch \(B, 3, H, W\)"):
        net(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="built for 64x64 inputs"):
        net(torch.rand(1, 3, 128, 128))
    bad = torch.rand(1, 3, 64, 64)
    bad[0, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        net(bad)
