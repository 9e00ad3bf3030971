"""The CANAO chain's figures as a Markdown section, read from its artifacts (never typed in).

`canao search-report --student DIR --benchmarks BENCHMARKS.md` follows a finalize output back
through its search, latency model and supernet manifests and writes what each measured: the
supernet's training, the latency model's held-out error beside the FLOPs proxy's, the search's
front and wall time, and the student's dev-a F1 and speed-up against the issue's goal.
"""

from __future__ import annotations

import json
from pathlib import Path

from canao.bench.suite import SEARCH_SECTION, put_section
from canao.codesign.pareto import FRONT_JSON, RERANKED
from canao.hardware import Hardware
from canao.manifest import verify_stage
from canao.qa.bench import BASELINE, paired_ratios
from canao.qa.finalize import BASELINE_DIR, finalized_figures
from canao.qa.space import SubnetConfig

# The goal for the reported run: at least this speed-up over LiteRT fp32 running the
# teacher, with dev-a F1 no more than this many points below the teacher's.
GOAL_SPEEDUP = 8.0
GOAL_F1_DROP = 1.5


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _label(subnet: dict) -> str:
    return SubnetConfig.from_dict(subnet).label()


def _figure(value: float | None) -> str:
    """Two decimals; "-" for none (a point not re-measured, a rank order of one held-out subnet)."""
    return "-" if value is None else f"{value:.2f}"


def _budget(front: dict) -> str:
    budget, speedup = front["latency_budget_ms"], front["min_speedup"]
    if not budget:
        return "No latency budget."
    litert = front["teacher"]["measured_ms_by_backend"].get("litert")
    if speedup and litert and abs(budget - litert / speedup) < 1e-9:
        return f"Budget {budget:.2f} ms: LiteRT fp32 on the teacher's shape ({litert:.2f} ms) / {speedup:g}."
    return f"Budget {budget:.2f} ms."


def search_report(student_dir: str | Path) -> str:
    """The section's body for the finalize output `student_dir` (benchmarked)."""
    student_dir = Path(student_dir)
    student = verify_stage(student_dir, "finalize", "a student")
    m = student["metrics"]
    if "litert" not in m.get("teacher_ms", {}):
        raise ValueError(f"{student_dir}: finalize timed no teacher on LiteRT fp32 (bench_backends needs litert); "
                         "there is no speed-up to report")
    search_dir = Path(student["inputs"]["search"])
    search = verify_stage(search_dir, "search", "a search")
    latency = verify_stage(search["inputs"]["latency"], "latency", "a latency model")
    supernet = verify_stage(search["inputs"]["supernet"], "distill", "a supernet")
    front = json.loads((search_dir / FRONT_JSON).read_text())

    dm = supernet["metrics"]
    measured_on = Hardware.from_dict(latency["hardware"]).label() if "hardware" in latency else "unrecorded hardware"
    lines = [f"Device {m['device']} ({measured_on}), {m['seq_len']} tokens. Every figure below is read from the "
             f"run's manifests by "
             f"`canao search-report --student {student_dir} --benchmarks BENCHMARKS.md`.", "",
             f"**Supernet** (`canao distill`): {dm['steps']} steps over {dm['train_windows']} training windows "
             f"in {_minutes(dm['train_seconds'])}.", ""]

    lm = latency["metrics"]
    lines += [f"**Latency model** (`canao latency`): {lm['samples']} subnets compiled and timed in "
              f"{_minutes(lm['measure_seconds'])}; error on the held-out subnets:", "",
              "| backend | fitted on | held out | model MAPE % | model Spearman | FLOPs proxy MAPE % "
              "| FLOPs proxy Spearman |", "|---|---|---|---|---|---|---|"]
    for backend, e in lm["error"].items():
        model, proxy = e["model"], e["flops_proxy"]
        lines.append(f"| {backend} | {e['fitted_on']} | {e['heldout']} | {model['mape_pct']} | "
                     f"{_figure(model['spearman'])} | {proxy['mape_pct']} | {_figure(proxy['spearman'])} |")

    sm = search["metrics"]
    rerank = front.get("rerank")  # searches before finalists have none
    finalists = (f", then {_minutes(sm['rerank_seconds'])} distilling each budget's {rerank['per_budget']} "
                 f"finalists (\"after KD\": {rerank['by']}), which each budget ships by") if rerank else ""
    if "finalists_spearman" in sm:
        finalists += (f" (Spearman of the supernet's val F1 to the F1 after KD over the finalists: "
                      f"{sm['finalists_spearman']:.2f})")
    if sm.get("baseline_seconds"):
        finalists += f", then {_minutes(sm['baseline_seconds'])} timing uniform baselines to fit each budget"
    lines += ["", f"**Search** (`canao search`): {sm['trials']} NSGA-II trials ({sm['distinct_subnets']} distinct "
              f"subnets) scored on the last {sm['val_questions']} training questions, which the supernet never saw, in "
              f"{_minutes(sm['search_seconds'])}, then {_minutes(sm['remeasure_seconds'])} re-measuring the front"
              f"{finalists}. {_budget(front)} The teacher's shape scores F1 {front['teacher']['f1']:.2f} on that "
              "slice. The front:", "",
              "| subnet | params M | val F1 | predicted ms | measured ms | backend |" + (" val F1 after KD |" if rerank
                                                                                      else ""),
              "|---|---|---|---|---|---|" + ("---|" if rerank else "")]
    for p in front["front"]:
        lines.append(f"| {p['label']} | {p['params'] / 1e6:.1f} | {p['f1']:.2f} | {p['predicted_ms']:.2f} | "
                     f"{_figure(p['measured_ms'])} | {p['measured_backend'] or p['predicted_backend']} |"
                     + (f" {_figure(p.get(RERANKED))} |" if rerank else ""))

    best = m["student_best_backend"]
    speedup = m["speedup_vs_teacher_litert"]
    f1_drop = m["teacher_f1"] - m["student_best_backend_f1"]
    teacher_litert = m["teacher_ms"]["litert"]
    lines += ["", f"**Student** (`canao finalize`): {_label(m['subnet'])}, {m['params'] / 1e6:.1f} M parameters, "
              f"distilled for {m['steps']} steps in {_minutes(m['train_seconds'])}, scored on {m['questions']} "
              "dev-a questions:", "",
              "| model | runs on | dev-a EM | dev-a F1 |", "|---|---|---|---|",
              f"| teacher | PyTorch fp32 | {m['teacher_exact_match']:.2f} | {m['teacher_f1']:.2f} |",
              f"| student | PyTorch fp32 | {m['exact_match']:.2f} | {m['f1']:.2f} |",
              f"| student | {best}, as compiled | {m['student_best_backend_exact_match']:.2f} | "
              f"{m['student_best_backend_f1']:.2f} |"]
    baseline = m.get("baseline")  # finalize runs before uniform baselines have none
    if baseline:
        lines += [f"| uniform baseline | PyTorch fp32 | {baseline['exact_match']:.2f} | {baseline['f1']:.2f} |",
                  f"| uniform baseline | {baseline['best_backend']}, as compiled | "
                  f"{baseline['best_backend_exact_match']:.2f} | {baseline['best_backend_f1']:.2f} |"]
    rounds = m.get("timing_rounds", 1)  # finalize runs before timing rounds timed once
    timed = (f"timed in turn, {rounds} rounds of a process each (each backend's median p50 ms; a speed-up is the "
             "median of the rounds' ratios)" if rounds > 1 else "timed back to back (p50 ms)")
    lines += ["", f"{'All three' if baseline else 'Both'} compiled alike and {timed}:", "",
              f"| backend | teacher | student |{' uniform baseline |' if baseline else ''} "
              "LiteRT fp32 on the teacher / student |", f"|---|---|---|{'---|' if baseline else ''}---|"]
    for b, ms in m["student_ms"].items():
        beside = [_figure(baseline["ms"].get(b))] if baseline else []
        lines.append("| " + " | ".join([b, _figure(m["teacher_ms"].get(b)), _figure(ms), *beside,
                                        f"{teacher_litert / ms:.2f}x"]) + " |")
    met = speedup >= GOAL_SPEEDUP and f1_drop <= GOAL_F1_DROP
    spread = ""
    if rounds > 1:
        ratios = paired_ratios(m["teacher_ms_rounds"], BASELINE, m["ms_rounds"], best)
        spread = f" (rounds from {min(ratios):.2f}x to {max(ratios):.2f}x)"
    lines += ["", f"Speed-up over LiteRT fp32 on the teacher: **{speedup:.2f}x**{spread} on {best}, at a dev-a F1 "
              f"{f1_drop:.2f} points below the teacher's. Goal (>= {GOAL_SPEEDUP:g}x within {GOAL_F1_DROP:g} F1): "
              f"**{'met' if met else 'not met'}**."]
    if baseline:
        lines += ["", _against_baseline(m, baseline)]
    if m.get("budgets"):
        lines += ["", *_budgets_table(m)]
    return "\n".join(lines) + "\n"


