import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def tmp_results(tmp_path):
    return tmp_path / "results"


def write_suite(path, text: str):
    path.write_text(text)
    return path
