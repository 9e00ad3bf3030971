"""The search any family runs: NSGA-II over a supernet's subnets, an accuracy against the
latency model's prediction for the device, under a latency and a parameter budget; the
Pareto front, its best points measured on the device again, its plot, and the choice of
the point a family finalizes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import optuna

from canao.codesign.latency_model import Family, LatencyModel
from canao.hardware import check_same
from canao.lab import devices
from canao.manifest import verify_stage

FRONT_JSON = "front.json"
FRONT_PNG = "front.png"
# A front point's accuracy after `rerank`'s second look (e.g. a short distillation), which ranks
# before the supernet's own figure wherever a budget's contenders have it.
RERANKED = "reranked"


# on_trial(number, params, metrics): the pipeline's hook to log every candidate (e.g. to MLflow).
TrialHook = Callable[[int, dict, dict], None]


def search_inputs(supernet_dir: Path, latency_dir: Path, load: Callable, family: Family,
                  reuse_other_hardware: bool) -> tuple:
    """The supernet (`load(dir)` -> supernet, manifest), a latency model of the same family and
    teacher, its manifest, and its device, which the latency model must have been measured on
    as that device's hardware is now (unless `reuse_other_hardware`)."""
    supernet, supernet_manifest = load(supernet_dir)
    latency_manifest = verify_stage(latency_dir, "latency", "a latency model")
    latency = LatencyModel.load(latency_dir, family)
    device = devices.get_device(latency.device)
    check_same(latency.hardware, device.hardware(), f"{latency_dir}: latency model", reuse_other_hardware)
    if latency.teacher != supernet.shape:
        raise ValueError(f"{latency_dir}: latency model of a {latency.teacher} teacher, but the supernet in "
                         f"{supernet_dir} is {supernet.shape}")
    return supernet, supernet_manifest, latency, latency_manifest, device


@dataclasses.dataclass(frozen=True)
class Objectives:
    """What a search trades: an accuracy (a field of every trial and front point) against latency."""

    accuracy: str  # the accuracy's field: "f1" (QA), "perplexity" (generation)
    maximize: bool  # whether a higher accuracy value is better
    accuracy_label: str  # the plot's y axis
    latency_label: str  # the plot's x axis, formatted with the result (device, seq_len)
    baseline: str  # the backend whose time of the teacher's shape `min_speedup` divides: the peer to beat
    latency: str = "ms"  # the latency model's metric the search minimises (canao.codesign.latency_model.Metric)


@dataclasses.dataclass(frozen=True)
class Climb:
    """Hill-climbing after NSGA-II, each budget from its most accurate subnet within it: NSGA-II's
    trials sample the neighbourhood of a good point sparsely (the 2026-12-07 full run's best 8x
    points were its seeds, uniform subnets priced 1.2 ms under the budget, and no other of its 96
    trials at their depths came within the budget). Each round evaluates, for every budget, up to
    `per_round` of its best point's `neighbours` that the latency model prices within it and
    that no trial has evaluated, those using the most of the budget first; it ends when `trials`
    are spent or no budget has such a neighbour (its best point is then a local optimum)."""

    budgets: tuple[float, ...]  # ms (> 0), as the latency model prices the objective's latency
    trials: int  # subnets the climb evaluates, beyond NSGA-II's trials
    per_round: int  # neighbours of each budget's best point evaluated a round, at most
    neighbours: Callable[[object], list]  # a subnet -> its one-step-larger variants
    parse: Callable[[dict], object]  # a trial's "subnet" attribute -> the subnet
    params: Callable[[object], dict]  # a subnet -> the trial parameters `suggest` reads back


