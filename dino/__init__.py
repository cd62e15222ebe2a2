"""dino: self-supervised training and evaluation of DINO / DINOv2 Vision Transformers."""

__version__ = "0.1.0"
