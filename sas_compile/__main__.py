"""``python -m sas_compile``: the ``sas-compile`` command line."""
from .cli import run

run()
