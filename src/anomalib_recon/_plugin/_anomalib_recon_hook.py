"""Lazy plugin hook: expose anomalib-recon's models when ``anomalib.models`` is first imported.

anomalib 2.7 finds models only among imported ``AnomalibModule`` subclasses. This top-level module is
imported at interpreter start-up by ``anomalib_recon_plugins.pth``; it costs well under a millisecond
and imports nothing heavy: it only puts a one-shot finder on ``sys.meta_path``. When
``anomalib.models`` is imported, the finder lets the real import run, then loads every entry point of
the ``anomalib.models`` group and sets each class on ``anomalib.models`` — so ``--model NAFRAD``,
``get_model("nafrad")`` and ``get_model({"class_path": "NAFRAD"})`` behave as for built-ins. A plugin
name that matches a built-in is never set (built-ins are never shadowed). Set
``ANOMALIB_DISABLE_PLUGINS=1`` to switch it off.

The same finder also wraps ``AnomalibCLI.instantiate_classes`` when ``anomalib.cli.cli`` is imported (see
:func:`patch_cli`): anomalib 2.7 parses ``--seed_everything``, documents "run seed_everything with this value before
classes instantiation", and never applies it; with the wrap the same command with the same seed gives the same
weights and metrics. Errors our constructors raise are printed as one line instead of jsonargparse's Union dump; so are
the errors our checks raise while a subcommand runs (an untrained model tested, bad images, a non-finite score), and a
``--ckpt_path`` that is not a readable checkpoint. With ``--ckpt_path`` the model is built without fetching pretrained
weights (the checkpoint brings them), so a checkpoint of other settings is refused naming the settings.
"""

import sys

_TARGET = "anomalib.models"
_CLI = "anomalib.cli.cli"
_GROUP = "anomalib.models"
_TRUSTED_MODULES = ("anomalib_recon.models",)


def load_plugins(models_module=None, ready=()):  # noqa: ANN001 - no typing import on the start-up path
    """Load the ``anomalib.models`` entry points onto ``anomalib.models`` (idempotent).

    An entry point whose module is being imported right now (``import anomalib_recon.models`` imports
    ``anomalib.models`` half-way through) is skipped instead of failing with a circular import; that module
    calls this function again, naming itself in ``ready``, once its classes exist.
    """
    import os
    import warnings
    from importlib.metadata import entry_points

    if os.environ.get("ANOMALIB_DISABLE_PLUGINS", "").strip().lower() in {"1", "true", "yes", "on"}:
        return []
    if models_module is None:
        models_module = sys.modules.get(_TARGET)
        if models_module is None:
            import importlib

            models_module = importlib.import_module(_TARGET)
    base = getattr(models_module, "AnomalibModule", None)
    builtins = {
        cls.__name__.lower()
        for cls in (base.__subclasses__() if base is not None else ())
        if cls.__module__.split(".")[0] == "anomalib"
    }
    builtins.update(name.lower() for name in getattr(models_module, "__all__", ()))
    loaded = []
    for entry_point in entry_points(group=_GROUP):
        name = entry_point.name
        if name.lower() in builtins:
            warnings.warn(f"anomalib plugin model '{name}' would shadow an anomalib built-in; skipped.", stacklevel=2)
            continue
        module = sys.modules.get(entry_point.module)
        initializing = getattr(getattr(module, "__spec__", None), "_initializing", False)
        if module is not None and initializing and entry_point.module not in ready:
            continue
        try:
            cls = entry_point.load()
        except Exception as error:
            warnings.warn(f"Could not load anomalib plugin model '{name}' ({entry_point.value}): {error}", stacklevel=2)
            continue
        setattr(models_module, name, cls)
        loaded.append(name)
    allowed = getattr(models_module, "ALLOWED_MODULES", None)
    if isinstance(allowed, set):
        allowed.update(_TRUSTED_MODULES)
    return loaded


