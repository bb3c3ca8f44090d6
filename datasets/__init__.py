"""Datasets by name (datasets/sources.py) and their loaders (datasets/loaders.py)."""
from .loaders import GpuLoader, TorchLoader, make_loaders
from .sources import DATASETS, ArrayDataset, Data, DataInfo, DatasetError, build_data, data_from_arrays

__all__ = ["DATASETS", "ArrayDataset", "Data", "DataInfo", "DatasetError", "GpuLoader", "TorchLoader", "build_data",
           "data_from_arrays", "make_loaders"]
