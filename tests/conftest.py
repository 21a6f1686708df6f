"""Suite-wide fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _mmprep_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory):
    """Every test (and every subprocess it starts) keeps the tokenizer cache in a temporary folder, never in the
    real home directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMPREP_CACHE_DIR", str(tmp_path_factory.mktemp("mmprep-cache")))
        mp.delenv("MMPREP_NO_CACHE", raising=False)
        yield
