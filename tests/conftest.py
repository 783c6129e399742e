"""Every test's caches (reference log-probs, BDHS pairs, base reports) go to a temporary folder,
never the real home: $MMALIGN_CACHE (model.CACHE_ENV) is set for the whole session, subprocesses
included."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def cache_folder(tmp_path_factory):
    """$MMALIGN_CACHE -> a session-wide temporary folder (model.cache_home reads it)."""
    old = os.environ.get("MMALIGN_CACHE")
    os.environ["MMALIGN_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield os.environ["MMALIGN_CACHE"]
    if old is None:
        del os.environ["MMALIGN_CACHE"]
    else:
        os.environ["MMALIGN_CACHE"] = old