def pareto_search(cfg, objectives: Objectives, suggest: Callable[[optuna.Trial], object],
                  score: Callable[[object], dict], latency: LatencyModel, count_params: Callable[[object], int],
                  count_flops: Callable[[object], int], seeds: list[dict], on_trial: TrialHook | None,
                  climb: Climb | None = None) -> optuna.Study:
    """NSGA-II over the subnets `suggest(trial)` proposes: the accuracy in `score(subnet)` (a dict
    that may hold more figures; they are kept with the trial) against the latency model's
    prediction of `objectives.latency` for the fastest backend, under `cfg`'s latency and
    parameter budgets. `seeds`: the parameters of the first trials (the reference subnet, then
    any the front must weigh, such as the uniform baselines: the front then holds each of them
    or a point that dominates it). Then the `climb`, if any."""
    latency = latency.of(objectives.latency)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        subnet = suggest(trial)
        predicted_ms, backend = latency.fastest(subnet)
        n_params = count_params(subnet)
        scores = score(subnet)
        metrics = {**scores, "predicted_ms": predicted_ms, "params": n_params, "flops": count_flops(subnet)}
        trial.set_user_attr("subnet", subnet.to_dict())
        trial.set_user_attr("scores", scores)
        trial.set_user_attr("backend", backend)
        trial.set_user_attr("params", n_params)
        trial.set_user_attr("flops", metrics["flops"])
        # Feasible when <= 0; NSGA-II ranks feasible trials first, then by total violation.
        trial.set_constraint("ms_over_budget", predicted_ms - cfg.latency_budget_ms if cfg.latency_budget_ms else -1)
        trial.set_constraint("params_over_budget", n_params - cfg.params_budget if cfg.params_budget else -1)
        print(f"trial {trial.number}: {subnet.label()}: {objectives.accuracy} {metrics[objectives.accuracy]:.2f}, "
              f"{predicted_ms:.2f} ms ({backend}), {n_params / 1e6:.1f} M params", flush=True)
        if on_trial is not None:
            on_trial(trial.number, {**subnet.to_dict(), "backend": backend}, metrics)
        return metrics[objectives.accuracy], predicted_ms

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.NSGAIISampler(population_size=cfg.population_size, seed=cfg.seed)
    study = optuna.create_study(directions=["maximize" if objectives.maximize else "minimize", "minimize"],
                                sampler=sampler)
    for params in seeds:
        study.enqueue_trial(params)
    study.optimize(objective, n_trials=cfg.trials)
    if climb is not None:
        _climb(study, objective, objectives, climb, lambda subnet: latency.fastest(subnet)[0])
    return study


def _climb(study: optuna.Study, objective: Callable, objectives: Objectives, climb: Climb,
           predicted_ms: Callable[[object], float]) -> None:
    sign = 1 if objectives.maximize else -1
    seen = {_subnet_key(t.user_attrs["subnet"]) for t in study.trials}
    left = climb.trials
    while left > 0:
        queued = 0
        for budget in climb.budgets:
            within = [t for t in study.trials if t.values and _feasible(t) and t.values[1] <= budget]
            if not within:
                continue
            best = climb.parse(max(within, key=lambda t: sign * t.values[0]).user_attrs["subnet"])
            steps = [s for s in climb.neighbours(best)
                     if _subnet_key(s.to_dict()) not in seen and predicted_ms(s) <= budget]
            for step in sorted(steps, key=predicted_ms, reverse=True)[:min(climb.per_round, left - queued)]:
                study.enqueue_trial(climb.params(step))
                seen.add(_subnet_key(step.to_dict()))
                queued += 1
        if not queued:
            return
        study.optimize(objective, n_trials=queued)
        left -= queued


def remeasure(front: list[dict], objectives: Objectives, count: int,
              measure_one: Callable[[dict], dict[str, float]], budgets: list[float], per_budget: int = 1) -> None:
    """Measure the `count` most accurate front points on the device again (`measure_one(subnet
    dict)` -> ms by backend), in place; then, for each of `budgets` (ms, 0 = none), the
    `per_budget` most accurate points within it (`contenders`), until all of them are measured
    ones: a point the latency model underpriced leaves its budget once measured, and the next
    most accurate takes its place."""

    def measure(point: dict) -> None:
        point.update(measured_fields(measure_one(point["subnet"])))

    sign = -1 if objectives.maximize else 1
    for point in sorted(front, key=lambda p: sign * p[objectives.accuracy])[:count]:
        measure(point)
    for budget in budgets:
        while unmeasured := [p for p in contenders(front, objectives, budget, per_budget) if p["measured_ms"] is None]:
            measure(unmeasured[0])


def measured_fields(ms: dict[str, float]) -> dict:
    """A point's figures from its timings by backend: those, and the fastest backend and its ms."""
    fastest_ms, fastest = min((v, b) for b, v in ms.items())
    return {"measured_ms_by_backend": ms, "measured_ms": fastest_ms, "measured_backend": fastest}


def priced_within(candidates: list, predicted_ms: Callable[[object], float], budget_ms: float, slack: float,
                  count: int) -> list:
    """The first `count` of `candidates` (best first) the latency model prices within `budget_ms *
    (1 + slack)`: it errs both ways by a few to tens of percent on one shape, so a shape priced
    over a budget may measure within it (`first_fitting` tells)."""
    return [c for c in candidates if predicted_ms(c) <= budget_ms * (1 + slack)][:count]


