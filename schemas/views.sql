-- Views that `itpo-batch sql` creates over a run directory (layout: run_layout.json).
--
-- {run} stands for the run directory's absolute path (quoted for SQL). Each statement creates one view;
-- the partition columns method and round come first. A view whose files do not exist yet (a run that
-- has not scored anything, or has no metrics) is created empty instead, with the columns of its schema
-- (run_layout.json "views"), so a query over it returns no rows rather than failing the command.
-- Hive partition types are fixed here (not inferred from the paths) so every view agrees on them.
-- The globs name the partition file itself (run_layout.json "partition_file"), never **/*.parquet: a
-- writer killed before its rename leaves a hidden temporary .part-0.tmp-*.parquet beside it, whole or
-- half-written, which DuckDB's ** would read (duplicate rows, or a failed query).

CREATE VIEW turns AS
SELECT method, round, * EXCLUDE (method, round)
FROM read_parquet('{run}/turns/method=*/round=*/part-0.parquet', hive_partitioning = true, union_by_name = true,
                  hive_types = {'method': 'VARCHAR', 'round': 'INTEGER'});

CREATE VIEW conversations AS
SELECT method, round, * EXCLUDE (method, round)
FROM read_parquet('{run}/conversations/method=*/round=*/part-0.parquet', hive_partitioning = true, union_by_name = true,
                  hive_types = {'method': 'VARCHAR', 'round': 'INTEGER'});

CREATE VIEW messages AS
SELECT method, round, * EXCLUDE (method, round)
FROM read_parquet('{run}/messages/method=*/round=*/part-0.parquet', hive_partitioning = true, union_by_name = true,
                  hive_types = {'method': 'VARCHAR', 'round': 'INTEGER'});

-- One row per (method, round): metrics.jsonl, read whole (sample_size = -1) so that a metric first
-- logged in a late round still becomes a column.
CREATE VIEW rounds AS
SELECT method, CAST(round AS INTEGER) AS round, * EXCLUDE (method, round)
FROM read_json('{run}/metrics.jsonl', format = 'newline_delimited', sample_size = -1);
