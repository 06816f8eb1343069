"""timing.warmup_batch: the untimed warm-up call samples that many, the timed calls are unchanged."""

import torch
from helpers import job, random_bundle, tiny_suite
from torch import nn

from bench.schema import SuiteDoc
from bench.worker import run_job


class BatchLog(nn.Module):
    """Records the rows of every network call, in order."""

    def __init__(self, net):
        super().__init__()
        self.inner, self.rows = net, []

    def forward(self, x, t, cond):
        self.rows.append(x.shape[0])
        return self.inner(x, t, cond)


def _rows(warmup_batch):
    b = random_bundle("eps")
    log = BatchLog(b.denoiser.net)
    b.denoiser.net = log
    row, samples = run_job(job("ddim", 4, 1.0, 12, 6), b, tiny_suite(warmup=1, warmup_batch=warmup_batch))
    return log.rows, row, samples


def test_warmup_batch_sizes_the_warmup_call_only():
    full_rows, full_row, full_samples = _rows(None)
    small_rows, small_row, small_samples = _rows(2)
    # 4 steps of DDIM: the warm-up's 4 calls come first, then two timed batches of 6
    assert full_rows[:4] == [6] * 4 and full_rows[4:12] == [6] * 8
    assert small_rows[:4] == [2] * 4 and small_rows[4:12] == [6] * 8
    assert small_row["timed_batches"] == full_row["timed_batches"] == 2
    assert small_row["nfe"] == full_row["nfe"] == 4
    assert torch.equal(small_samples, full_samples)  # the warm-up never changes the samples


def test_warmup_batch_validates():
    base = {"models": ["gmm"], "methods": ["ddim"], "steps": [4], "guidance": [1.0], "metrics": []}
    assert SuiteDoc.model_validate({**base, "timing": {"warmup": 1, "warmup_batch": 16}}).timing.warmup_batch == 16
    for bad in (0, "16", 1.5):
        try:
            SuiteDoc.model_validate({**base, "timing": {"warmup": 1, "warmup_batch": bad}})
        except ValueError as e:
            assert "warmup_batch" in str(e)
        else:
            raise AssertionError(f"warmup_batch={bad!r} was accepted")
