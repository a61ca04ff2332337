"""Prefect tasks (installed as `reflectune.tasks`, kept at the repository's top level): thin
wrappers around reflectune's stages that add retries, logging, resume checks and the
worker's engine. They compute nothing themselves."""
