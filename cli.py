"""`python cli.py ...` is `compress ...`."""
from compressor.cli import app

app()
