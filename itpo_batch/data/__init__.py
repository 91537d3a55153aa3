"""Stage 1, data: read, validate and normalise logs; the data contracts; the run directory; DuckDB views.

``logs`` reads the two shapes (nested, long) batch by batch; ``validate`` applies the rules of
``schemas/validation.json`` and builds :class:`~itpo_batch.data.validate.Logs`; ``validation_report`` is
what ``validate`` prints; ``summary`` the per-file statistics; ``schemas`` loads the contract files;
``io`` holds the atomic writers; ``store`` the hive-partitioned run directory; ``sql`` the read-only
DuckDB views over it. Imports only :mod:`itpo_batch.core`.
"""
