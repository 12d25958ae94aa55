"""``python -m etl`` runs the same CLI as ``medspa-conversions``."""

from etl.cli import main

main()
