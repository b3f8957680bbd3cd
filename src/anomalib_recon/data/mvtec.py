"""``MVTec``: the name older anomalib docs use for the MVTec AD datamodule."""

from anomalib.data import MVTecAD

__all__ = ["MVTec"]


class MVTec(MVTecAD):
    """Alias of anomalib's ``MVTecAD`` for users following older docs.

    anomalib 2.0 renamed the ``MVTec`` datamodule to ``MVTecAD`` (open-edge-platform/anomalib PR #2557), so
    ``--data MVTec`` and ``from anomalib.data import MVTec`` from 1.x-era docs fail on anomalib 2.7.

    It adds no behaviour: same arguments (``root="./datasets/MVTecAD"``, ``category="bottle"``, ...), same
    layout, download and splits; ``name`` stays ``"MVTecAD"`` so results and visualisation paths are the same.
    CLI: ``anomalib train --model Padim --data MVTec --data.category bottle``.
    """

    @property
    def name(self) -> str:
        """``"MVTecAD"``, as for anomalib's class (the base class would report ``"MVTec"``)."""
        return "MVTecAD"