def first_fitting(candidates: list, measure_one: Callable[[object], dict[str, float]],
                  budget_ms: float) -> tuple[object, dict[str, float]] | None:
    """The first of `candidates` whose measured latency (`measure_one(candidate)` -> ms by backend,
    the fastest counts) is within `budget_ms`, with its timings; None when none is. Each is
    measured in turn until one fits."""
    for candidate in candidates:
        ms = measure_one(candidate)
        if min(ms.values()) <= budget_ms:
            return candidate, ms
    return None


def contenders(front: list[dict], objectives: Objectives, budget_ms: float, count: int) -> list[dict]:
    """The `count` most accurate front points whose latency (measured, else predicted) is within
    `budget_ms` (0 = none), most accurate first."""
    sign = -1 if objectives.maximize else 1
    return sorted(_within(front, budget_ms), key=lambda p: sign * p[objectives.accuracy])[:count]


def rerank(front: list[dict], objectives: Objectives, budgets: list[float], per_budget: int,
           score: Callable[[list[dict]], list[float]]) -> None:
    """Score each budget's `per_budget` contenders (measured: run `remeasure` with the same
    `per_budget` first) again, in place, as `point[RERANKED]`: `score(points)` -> one accuracy
    each (in `objectives`' sense), e.g. after a short distillation, where the supernet's own
    figure misranks the candidates. `choose` then ships the best of a budget by that score."""
    points = {id(p): p for b in budgets for p in contenders(front, objectives, b, per_budget)}
    unscored = [p for p in points.values() if RERANKED not in p]
    if unmeasured := [p["label"] for p in unscored if p["measured_ms"] is None]:
        raise ValueError(f"rerank: contenders not measured yet: {unmeasured}; run remeasure with per_budget first")
    for point, value in zip(unscored, score(unscored), strict=True):
        point[RERANKED] = value


def latency_budget(cfg, teacher_ms: dict[str, float], baseline: str) -> float:
    """The search's budget in ms (`cfg`: a wing's search config): the tighter of `latency_budget_ms`
    and the teacher's measured latency on `baseline` (`teacher_ms`: ms by backend) over
    `min_speedup`; 0 = none."""
    budgets = [cfg.latency_budget_ms] if cfg.latency_budget_ms else []
    if cfg.min_speedup:
        budgets.append(speedup_budget(cfg.min_speedup, teacher_ms, baseline, "min_speedup"))
    return min(budgets, default=0.0)


def speedup_budget(speedup: float, teacher_ms: dict[str, float], baseline: str, field: str) -> float:
    """The latency in ms that is `speedup` times faster than the teacher on `baseline`."""
    if baseline not in teacher_ms:
        raise ValueError(f"{field}: the latency model holds no {baseline} timing of the teacher's shape "
                         f"(only {', '.join(teacher_ms)}); add {baseline} to the latency stage's backends")
    return teacher_ms[baseline] / speedup


def front_budgets(cfg, teacher_ms: dict[str, float], baseline: str) -> list[dict]:
    """The looser budgets finalize also trains a student for (`cfg.front_speedups`), each as
    {"min_speedup", "latency_budget_ms"}, loosest first."""
    return [{"min_speedup": s, "latency_budget_ms": speedup_budget(s, teacher_ms, baseline, "front_speedups")}
            for s in sorted(cfg.front_speedups)]


def search_budget(budget: float, extra: list[dict]) -> float:
    """The budget the search itself runs under: the loosest of the deployed `budget` and the
    `extra` front budgets, so the front covers each; 0 (none) when the deployed one is none."""
    return max([budget, *(b["latency_budget_ms"] for b in extra)]) if budget else 0.0


def _subnet_key(subnet: dict) -> str:
    """One subnet's identity among trials (its dict as a trial's "subnet" attribute holds it)."""
    return json.dumps(subnet, sort_keys=True)


