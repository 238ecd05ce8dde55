"""dgaug: domain-generalization data augmentation for CLIP-style models."""

__version__ = "0.1.0"
