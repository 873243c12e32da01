"""The shipped trainers, one package each; they register in pyproject.toml (see ddl_apps/registry.py)."""
