"""Prefect tasks: thin wrappers around reflectune's stages that add retries, logging,
resume checks and the worker's engine. They compute nothing themselves."""
