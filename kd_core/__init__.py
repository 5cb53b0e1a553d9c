"""kdflow: production knowledge-distillation pipelines."""

__version__ = "0.1.0"
