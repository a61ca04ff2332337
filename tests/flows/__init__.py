"""Tests of flows/: the recycle flow on a Prefect API, and deployments on a Prefect server with workers."""
