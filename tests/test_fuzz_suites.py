"""Fuzzed suites (tests/fuzz_suites.py): every malformed or hostile suite is refused by `bench validate`,
`bench plan` and `bench run` with exit code 2 and one line naming the problem, no traceback, within
10 s and 1 GiB each, and nothing written under the results, the job store or $BENCH_HOME.

All cases run in one subprocess (one import of bench, a few milliseconds a case) under an address-
space limit of its size at the start plus 1 GiB, with a 10 s alarm per command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_every_fuzzed_suite_is_refused_in_one_line_quickly_and_writes_nothing(tmp_path):
    out = tmp_path / "fuzz.json"
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "BENCH_HOME": str(home)}
    proc = subprocess.run(
        [sys.executable, str(TESTS / "fuzz_suites.py"), str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    cases = res["cases"]
    assert len(cases) >= 100
    problems = []
    for c in cases:
        for cmd, r in c["commands"].items():
            err = r["stderr"].strip()
            lines = err.splitlines()
            why = []
            if r["rc"] != 2:
                why.append(f"exit {r['rc']}")
            if len(lines) != 1 or not lines[0].startswith("bench: ") or "Traceback" in err:
                why.append("not one line")
            missing = [e for e in c["expect"] if e not in err]
            if missing:
                why.append(f"does not name {missing}")
            if r["seconds"] >= 10:
                why.append(f"took {r['seconds']:.1f} s")
            if why:
                problems.append(f"{c['name']} ({cmd}): {', '.join(why)}: {err[:300]!r}")
        if c["written"]:
            problems.append(f"{c['name']}: wrote {c['written'][:5]}")
    assert not problems, "\n".join(problems)
    assert res["peak_growth_bytes"] < 1 << 30  # the process's peak over all cases: each case stayed under 1 GiB
    assert res["bench_home_written"] == []
    print(
        f"{len(cases)} fuzzed suites x 3 commands in {res['total_s']:.1f} s, "
        f"slowest {max(r['seconds'] for c in cases for r in c['commands'].values()):.2f} s, "
        f"peak memory growth {res['peak_growth_bytes'] / 2**20:.0f} MiB"
    )
