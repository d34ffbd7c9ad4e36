"""HESCAPE platform: cross-modal contrastive pretraining of H&E patches and spatial gene expression."""

__version__ = "0.1.0"
