"""``benchmarks/rb_ae_perception.py``: RB-AE's map and encoder residuals on real and synthetic defects."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from tests.benchmarks.conftest import load_script, model_pixel_auroc, tiny_on_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(folder_dataset):
    model, datamodule = tiny_on_folder("RBAE", folder_dataset)
    model.model.set_reference(torch.rand(1, 3, 64, 64), 0)
    return model, datamodule


def test_both_sets_are_scored_and_the_map_is_the_models_own(setup):
    script = load_script("rb_ae_perception")
    model, datamodule = setup
    sets = script.score_sets(model, datamodule, synthetic_images=4, synthetic_seed=0)
    parts = {"map_AUROC", "enc_AUROC"} | {f"enc_s{k}_AUROC" for k in range(4)}
    assert set(sets["real"]) == parts | {"image_AUROC"}
    assert set(sets["synthetic"]) == parts | {"cos_defect", "cos_normal", "copy"}
    assert all(0.0 <= v <= 1.0 for s in sets.values() for k, v in s.items() if k.endswith("AUROC"))
    # the map column is the model's own anomaly map on the same batches
    assert sets["real"]["map_AUROC"] == pytest.approx(model_pixel_auroc(model, datamodule), abs=1e-4)


def test_synthetic_set_is_seeded_and_pastes_a_defect_only_inside_its_mask(setup):
    script = load_script("rb_ae_perception")
    _, datamodule = setup
    clean, defective, masks = script.synthetic_set(datamodule, (64, 64), 3, seed=1)
    again = script.synthetic_set(datamodule, (64, 64), 3, seed=1)
    assert clean.shape == defective.shape == (3, 3, 64, 64) and masks.shape == (3, 1, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip((clean, defective, masks), again, strict=True))
    assert bool((masks.flatten(1).sum(1) > 0).all()), "every image gets a defect"
    changed = (defective - clean).abs().amax(1, keepdim=True) > 1e-6
    assert not bool((changed & (masks == 0)).any()), "pixels outside the mask are the clean image's"


def test_perceived_cosines_are_the_loss_groups_by_brute_force(setup):
    script = load_script("rb_ae_perception")
    model, datamodule = setup
    net = model.model
    clean, defective, masks = script.synthetic_set(datamodule, (64, 64), 4, seed=1)
    got = script.perceived_cosines(net, clean, defective, masks)
    with torch.no_grad():
        pairs = list(zip(net.encode(defective), net.encode(clean), strict=True))
    defect, normal = [], []
    for d, c in pairs:  # per cell: cosine over channels; coverage = mean of the mask over the cell
        cell = masks.shape[-1] // d.shape[-1]
        coverage = masks.unfold(2, cell, cell).unfold(3, cell, cell).mean(dim=(-1, -2))
        cos = F.cosine_similarity(d.double(), c.double(), dim=1).unsqueeze(1)
        if bool((coverage >= 0.5).any()):
            defect.append(cos[coverage >= 0.5].mean())
        if bool((coverage == 0).any()):
            normal.append(cos[coverage == 0].mean())
    assert defect, "the draw must give the loss's defective cells at some scale"
    assert got["cos_defect"] == pytest.approx(float(torch.stack(defect).mean()), abs=1e-5)
    assert got["cos_normal"] == pytest.approx(float(torch.stack(normal).mean()), abs=1e-5)


def test_copied_fraction_is_zero_for_a_repairing_reconstruction_and_one_for_identity(setup):
    script = load_script("rb_ae_perception")
    _, datamodule = setup
    clean, defective, masks = script.synthetic_set(datamodule, (64, 64), 3, seed=1)

    class Fixed:  # reconstructs every input as the clean image: the defect is repaired away
        def reconstruct(self, images):
            return clean[: len(images)], None

    class Identity:  # reconstructs every input as itself: the defect is reproduced
        def reconstruct(self, images):
            return images, None

    assert script.copied_fraction(Fixed(), clean, defective, masks) == 0.0
    assert script.copied_fraction(Identity(), clean, defective, masks) == pytest.approx(1.0)
