"""The ``itpo-batch`` typer app, installed as ``itpo_batch.cli`` (see :mod:`itpo_batch.cli.main`)."""
