"""Registration against a real install: every check runs in a fresh interpreter.

Nothing here imports ``anomalib_recon`` in the test process first, because that would register the
models by import and hide a broken hook.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import venv
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIST = "anomalib-recon"

# Cheap constructor arguments per model (random-init backbone, no network) for instantiation checks.
TINY_KWARGS: dict[str, dict] = {
    "InpFormerPP": {
        "backbone": "tf_efficientnet_lite0",
        "weights": None,
        "image_size": 64,
        "decoder_depth": 2,
        "seg_channels": [16, 8],
    },
    "AGPNet": {
        "backbone": "test_vit",
        "weights": None,
        "image_size": 64,
        "decoder_embed_dim": 64,
        "decoder_num_heads": 2,
        "decoder_depth": 1,
    },
    "AMINet": {
        "backbone": "tf_efficientnet_lite0",
        "weights": None,
        "embed_dim": 32,
        "depth": 1,
        "num_heads": 2,
        "image_size": 64,
    },
    "NAFRAD": {"backbone": "tf_efficientnet_lite0", "layers": [1, 2], "weights": None},
    "GRNR": {"backbone": "tf_efficientnet_lite0", "weights": None, "image_size": 64, "num_global_priors": 8},
    "SCLVI": {"image_size": 64, "feature_dim": 16, "width": 0.125, "pair_batch_size": 8},
    "DADF": {
        "backbone": "tf_efficientnet_lite0",
        "weights": None,
        "image_size": 64,
        "embed_dim_per_scale": 16,
        "depth": 1,
        "num_heads": 2,
        "flow_steps": 2,
        "reconstruction_steps": 2,
    },
    "GLCF": {
        "backbone": "tf_efficientnet_lite0",
        "weights": None,
        "image_size": 64,
        "embed_dim": 32,
        "depth": 1,
        "num_heads": 2,
        "decoder_embed_dim": 32,
        "decoder_depth": 1,
        "decoder_num_heads": 2,
    },
    "LGFDR": {
        "backbone": "tf_efficientnet_lite0",
        "weights": None,
        "image_size": 64,
        "local_embed_dim": 32,
        "local_depth": 1,
        "local_num_heads": 2,
        "embed_dim": 32,
        "depth": 1,
        "num_heads": 2,
    },
    "STMAE": {
        "backbone": "tf_efficientnet_lite0",
        "weights": None,
        "image_size": 64,
        "embed_dim": 32,
        "depth": 1,
        "num_heads": 2,
        "decoder_embed_dim": 32,
        "decoder_depth": 1,
        "decoder_num_heads": 2,
    },
    "RBAE": {
        "backbone": "tf_efficientnet_lite0",
        "weights": None,
        "image_size": 64,
        "seg_channels": 16,
        "reconstruction_steps": 2,
    },
    "PNPT": {
        "backbone": "tf_efficientnet_lite0",
        "weights": None,
        "image_size": 64,
        "embed_dim_per_scale": 16,
        "depth": 1,
        "decoder_depth": 1,
        "num_heads": 2,
    },
}


def _entry_points() -> list[metadata.EntryPoint]:
    try:
        dist = metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        pytest.skip("anomalib-recon is not installed (pip install -e .)")
    return [ep for ep in dist.entry_points if ep.group == "anomalib.models"]


def _run(code: str, env: dict | None = None, python: str = sys.executable, timeout: int = 600) -> str:
    done = subprocess.run(
        [python, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT.parent,  # not the checkout: nothing may be imported from the source tree by accident
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-5000:]}"
    return done.stdout


def test_distribution_ships_hook_pth_and_entry_points():
    eps = _entry_points()
    files = {str(f) for f in metadata.distribution(DIST).files or []}
    assert "anomalib_recon_plugins.pth" in files
    assert "_anomalib_recon_hook.py" in files
    names = sorted(ep.name for ep in eps)
    assert names, "no model declared in the anomalib.models entry-point group"
    for ep in eps:
        assert ep.value == f"anomalib_recon.models:{ep.name}"
    assert set(TINY_KWARGS) == set(names), "add tiny constructor kwargs for every new model"


def test_interpreter_start_imports_no_torch_or_anomalib():
    _entry_points()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, cwd=ROOT.parent
    )
    modules = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line]
    assert "_anomalib_recon_hook" in modules, "the .pth hook did not run at start-up"
    heavy = [m for m in modules if m.split(".")[0] in {"torch", "anomalib", "anomalib_recon", "timm", "lightning"}]
    assert heavy == [], f"start-up imported {heavy}"
    lines = done.stderr.splitlines()
    hook_us = next(int(line.split("|")[1]) for line in lines if line.endswith("_anomalib_recon_hook"))
    assert hook_us < 20_000, f"hook took {hook_us} us"


CHECK_REGISTRATION = """
import json, sys, warnings
warnings.simplefilter("ignore")
import anomalib.models as am
from anomalib.models import get_model, AnomalibModule
from anomalib.models import _get_model_class_by_name
from anomalib.models.components.base.anomalib_module import AnomalibModule as Base
tiny = json.loads({TINY!r})
out = {{}}
for name, kwargs in tiny.items():
    cls = getattr(am, name)
    snake = "".join("_" + c.lower() if c.isupper() and i and not name[i - 1].isupper() else c.lower()
                    for i, c in enumerate(name))
    assert cls.__module__.startswith("anomalib_recon."), cls.__module__
    assert Base in cls.__bases__ or any(Base is b for b in cls.__mro__[1:2]), "must subclass AnomalibModule directly"
    assert _get_model_class_by_name(name.lower()) is cls
    assert _get_model_class_by_name(snake) is cls, snake
    a = get_model(name.lower(), **kwargs)
    b = get_model({{"class_path": name, "init_args": kwargs}})
    c = get_model({{"class_path": "anomalib_recon.models." + name, "init_args": kwargs}})
    assert type(a) is type(b) is type(c) is cls
    out[name] = snake
