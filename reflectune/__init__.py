"""Reflectune: Selective Reflection-Tuning.

A teacher model rewrites instruction-response pairs; the student that will be fine-tuned
scores the originals and the rewrites with IFD and reversed-IFD and keeps what suits it.
This package is the method itself and never imports Prefect; the Prefect tasks and flows that
run it live in the repository's `tasks/` and `flows/`, installed as `reflectune.tasks` and
`reflectune.flows`.
"""

__version__ = "0.1.0"
