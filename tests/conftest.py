"""Shared test fixtures.

The hub is unreachable (and must never be tried), so offline mode is forced at import time, before
transformers is imported by any test module. ``ITPO_BATCH_CACHE`` points at a per-session temporary
directory, so the embedded ``tiny`` model is built once per session by the code under test and never
read from (or written to) the user's real cache.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="itpo_batch_test_cache_"))
os.environ["ITPO_BATCH_CACHE"] = str(_SESSION_CACHE)
atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)  # also after collect-only or a crash


@pytest.fixture(scope="session")
def session_cache() -> Path:
    """The per-session model cache (``$ITPO_BATCH_CACHE``), removed when the session ends."""
    return _SESSION_CACHE


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """Directory of the embedded tiny model, built once per session through ``tiny_path``."""
    from itpo_batch.model.tiny import tiny_path

    return tiny_path()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir: Path):
    """The tiny tokenizer (right padding). Shared: tests that change it must load their own copy."""
    from itpo_batch.model.loading import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture(autouse=True, scope="session")
def _single_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second intra-op thread, and on a shared 2-core box two OpenMP threads
    spin-wait against other processes (measured 5-40x slower forwards under load), so tests run on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
