"""Prefect flows (installed as `reflectune.flows`, kept at the repository's top level): the
recycle DAG, the GPU batch flow that holds an engine, the GPU step flow that trains and
evaluates, re-recycling and cluster setup."""
