"""``bench report RUN``: reports/<run-id>/index.html and the PNGs it shows, from a run's files only."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import yaml

from bench.paths import REPO
from bench.report import fmt
from bench.report.cache_speedups import cache_speedups, cache_speedups_html, cache_speedups_markdown
from bench.report.charts import colours, pareto_figure, speedup_figure
from bench.report.clips import clip_figures, clips_html
from bench.report.data import Run, RunError, config_label, higher_is_better, load_run, merge_runs, method_label
from bench.report.deployment import deployment_note
from bench.report.grids import grid_figures, slug
from bench.report.html import esc, figure, page
from bench.report.leaderboard import build_leaderboard
from bench.report.matched import DEFAULT_QUALITY_TOL, ReferenceSpec, Speedups, choose_references, matched_speedups, specs_from
from bench.report.paired import HEADER as PAIRED_HEADER
from bench.report.paired import paired_intervals, paired_rows

if TYPE_CHECKING:
    from bench.compare import Comparison

REPORTS = REPO / "reports"


@dataclass
class Report:
    """What ``build_report`` wrote: the page, and the numbers behind its verdicts."""

    index: Path
    speedups: Speedups
    comparison: Comparison | None = None

    @property
    def dir(self) -> Path:
        return self.index.parent


def build_report(
    run: str | Path | Run | Sequence[str | Path | Run],
    out: Path | None = None,
    baseline: str | Path | Run | None = None,
    reference: Sequence[ReferenceSpec] = (),
    metric: str | None = None,
    quality_tol: float = DEFAULT_QUALITY_TOL,
    cost: str = "latency_per_image_s",
    match_ci: bool = True,
    match: str = "ci",
    compare_quality_tol: float | None = None,
    compare_speed_tol: float | None = None,
    progress: bool = False,
) -> Report:
    """Write the report of ``run`` into ``out`` (default reports/<run-id>/): index.html, its PNGs,
    leaderboard.md and, with a baseline, compare.md. Several runs (of suites sharing models and seeds)
    are reported as one table (``merge_runs``): one Pareto, one speedup chart, one leaderboard."""
    from bench.compare import DEFAULT_QUALITY_TOL as CMP_Q
    from bench.compare import DEFAULT_SPEED_TOL as CMP_S
    from bench.compare import compare_runs

    if isinstance(run, (str, Path, Run)):
        run = run if isinstance(run, Run) else load_run(run)
    else:
        run = merge_runs([r if isinstance(r, Run) else load_run(r) for r in run])
    ok = run.ok
    if ok.empty:
        raise RunError(f"{run.path}: no job finished, nothing to report; see the errors in its results.parquet")
    metrics = run.metrics
    if not metrics:
        raise RunError(f"{run.path}: the results hold no metric values")
    metric = metric or metrics[0]
    if metric not in metrics:
        raise RunError(f"metric {metric!r} has no values in {run.path}; choose one of {', '.join(metrics)}")
    out = Path(out) if out is not None else REPORTS / run.run_id
    out.mkdir(parents=True, exist_ok=True)
    for pattern in (
        "pareto_*.png",
        "grid_*.png",
        "clip_*.png",
        "clip_*.gif",
        "speedup_vs_training.png",
        "screenshot.png",
        "compare.md",
        "cache_speedups.md",
        "paired.md",
        "per_category.md",
        "accuracy_windows.md",
    ):
        for old in out.glob(pattern):  # figures of an earlier report of this run: the page must show only this one's
            old.unlink()

    suite = run.record.get("suite") or {}
    specs = list(reference) or specs_from(suite.get("reference"))
    refs = choose_references(ok, metric, specs)
    if match not in ("ci", "paired"):
        raise RunError(f"match must be 'ci' or 'paired', got {match!r}")
    pairs = None
    if match == "paired":
        pairs = paired_intervals(run, ok, metric, refs, bootstrap=int((run.record.get("suite") or {}).get("bootstrap") or 100))
    if match == "paired" and not pairs:
        raise RunError(
            f"--match paired needs the run's samples and a pairable metric ({metric!r} cannot be paired here); use --match ci"
        )
    sp = matched_speedups(ok, metric, refs, quality_tol, cost, match_ci, pairs)
    palette = colours(sorted({method_label(r) for _, r in ok.iterrows()}))
    from bench.history.audit import inert_rows  # here: bench.history imports bench.report

    inert = inert_rows(ok)  # caches that compute every unit: flagged on the leaderboard and in the caching table
    lb = build_leaderboard(ok, sp, metrics, inert)
    sections: list[tuple[str, str, str]] = []

    # what the report measures against
    ref_rows = [[m, r.label, r.rule] for m, r in refs.items()]
    how = (
        f"<p>Quality metric for matching: <b>{esc(metric)}</b> ({'higher' if higher_is_better(metric) else 'lower'} is "
        f"better, from the metric registry). A configuration <i>matches</i> when its <b>{esc(sp.rule())}</b>. "
        "<i>Speedup at matched quality</i> of a "
        f"method = reference {esc(cost)} / {esc(cost)} of the method's cheapest matching configuration (any knobs, steps, "
        "guidance). MMHM (arXiv 2603.14186): each component metric min-max normalised over all finished jobs of the model "
        "(1 = best), harmonic mean of the components; components: "
        + esc("; ".join(f"{m}: {', '.join(c)}" for m, c in lb.mmhm_components.items()))
        + ".</p>"
    )
    how += reference_sets_html(ok)
    how += deployment_note(ok)  # latencies under different dtype / compile / memory format: said
    sections.append(
        (
            "reference",
            "Reference configuration and tolerance",
            how + fmt.html_table(["model", "reference", "how chosen"], ref_rows),
        )
    )

    # leaderboard
    body = []
    for model, rows in lb.tables.items():
        body.append(f"<h3>{esc(model)}</h3>")
        body.append(fmt.html_table(lb.header, rows, lb.row_classes[model]))
    body.append("<p class=\"meta\">Highlighted: the reference. Grey: no configuration within tolerance (its best-quality "
                "configuration is shown, unranked). Latency: median over timed batches, per image.</p>")  # fmt: skip
    sections.append(("leaderboard", "Leaderboard", "\n".join(body)))
    md = f"# Leaderboard: {run.suite_name} / {run.run_id}\n\n" + lb.markdown(sp)
    (out / "leaderboard.md").write_text(md)

    # the suite's accuracy windows (MLPerf's), and metrics per prompt category (a named prompt set)
    from bench.report.categories import categories_html, categories_markdown, category_tables
    from bench.report.windows import check_windows, windows_html, windows_markdown, windows_of

    windows = windows_of(suite)
    if windows:
        checks = check_windows(ok, windows)
        sections.append(("windows", "Accuracy windows", windows_html(checks)))
        (out / "accuracy_windows.md").write_text(windows_markdown(checks))
    cat_tables = category_tables(ok)
    if cat_tables:
        sections.append(("categories", "Metrics per prompt category", categories_html(cat_tables)))
        (out / "per_category.md").write_text(categories_markdown(cat_tables))

    # the leaderboard's configurations against the reference, paired over the shared seeds
    prs = paired_rows(run, ok, sp)
    if prs:
        intro = (
            f"<p>{esc(metric)} of each leaderboard configuration minus the reference's, bootstrapped over the same index "
            "draws for both (every job samples seed k for sample k): the variation the two share cancels, so this interval "
            "is much narrower than the two separate CIs. <i>indistinguishable</i>: the 95% interval contains 0.</p>"
        )
        sections.append(("paired", "Paired against the reference", intro + fmt.html_table(PAIRED_HEADER, prs)))
        (out / "paired.md").write_text(f"# Paired {metric} against the reference\n\n" + fmt.markdown_table(PAIRED_HEADER, prs))

    # caching jobs: FLOPs-implied against measured speedup over the uncached reference
    cs = cache_speedups(ok, specs, inert)
    if len(cs):
        sections.append(("caching", "Caching: FLOPs-implied and measured speedups", cache_speedups_html(cs)))
        (out / "cache_speedups.md").write_text(cache_speedups_markdown(cs))
    if inert:
        rows = [[ok.loc[i, "model"], config_label(ok.loc[i]), why] for i, why in inert.items()]
        intro = (
            "<p>These caching configurations skip nothing: every unit the cache enters is computed "
            "(<code>units_fraction</code> = 1, counted on 2 samples), or no unit was counted at all. Their knobs make the "
            "cache inert; any speedup they show is not the cache's. Marked [inert] on the leaderboard.</p>"
        )
        html = intro + fmt.html_table(["model", "configuration", "finding"], rows, ["inert"] * len(rows))
        sections.append(("inert", f"Inert caches ({len(rows)})", html))
        (out / "inert_caches.md").write_text(
            "# Inert caches\n\n" + fmt.markdown_table(["model", "configuration", "finding"], rows)
        )

    # speedup versus training cost
    costs = teacher_costs(sorted(ok["model"].unique()))
    png = speedup_figure(sp, out / "speedup_vs_training.png", costs)
    cap = (
        f"One point per method: y = speedup at matched quality ({esc(sp.rule())}), "
        "x = training class, position within the class by measured training cost; colours: family."
        + (" Star: the teacher network's own training (its committed record), for scale." if costs else "")
    )
    sections.append(("speedup", "Speedup versus training cost", figure(png, cap, "speedup versus training cost")))

    # Pareto frontiers
    body = []
    for model in sorted(ok["model"].unique()):
        mets = [m for m in metrics if ok.loc[ok["model"] == model, m].notna().any()]
        png = pareto_figure(ok, model, mets, out / f"pareto_{slug(model)}.png", palette)
        cap = (
            f"{esc(model)}: each quality metric against latency per image, NFE and FLOPs per image. Bars: 95% bootstrap CI. "
            "Dashed: the Pareto frontier (point estimates); ringed points are on it, labelled 'method steps'; faded points are "
            "dominated even at the favourable ends of the CIs. Markers: guidance scale."
        )
        body.append(figure(png, cap, f"Pareto frontiers of {model}"))
    sections.append(("pareto", "Pareto frontiers", "\n".join(body)))

    # sample grids (images, vectors) and clips (video samples: frame strips and animations)
    grids = grid_figures(run, out)
    clips = clip_figures(run, out)
    body = [
        figure(p, f"{esc(m)}, guidance {g:g}: rows are methods, columns step counts; every cell starts from the same seeds.", f"samples of {m} at guidance {g:g}")
        for m, g, p in grids
    ]  # fmt: skip
    if clips:
        body.append(clips_html(clips))
    if not body:
        body = ["<p>This run kept no samples (jobs/&lt;job-id&gt;/samples.npy), so there are no grids.</p>"]
    sections.append(("samples", "Samples: same seeds across methods and steps", "\n".join(body)))

    # baseline comparison
    verdict = ""
    cmp = None
    if baseline is not None:
        base = baseline if isinstance(baseline, Run) else load_run(baseline)
        cmp = compare_runs(
            base,
            run,
            CMP_Q if compare_quality_tol is None else compare_quality_tol,
            CMP_S if compare_speed_tol is None else compare_speed_tol,
            specs,
            progress=progress,
        )
        (out / "compare.md").write_text(cmp.markdown())
        cls = "pass" if cmp.ok else "fail"
        verdict = f' Against baseline {esc(base.run_id)}: <span class="{cls}">{"PASS" if cmp.ok else "FAIL"}</span>.'
        body = [f"<p>Baseline: <code>{esc(base.path)}</code>.{verdict}</p>", "<ul>"]
        body += [f"<li><b>regression</b>: {esc(r)}</li>" for r in cmp.regressions]
        body += [f"<li>{esc(n)}</li>" for n in cmp.notes]
        body += ["</ul>", f"<pre>{esc(cmp.markdown().split(chr(10) + chr(10))[0])}</pre>"]
        body.append(fmt.html_table(cmp.header, cmp.rows, ["regression" if f else "" for f in cmp.flagged]))
        sections.append(("baseline", "Comparison with the baseline", "\n".join(body)))

    # everything, and what failed
    failed = run.df[run.df["status"] != "ok"]
    if len(failed):
        rows = [[r["model"], config_label(r), str(r.get("error", ""))[:300]] for _, r in failed.iterrows()]
        sections.append(("failed", f"Failed jobs ({len(failed)})", fmt.html_table(["model", "configuration", "error"], rows)))
    cols = ["model", "configuration", "nfe", "latency/img", "IQR", "FLOPs/img"] + metrics + ["train cost", "artifact", "job"]
    rows = []
    for _, r in ok.iterrows():
        rows.append(
            [r["model"], config_label(r), fmt.num(r["nfe"]), fmt.ms(r["latency_per_image_s"]),
             fmt.ms(fmt_div(r.get("latency_iqr_s"), r.get("batch_size"))), fmt.flops(r["flops"])]
            + [fmt.ci(r[m], r.get(f"{m}_ci_low"), r.get(f"{m}_ci_high")) for m in metrics]
            + [fmt.duration(r.get("train_cost_s")), str(r.get("artifact_id") or "-"), str(r["job_id"])]
        )  # fmt: skip
    sections.append(
        ("all", f"All finished jobs ({len(ok)})", "<details><summary>show</summary>" + fmt.html_table(cols, rows) + "</details>")
    )
    sections.append(("provenance", "Provenance", provenance_html(run)))

    rec = run.record
    subtitle = (
        f"suite <b>{esc(run.suite_name)}</b> · run <b>{esc(run.run_id)}</b> · git {esc(str(rec.get('git_sha', 'unknown'))[:12])} · "
        f"{esc(rec.get('finished') or rec.get('started') or '')} · {len(ok)} finished, {len(failed)} failed jobs.{verdict}<br>"
        f"Every number on this page is computed from this run's own files (<code>{esc(', '.join(map(str, run.dirs or (run.path,))))}</code>); none is quoted from "
        "elsewhere."
    )
    index = out / "index.html"
    index.write_text(page(f"bench report: {run.suite_name} / {run.run_id}", sections, subtitle))
    return Report(index, sp, cmp)


def teacher_costs(models: list[str]) -> dict[str, float]:
    """Wall seconds of each embedded teacher's own training, from the record committed beside its
    weights (``bench/assets/<name>.json``); models without one (a diffusers pipeline) are left out."""
    out = {}
    for label in models:
        rec = REPO / "bench" / "assets" / f"{str(label).split('[')[0]}.json"
        try:
            out[label] = float(json.loads(rec.read_text())["wall_s"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def reference_sets_html(ok: pd.DataFrame) -> str:
    """Which real-image reference each row's set metrics (FID, KID, precision, recall) used."""
    if "reference_set" not in ok:
        return (
            "<p>Reference set of FID/KID/precision/recall: not recorded by this run (the training digits, on digits models).</p>"
        )
    sets = ok["reference_set"].fillna("").replace("", "default").astype(str)
    parts = [f"<b>{esc(name)}</b> ({n} jobs)" for name, n in sets.value_counts().sort_index().items()]
    note = ""
    if (sets == "digits-heldout").any():
        note = (
            " <i>digits-heldout</i>: the 500 digits no teacher or student was trained on, so a student that memorised the "
            "training digits gains nothing by it."
        )
    return f"<p>Reference set of the set metrics (FID, KID, precision, recall): {', '.join(parts)}.{note}</p>"


