"""robustbench-conn: does a network's connection (residual or suppression) make it more robust?"""
__version__ = "0.1.0"
