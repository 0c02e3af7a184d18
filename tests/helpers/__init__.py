"""Shared test helpers: paths, runners and makers of real files (importable as ``helpers.*``; ``tests/`` and
``fixtures/`` are on the test path through ``[tool.pytest.ini_options] pythonpath``)."""
