"""``python -m itpo_batch ARGS`` runs the ``itpo-batch`` command line."""

from itpo_batch.cli.main import main

if __name__ == "__main__":
    main()
