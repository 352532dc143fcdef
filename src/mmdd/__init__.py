"""mmdd: multimodal dataset distillation."""

__version__ = "0.1.0"
