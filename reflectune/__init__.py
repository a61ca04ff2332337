"""Reflectune: Selective Reflection-Tuning.

A teacher model rewrites instruction-response pairs; the student that will be fine-tuned
scores the originals and the rewrites with IFD and reversed-IFD and keeps what suits it.
This package is the method itself and never imports Prefect; `tasks/` and `flows/` run it.
"""

__version__ = "0.1.0"
