"""The package version: one home, read by the package, the CLI, the reports and replay."""

__version__ = "0.2.0"
