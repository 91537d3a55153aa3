"""Peak memory of streaming validation vs loading the whole file, on a synthetic long-shape log.

Writes a Parquet file of N messages (text-heavy, like real logs), then measures in child processes
(peak RSS via getrusage) and wall time:
  * naive:     polars.read_parquet of the whole file (what a non-streaming validator would hold);
  * streaming: itpo_batch.data.validate.validate_logs (batches of --batch-size rows).
Prints one JSON object. Example: python bench/validate_stream.py --messages 2000000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Peak of the *current* RSS (sampled from /proc every 5 ms) above the RSS after imports: ru_maxrss would
# also count the import-time peak of the native libraries, which dwarfs the work being measured.
_RSS = (
    "import threading, time\n"
    "def cur():\n"
    "    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20\n"
    "peak = [0.0]\n"
    "def sample():\n"
    "    while True:\n"
    "        peak[0] = max(peak[0], cur()); time.sleep(0.005)\n"
    "threading.Thread(target=sample, daemon=True).start()\n"
    "rss = lambda: (time.sleep(0.02), peak[0])[1]\n"
)
_IMPORTS = (
    "import sys, json, polars as pl; from itpo_batch.data.validate import validate_logs, ValidateConfig; "
)
CHILD = {
    "naive": _RSS
    + _IMPORTS
    + "base = cur(); df = pl.read_parquet(sys.argv[1]); print(json.dumps([base, rss()]))",
    "streaming": (
        _RSS + _IMPORTS + "base = cur(); "
        "r = validate_logs([sys.argv[1]], ValidateConfig(batch_size=int(sys.argv[2]))); "
        "assert r.ok, r.format_errors(); print(json.dumps([base, rss()]))"
    ),
}


def make_file(path: Path, n_messages: int, chars: int, turns: int = 8) -> None:
    rng = np.random.default_rng(0)
    words = np.array(
        ["fever", "cough", "since", "days", "the", "patient", "reports", "pain", "mild", "severe"]
    )
    pool = pa.array([" ".join(rng.choice(words, chars // 6)) for _ in range(4096)])
    chunk = 200_000
    writer = None
    for start in range(0, n_messages, chunk):
        n = min(chunk, n_messages - start)
        idx = np.arange(start, start + n)
        text = pool.take(pa.array(rng.integers(0, len(pool), n)))
        table = pa.table(
            {
                "conversation_id": pa.array((idx // turns).astype(str)),
                "turn_index": pa.array(idx % turns, pa.int64()),
                "role": pa.array(np.where(idx % 2 == 0, "user", "assistant")),
                "content": text,
                "outcome": pa.array(((idx // turns) % 2).astype(float)),
            }
        )
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=50_000)
    assert writer is not None
    writer.close()


def measure(kind: str, path: Path, batch_size: int) -> dict[str, float]:
    """Peak RSS of a child process above its RSS after imports (so library size does not count)."""
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-c", CHILD[kind], str(path), str(batch_size)],
        check=True,
        capture_output=True,
        text=True,
    )
    base, peak = json.loads(res.stdout.strip().splitlines()[-1])
    return {
        "peak_rss_above_imports_mib": round(peak - base, 1),
        "seconds_incl_startup": round(time.perf_counter() - t0, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=400_000)
    ap.add_argument("--chars", type=int, default=600, help="characters per message")
    ap.add_argument("--batch-size", type=int, default=8192)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "long.parquet"
        make_file(path, args.messages, args.chars)
        uncompressed = sum(
            pq.ParquetFile(path).metadata.row_group(i).total_byte_size
            for i in range(pq.ParquetFile(path).num_row_groups)
        )
        file_mib = round(path.stat().st_size / 2**20, 1)
        streaming = measure("streaming", path, args.batch_size)
        naive = measure("naive", path, args.batch_size)
    print(
        json.dumps(
            {
                "bench": "validate_stream",
                "messages": args.messages,
                "file_mib": file_mib,
                "uncompressed_mib": round(uncompressed / 2**20, 1),
                "streaming": streaming,
                "naive_full_load": naive,
                "peak_rss_ratio_naive_over_streaming": round(
                    naive["peak_rss_above_imports_mib"] / max(streaming["peak_rss_above_imports_mib"], 1e-9),
                    2,
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
