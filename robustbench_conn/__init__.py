"""robustbench-conn: does a network's connection (residual or suppression) make it more robust?

Importing the package registers the ImageNet models (``conn_convnext_small``, ...) in timm's registry.
"""
from . import models  # noqa: F401  (registers the conn_* models in timm)

__version__ = "0.1.0"