def _budgets_table(m: dict) -> list[str]:
    """Every budget finalize trained a student (and a uniform baseline) for, as deployed."""
    lines = ["Finalized at each budget (the same recipe and steps; compiled, timed in turn with the teacher, "
             "scored as compiled on its fastest backend):", "",
             "| budget | model | config | runs on | p50 ms | LiteRT fp32 on the teacher / model | dev-a F1 | "
             "below the teacher |", "|---|---|---|---|---|---|---|---|"]
    for budget, directory, figures in finalized_figures(m):
        kind = "uniform baseline" if directory.endswith(BASELINE_DIR) else "searched"
        lines.append(f"| {budget} ({figures['budget_ms']:.2f} ms) | {kind} | {_label(figures['subnet'])} | "
                     f"{figures['best_backend']} | {min(figures['ms'].values()):.2f} | "
                     f"{figures['speedup_vs_teacher_litert']:.2f}x | {figures['best_backend_f1']:.2f} | "
                     f"{m['teacher_f1'] - figures['best_backend_f1']:.2f} |")
    return lines


def _against_baseline(m: dict, baseline: dict) -> str:
    """Whether the searched student beats the uniform baseline at equal or lower latency, plainly."""
    student_ms, baseline_ms = min(m["student_ms"].values()), min(baseline["ms"].values())
    gain = m["student_best_backend_f1"] - baseline["best_backend_f1"]
    verdict = ("beats it" if gain > 0 and student_ms <= baseline_ms else
               "does not beat it: the search has earned nothing here" if gain <= 0 else
               "scores higher but runs slower, so it is not at equal latency")
    return (f"Against the uniform baseline ({_label(baseline['subnet'])}, finalized with the same recipe and "
            f"{baseline['steps']} steps): the student runs {student_ms:.2f} ms against {baseline_ms:.2f} ms at "
            f"F1 {gain:+.2f} as deployed; the search {verdict}.")



def write_report(student_dir: str | Path, benchmarks: Path) -> str:
    """Put the report of `student_dir` into `benchmarks`' search section; returns the section body."""
    body = search_report(student_dir)
    put_section(benchmarks, SEARCH_SECTION, body)
    return body
