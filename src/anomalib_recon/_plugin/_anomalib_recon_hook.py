"""Lazy plugin hook: expose anomalib-recon's models when ``anomalib.models`` is first imported.

anomalib 2.7 finds models only among imported ``AnomalibModule`` subclasses. This top-level module is
imported at interpreter start-up by ``anomalib_recon_plugins.pth``; it costs well under a millisecond
and imports nothing heavy: it only puts a one-shot finder on ``sys.meta_path``. When
``anomalib.models`` is imported, the finder lets the real import run, then loads every entry point of
the ``anomalib.models`` group and sets each class on ``anomalib.models`` — so ``--model NAFRAD``,
``get_model("nafrad")`` and ``get_model({"class_path": "NAFRAD"})`` behave as for built-ins. A plugin
name that matches a built-in is never set (built-ins are never shadowed). Set
``ANOMALIB_DISABLE_PLUGINS=1`` to switch it off.
"""

import sys

_TARGET = "anomalib.models"
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


class _AnomalibModelsFinder:
    """One-shot ``sys.meta_path`` finder that wraps the loader of ``anomalib.models``."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001
        if fullname != _TARGET:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_load(module):  # noqa: ANN001
            exec_module(module)
            load_plugins(module)

        spec.loader.exec_module = exec_then_load
        return spec


def install():
    """Put the finder on ``sys.meta_path`` (or load right away if anomalib.models is already imported)."""
    if _TARGET in sys.modules:
        load_plugins(sys.modules[_TARGET])
    elif not any(type(finder).__name__ == "_AnomalibModelsFinder" for finder in sys.meta_path):
        sys.meta_path.insert(0, _AnomalibModelsFinder())


install()
