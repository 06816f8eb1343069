import os

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _bench_home(tmp_path_factory):
    """Tests build artifacts and reference statistics in a home of their own, never in the user's."""
    old = os.environ.get("BENCH_HOME")
    os.environ["BENCH_HOME"] = str(tmp_path_factory.mktemp("bench-home"))
    yield
    if old is None:
        os.environ.pop("BENCH_HOME", None)
    else:
        os.environ["BENCH_HOME"] = old


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A BENCH_HOME of the test's own: artifacts and calibrations are built afresh in it."""
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny networks (faster than two on a loaded 2-core
    machine, where each op otherwise waits for the second thread); restored afterwards.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tmp_results(tmp_path):
    return tmp_path / "results"


def write_suite(path, text: str):
    path.write_text(text)
    return path
