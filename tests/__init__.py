"""Reflectune test suite (a package, so tests share helpers with relative imports)."""
