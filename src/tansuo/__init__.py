"""tansuo: a workbench for Transformer model pre-research."""

__version__ = "0.1.0"