def _feasible(trial: optuna.trial.FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def trials_of(study: optuna.Study, objectives: Objectives) -> list[dict]:
    return [{objectives.accuracy: t.values[0], "predicted_ms": t.values[1], "feasible": _feasible(t)}
            for t in study.trials if t.values]


def front_of(study: optuna.Study, subnet_type: type) -> list[dict]:
    """Non-dominated feasible trials, one per distinct subnet."""
    points: dict[str, dict] = {}
    for t in study.best_trials:
        if not _feasible(t):
            continue
        points.setdefault(_subnet_key(t.user_attrs["subnet"]), {
            "trial": t.number, "subnet": t.user_attrs["subnet"],
            "label": subnet_type.from_dict(t.user_attrs["subnet"]).label(), **t.user_attrs["scores"],
            "predicted_ms": t.values[1], "predicted_backend": t.user_attrs["backend"],
            "params": t.user_attrs["params"], "flops": t.user_attrs["flops"],
            "measured_ms": None, "measured_backend": None, "measured_ms_by_backend": None,
        })
    return list(points.values())


def dominated(points: list[dict], objectives: Objectives) -> list[dict]:
    """The points of `points` that another point beats or ties on both accuracy and latency, and
    beats on one."""
    sign = 1 if objectives.maximize else -1

    def position(p):  # larger is better on both axes
        return sign * p[objectives.accuracy], -p["predicted_ms"]

    return [p for p in points
            if any(position(q) != position(p) and all(a >= b for a, b in zip(position(q), position(p), strict=True))
                   for q in points)]


def plot_front(result: dict, path: Path, objectives: Objectives) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = objectives.accuracy
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    trials = result["trials"]
    ax.scatter([t["predicted_ms"] for t in trials], [t[key] for t in trials], s=10, c="lightgray",
               label="trials (predicted latency)")
    front = result["front"]
    ax.plot([p["predicted_ms"] for p in front], [p[key] for p in front], "o-", c="tab:blue",
            label="Pareto front (predicted)")
    measured = [p for p in front if p["measured_ms"] is not None]
    ax.scatter([p["measured_ms"] for p in measured], [p[key] for p in measured], marker="x", s=60, c="tab:orange",
               label="front, measured on the device", zorder=3)
    # the family's uniform student at each budget, with supernet weights
    for baseline in [b["baseline"] for b in [result, *result.get("front_budgets", [])] if "baseline" in b]:
        how = "measured" if baseline.get("measured_ms") is not None else "predicted"
        ax.scatter([baseline["measured_ms" if how == "measured" else "predicted_ms"]], [baseline[key]], marker="s",
                   s=50, c="black", zorder=3, label=f"uniform baseline ({how}): {baseline['label']}")
    teacher = result["teacher"]
    colors = iter(["tab:red", "tab:green", "tab:purple", "tab:brown"])
    for backend, ms in sorted(teacher["measured_ms_by_backend"].items()):
        ax.axvline(ms, ls="--", c=next(colors), label=f"teacher on {backend}: {ms:.1f} ms")
    ax.axhline(teacher[key], ls=":", c="gray", label=f"teacher {key} {teacher[key]:.1f} (supernet, largest)")
    if result["latency_budget_ms"]:
        ax.axvspan(result["latency_budget_ms"], ax.get_xlim()[1], color="gray", alpha=0.1, label="over budget")
    for b in result.get("front_budgets", []):
        ax.axvline(b["latency_budget_ms"], ls="-.", c="gray", label=f"{b['min_speedup']:g}x budget")
    ax.set_xscale("log")  # backends and subnets span orders of magnitude (untuned TVM vs LiteRT)
    ax.set_xlabel(objectives.latency_label.format(**result))
    ax.set_ylabel(objectives.accuracy_label)
    ax.set_title("CANAO: accuracy vs compiled latency")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def point_ms(point: dict) -> float:
    """A front point's latency: measured where the search re-measured it, else predicted."""
    return point["measured_ms"] if point["measured_ms"] is not None else point["predicted_ms"]


def choose(result: dict, objectives: Objectives, budget_ms: float | None = None) -> dict:
    """The front point to ship: of the points whose latency (measured, else predicted) is within
    `budget_ms` (default: the search's deployed budget, `latency_budget_ms`), the best by
    `rerank`'s score where any has one, else the most accurate."""
    budget = result["latency_budget_ms"] if budget_ms is None else budget_ms
    point = _most_accurate_within(result["front"], objectives, budget)
    if point is None:
        raise ValueError(f"no front point within the latency budget of {budget} ms")
    return point


def _within(front: list[dict], budget_ms: float) -> list[dict]:
    """The front points whose latency (measured, else predicted) is within `budget_ms` (0 = none)."""
    return [p for p in front if not budget_ms or point_ms(p) <= budget_ms]


def _most_accurate_within(front: list[dict], objectives: Objectives, budget_ms: float) -> dict | None:
    fitting = _within(front, budget_ms)
    key = RERANKED if any(RERANKED in p for p in fitting) else objectives.accuracy
    sign = 1 if objectives.maximize else -1
    return max((p for p in fitting if key in p), key=lambda p: sign * p[key], default=None)
