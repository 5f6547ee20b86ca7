"""Fixtures of the flow tests."""

import os

import pytest


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    old = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(home)
    with prefect_test_harness(server_startup_timeout=90):
        yield home
    if old is None:
        os.environ.pop("PREFECT_HOME", None)
    else:
        os.environ["PREFECT_HOME"] = old


@pytest.fixture(scope="session")
def migrated_prefect_home(tmp_path_factory):
    """A PREFECT_HOME whose SQLite database exists: the CLIs the process tests start each run a
    temporary server on it, which takes ~10 s longer on a new database (migrations)."""
    from flows.server_process import TemporaryServer

    home = tmp_path_factory.mktemp("migrated-prefect-home")
    server = TemporaryServer(home)
    server.start()
    try:
        server.wait_ready(120)
    finally:
        server.stop()
    return home


@pytest.fixture(scope="session")
def long_corpus(tmp_path_factory):
    """One document of ~95k tiny-model tokens: an extraction long enough to interrupt."""
    from cli_procs import write_long_corpus

    return write_long_corpus(tmp_path_factory.mktemp("long-corpus"))


@pytest.fixture
def procs(tmp_path):
    """Starts processes for a test and kills them and their descendants afterwards, pass or fail."""
    from cli_procs import Procs

    started = Procs(tmp_path)
    yield started
    started.kill_all()
