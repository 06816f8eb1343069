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
def tmp_results(tmp_path):
    return tmp_path / "results"


def write_suite(path, text: str):
    path.write_text(text)
    return path
