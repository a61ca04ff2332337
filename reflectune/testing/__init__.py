"""Helpers for Reflectune's own test suite and benchmarks, not part of the library: nothing in
`reflectune` imports them (a contract in pyproject.toml). `servers`: a free loopback port,
`prefect server start` with its own database, a cluster of Prefect process workers."""