builtins = [c for c in AnomalibModule.__subclasses__() if c.__module__.split(".")[0] == "anomalib"]
for c in builtins:
    assert _get_model_class_by_name(c.__name__) is c, f"built-in {{c.__name__}} shadowed"
print("REGISTERED", json.dumps(out), len(builtins))
"""


@pytest.mark.slow
def test_models_resolve_by_short_name_snake_name_and_class_path():
    _entry_points()
    out = _run(CHECK_REGISTRATION.format(TINY=json.dumps(TINY_KWARGS)), env={"HF_HUB_OFFLINE": "1"})
    assert "REGISTERED" in out
    assert set(json.loads(out.split("REGISTERED", 1)[1].rsplit(" ", 1)[0])) == set(TINY_KWARGS)


def test_plugins_can_be_switched_off():
    _entry_points()
    code = """
    from anomalib.models import get_model, UnknownModelError
    try:
        get_model("nafrad")
    except UnknownModelError:
        print("OFF")
    """
    assert "OFF" in _run(code, env={"ANOMALIB_DISABLE_PLUGINS": "1"})


def test_datamodule_aliases_load_with_the_models():
    _entry_points()
    code = """
    import anomalib.models
    from anomalib.data import AnomalibDataModule, MVTecAD
    names = {c.__name__: c for c in AnomalibDataModule.__subclasses__()}
    mvtec = [c for c in MVTecAD.__subclasses__() if c.__name__ == "MVTec"]
    assert mvtec and mvtec[0].__module__.startswith("anomalib_recon"), mvtec
    assert "ELPV" in names, sorted(names)
    print("DATA OK")
    """
    assert "DATA OK" in _run(code)


@pytest.mark.slow
def test_wheel_in_a_fresh_environment_registers(tmp_path):
    """Build the wheel, install it (no deps) into a fresh venv that borrows this environment's packages.

    The borrowed site-packages is put on ``sys.path`` by a plain path line, so its own ``.pth`` files (an
    editable install of this package, for one) are not processed: only the wheel's hook can register.
    """
    _entry_points()
    wheel_dir = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), ROOT],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(wheel_dir.glob("anomalib_recon-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = str(env_dir / "bin" / "python")
    site = Path(_run("import sysconfig; print(sysconfig.get_paths()['purelib'])", python=python).strip())
    (site / "zz_borrowed_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    where = _run("import importlib.util as u; print(u.find_spec('anomalib_recon').origin)", python=python)
    assert str(env_dir) in where, f"the wheel's package is not the one imported: {where}"
    out = _run(CHECK_REGISTRATION.format(TINY=json.dumps(TINY_KWARGS)), env={"HF_HUB_OFFLINE": "1"}, python=python)
    assert "REGISTERED" in out


def test_importing_our_models_first_still_registers_them_without_warnings():
    """``from anomalib_recon.models import ...`` before anomalib.models: no circular-import warning, same classes."""
    _entry_points()
    code = """
    import warnings
    warnings.filterwarnings("error", message="Could not load anomalib plugin")
    import anomalib_recon.models as ours
    import anomalib.models as am
    from anomalib.models import NAFRAD, get_model
    assert NAFRAD is ours.NAFRAD and "anomalib_recon.models" in am.ALLOWED_MODULES
    assert all(getattr(am, name) is getattr(ours, name) for name in ours.__all__)
    print("FIRST OK")
    """
    assert "FIRST OK" in _run(code)
