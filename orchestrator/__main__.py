"""`python -m orchestrator ...` is the `neuroal` command."""

from orchestrator.cli import app

app()
