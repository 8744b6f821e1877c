"""Data: datasets by name (``get_dataset``), npz loading with validation, and labeled/auxiliary batch mixing."""
from .datasets import DATASETS, ArrayDataset, DataError, check_num_classes, get_dataset, load_npz
from .sampler import MixedBatchSampler

__all__ = ["DATASETS", "ArrayDataset", "DataError", "check_num_classes", "get_dataset", "load_npz",
           "MixedBatchSampler"]