def fmt_div(a: object, b: object) -> float:
    try:
        return float(a) / float(b)  # type: ignore[arg-type]
    except (TypeError, ValueError, ZeroDivisionError):
        return float("nan")


def provenance_html(run: Run) -> str:
    rec = run.record
    if not rec:
        return f"<p>No run.json beside {esc(run.path)}: only the table's own columns are known.</p>"
    suite = rec.get("suite") or {}
    rows = [
        ["suite", f"{suite.get('name', run.suite_name)} ({suite.get('source', '?')})"],
        ["description", suite.get("description", "")],
        ["run id", rec.get("run_id", "")],
        ["command", rec.get("command", "")],
        ["started / finished", f"{rec.get('started', '?')} / {rec.get('finished', '?')}"],
        ["git sha", rec.get("git_sha", "")],
        ["jobs", json.dumps(rec.get("jobs", {}))],
    ]
    rows += [[f"version: {k}", v] for k, v in sorted((rec.get("versions") or {}).items())]
    rows += [[f"device: {k}", v] for k, v in sorted((rec.get("device") or {}).items())]
    shas = sorted(set(run.df["git_sha"].dropna().astype(str))) if "git_sha" in run.df else []
    if len(shas) > 1:
        rows.append(["git sha of jobs", ", ".join(shas) + " (the run was resumed across commits)"])
    skipped = rec.get("skipped_pairs") or []
    body = fmt.html_table(["field", "value"], rows)
    if skipped:
        body += "<p>Skipped (not applicable):</p><ul>" + "".join(f"<li>{esc(s)}</li>" for s in skipped) + "</ul>"
    body += "<details><summary>resolved suite</summary><pre>" + esc(yaml.safe_dump(suite, sort_keys=False)) + "</pre></details>"
    return body
