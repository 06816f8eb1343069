"""Latency as deployed (issue 16): the same sampler call on the digits UNet eager and compiled
(torch.compile, inductor, bench's ``compile: true`` model option), timed side by side in one run
(compile_latency.py; compilation happens in the warm-up, untimed). ``bench_value``: the median of
the paired ratios compiled / eager (below 1: compiling pays), with its bootstrap 95% interval;
the compile time and both medians in ``extra_info``. Inductor needs a C compiler on the CPU
(gcc here) and takes minutes to compile the UNet on two cores.
"""

from __future__ import annotations


def test_compiled_vs_eager_latency(benchmark):
    import compile_latency

    res = benchmark.pedantic(lambda: compile_latency.compare("digits-unet", "inductor", 8, 16, 15), rounds=1, iterations=1)
    benchmark.extra_info["bench_value"] = res["median_of_paired_ratios"]
    benchmark.extra_info["bench_value_ci"] = res["median_of_paired_ratios_ci95"]
    benchmark.extra_info.update(
        {k: res[k] for k in ("eager_median_s", "deployed_median_s", "first_call_s", "max_abs_diff", "deployment")}
    )
    assert res["max_abs_diff"] < 1e-3  # the compiled network computes the same samples
    assert res["compiled_calls"]["compiled"] > 0 and res["compiled_calls"]["eager"] == 0  # every timed call compiled
