"""Datasets by name and their loaders (see datasets/dataset.py)."""

from .dataset import (
    DATASETS,
    ArrayDataset,
    Data,
    DataInfo,
    DatasetError,
    GpuLoader,
    TorchLoader,
    build_data,
    data_from_arrays,
    make_loaders,
)

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "Data",
    "DataInfo",
    "DatasetError",
    "GpuLoader",
    "TorchLoader",
    "build_data",
    "data_from_arrays",
    "make_loaders",
]
