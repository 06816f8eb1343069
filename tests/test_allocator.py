"""bench.allocator: glibc's malloc keeps freed memory in the process (set once, by `bench` and its Ray
workers); BENCH_MALLOC=default leaves glibc's defaults."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = "from bench.allocator import keep_freed_memory as k; print(k(), k())"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize(("setting", "applied"), [("", "True True"), ("default", "False False")])
def test_settings_apply_once_unless_asked_not_to(setting, applied):
    env = dict(os.environ, BENCH_MALLOC=setting)
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, check=True, capture_output=True, text=True)
    assert out.stdout.split() == applied.split()
