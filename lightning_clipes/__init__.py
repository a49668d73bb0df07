"""lightning_clipes: CLIP-ES weakly-supervised segmentation as one PyTorch Lightning job.

Public names are imported lazily, so ``lightning_clipes.components`` (the plain-torch math) can be
used without importing Lightning.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "CLIPES": "lightning_clipes.components.clipes",
    "ClassMaps": "lightning_clipes.components.clipes",
    "load_clip": "lightning_clipes.components.clip_loader",
    "register_clip_config": "lightning_clipes.components.clip_loader",
    "CLIPESLabeler": "lightning_clipes.labeler",
    "LabelerDataModule": "lightning_clipes.data.labeler_datamodule",
    "VOCDataModule": "lightning_clipes.data.labeler_datamodule",
    "SyntheticVOCDataModule": "lightning_clipes.data.labeler_datamodule",
    "SegmentationDataModule": "lightning_clipes.data.segmentation_datamodule",
    "VOCSource": "lightning_clipes.data.sources",
    "SyntheticVOCSource": "lightning_clipes.data.sources",
    "COCOSource": "lightning_clipes.data.sources",
    "FolderSource": "lightning_clipes.data.sources",
    "SegmentationStudent": "lightning_clipes.student",
    "VOCSegmentationDataModule": "lightning_clipes.data.segmentation_datamodule",
    "SyntheticSegmentationDataModule": "lightning_clipes.data.segmentation_datamodule",
    "ToyWorldDataModule": "lightning_clipes.data.segmentation_datamodule",
    "ToyWorldSource": "lightning_clipes.data.toy_world",
    "cli_main": "lightning_clipes.cli",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_clipes' has no attribute {name!r}")