def patch_cli(cli_module):  # noqa: ANN001
    """Make ``AnomalibCLI`` apply ``seed_everything`` and surface our constructor errors (idempotent).

    * An integer ``seed_everything`` is applied (Lightning's ``seed_everything(seed, workers=True)``) before the
      model, data and engine are instantiated, as anomalib documents and 2.7 does not do.
    * An error raised by anomalib-recon's own code while the classes are instantiated (an unknown backbone, a
      backbone without offline weights, a bad size) reaches the user as one line, ``anomalib: error: ...``, and
      exit code 2, instead of being buried in jsonargparse's dump of every Union subtype.
    """
    cls = getattr(cli_module, "AnomalibCLI", None)
    original = getattr(cls, "instantiate_classes", None)
    run_subcommand = getattr(cls, "_run_subcommand", None)
    if original is None or getattr(original, "_anomalib_recon_patched", False):
        return

    def instantiate_classes(self):  # noqa: ANN001
        seed = self._get(self.config, "seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool):  # True = "a random seed": nothing to reproduce
            from lightning.pytorch import seed_everything

            seed_everything(seed, workers=True)
        try:
            with _restoring_if_checkpoint(self):
                original(self)
        except Exception as error:
            ours = _own_error(error) or _model_error(self._get(self.config, "model"))
            if ours is None:
                raise
            _exit_with(ours)

    def _run_subcommand(self):  # noqa: ANN001
        try:
            run_subcommand(self)
        except Exception as error:
            ours = _own_error(error)
            if ours is None or not _is_check(ours):
                raise
            _exit_with(ours)

    instantiate_classes._anomalib_recon_patched = True
    cls.instantiate_classes = instantiate_classes
    if run_subcommand is not None:
        cls._run_subcommand = _run_subcommand


def _exit_with(error):  # noqa: ANN001
    """One line, exit code 2 (``ANOMALIB_RECON_TRACEBACK=1`` re-raises instead, for debugging)."""
    import os

    if os.environ.get("ANOMALIB_RECON_TRACEBACK", "").strip().lower() in {"1", "true", "yes", "on"}:
        raise error
    sys.stderr.write(f"anomalib: error: {type(error).__name__}: {error}\n")
    raise SystemExit(2) from None


def _is_check(error):  # noqa: ANN001
    """An error our checks raise on purpose (bad input, settings, files, non-finite numbers), not a bug."""
    from anomalib_recon.components.guards import UntrainedModelError
    from anomalib_recon.components.weights import OfflineWeightsError

    return isinstance(error, ValueError | FileNotFoundError | UntrainedModelError | OfflineWeightsError)


def _restoring_if_checkpoint(cli):  # noqa: ANN001
    """With ``--ckpt_path``: check the file now, and build the model without fetching pretrained weights.

    The checkpoint brings every tensor; building under ``restoring_from_checkpoint`` lets a checkpoint trained with
    other ``--model.*`` settings reach the check that names them, instead of failing on the default backbone's
    weights (e.g. offline).
    """
    import contextlib

    ckpt = cli._get(cli.config, "ckpt_path")
    if not ckpt:
        return contextlib.nullcontext()
    from anomalib_recon.components.checkpoint import check_checkpoint_file, restoring_from_checkpoint

    model = str(getattr(cli._get(cli.config, "model"), "class_path", "") or "the model")
    check_checkpoint_file(ckpt, model.rsplit(".", 1)[-1])
    return restoring_from_checkpoint()


def _model_error(model_config):  # noqa: ANN001
    """Build one of our models from its parsed config again, to get the error jsonargparse did not chain."""
    import importlib

    class_path = str(getattr(model_config, "class_path", "") or "")
    init_args = getattr(model_config, "init_args", None)
    if not class_path.startswith("anomalib_recon.") or init_args is None:
        return None
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
        kwargs = init_args.as_dict() if hasattr(init_args, "as_dict") else dict(vars(init_args))
        cls(**{k: v for k, v in kwargs.items() if not isinstance(v, dict)})  # components stay at their defaults
    except Exception as error:
        return _own_error(error)
    return None


def _own_error(error):  # noqa: ANN001
    """The innermost exception in ``error``'s chain that anomalib-recon's code raised, or None."""
    import os
    import traceback

    marker = f"{os.sep}anomalib_recon{os.sep}"
    found, seen = None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        frames = traceback.extract_tb(error.__traceback__)
        if frames and marker in frames[-1].filename:  # raised by our code, not merely passing through it
            found = error
        error = error.__cause__ or error.__context__
    return found


_ON_IMPORT = {_TARGET: load_plugins, _CLI: patch_cli}


class _AnomalibModelsFinder:
    """``sys.meta_path`` finder that runs a callback after ``anomalib.models`` / ``anomalib.cli.cli`` execute."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001
        callback = _ON_IMPORT.get(fullname)
        if callback is None or getattr(self, "_busy", False):
            return None
        self._busy = True  # the search below asks the other finders, not this one again
        try:
            spec = self._find(fullname, path, target)
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_call(module):  # noqa: ANN001
            exec_module(module)
            callback(module)

        spec.loader.exec_module = exec_then_call
        return spec

    def _find(self, fullname, path, target):  # noqa: ANN001
        spec = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            if finder is self:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        return spec


def install():
    """Put the finder on ``sys.meta_path`` (or load right away if anomalib.models is already imported)."""
    if _TARGET in sys.modules:
        load_plugins(sys.modules[_TARGET])
    if _CLI in sys.modules:
        patch_cli(sys.modules[_CLI])
    if not any(type(finder).__name__ == "_AnomalibModelsFinder" for finder in sys.meta_path):
        sys.meta_path.insert(0, _AnomalibModelsFinder())


install()
