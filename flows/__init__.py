"""Prefect flows: the recycle DAG and the GPU batch flow that holds an engine."""
