"""search: the accuracy-latency Pareto front of the QA supernet's subnets on a device.

Optuna's NSGA-II sampler (canao.codesign.pareto) proposes subnets; each is scored by its F1
with the supernet's shared weights on a held-out slice of the training file (the last
`val_questions` questions, which distillation never saw; dev-a stays for the final
evaluation only) and by the latency model's prediction for the device (the fastest
backend, i.e. what would be deployed), under a latency budget and an optional parameter
budget (NSGA-II's constraint handling); then, with `climb_trials`, a hill-climb from each
budget's best point through its larger neighbours. The front's best points are compiled and measured
on the device again (with `timed_with_teacher`, in turn with the teacher's shape and given in
the frame of the latency stage's timing of it, which the budgets come from). With
`finalists`, each budget's best few points (measured to fit) are distilled briefly and
re-ranked by that F1, which `choose` ships by: the supernet's own F1 misranks the smallest
students. Beside the front, the uniform baseline (canao.qa.space.uniform_baseline)
at the same budget: what the search must beat. Output: front.json, front.png, manifest.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import optuna
import torch
from scipy.stats import spearmanr

from canao.codesign.elastic import extract
from canao.codesign.kd import SUPERNET_DIR, TeacherTargets, fit
from canao.codesign.pareto import (
    FRONT_JSON,
    FRONT_PNG,
    RERANKED,
    Climb,
    Objectives,
    TrialHook,
    choose,
    first_fitting,
    front_budgets,
    front_of,
    latency_budget,
    measured_fields,
    pareto_search,
    plot_front,
    point_ms,
    priced_within,
    remeasure,
    rerank,
    search_budget,
    search_inputs,
    trials_of,
)
from canao.config import TrainConfig, config_hash, from_dict, resolve_path, to_dict
from canao.manifest import read_manifest, sha256_file, write_manifest
from canao.qa.bench import BASELINE
from canao.qa.compile import compile_model
from canao.qa.config import BenchConfig, CompileConfig, QAKDConfig, SearchConfig, SpaceConfig, SquadFeatureConfig
from canao.qa.data import build_features, load_squad, postprocess, squad_score
from canao.qa.distill import kept_targets_of, load_supernet, student_kd_loss, target_layers, teacher_targets
from canao.qa.latency import BERT_QA, Frame, measure, shape_model
from canao.qa.model import load_tokenizer
from canao.qa.predictor import QAPredictor
from canao.qa.space import (
    SearchSpace,
    SubnetConfig,
    flops,
    params,
    uniform_baseline,
    uniform_per_depth,
    uniform_subnets,
)

QA = Objectives("f1", True, "F1 on the held-out training slice (supernet weights)",
                "latency on {device}, seq {seq_len} (ms, log scale)", BASELINE)


def search(cfg: SearchConfig, supernet_dir: str | Path, latency_dir: str | Path, out_dir: str | Path,
           on_trial: TrialHook | None = None) -> dict:
    """The Pareto front (max F1, min predicted latency) of the supernet's subnets; see the module doc."""
    supernet_dir, latency_dir, out_dir = Path(supernet_dir), Path(latency_dir), Path(out_dir)
    if read_manifest(out_dir) is not None:
        raise FileExistsError(f"{out_dir}: already holds a search; choose another --out")
    supernet, supernet_manifest, latency, latency_manifest, device = search_inputs(
        supernet_dir, latency_dir, load_supernet, BERT_QA, cfg.reuse_other_hardware)
    distill_cfg = supernet_manifest["config"]
    space = SearchSpace(from_dict(SpaceConfig, distill_cfg["space"], "space."), supernet.shape)
    features_cfg = from_dict(SquadFeatureConfig, distill_cfg["features"], "features.")
    train_file = resolve_path(distill_cfg["data"]["train_file"])
    examples = load_squad(train_file)
    distilled_on = distill_cfg["data"]["train_questions"] or len(examples)
    if distilled_on + cfg.val_questions > len(examples):
        raise ValueError(f"val_questions: {cfg.val_questions} from the end of {train_file} overlap the first "
                         f"{distilled_on} the supernet was distilled on ({len(examples)} in all)")
    taught = supernet_manifest["inputs"]["teacher"].get("train_questions")  # None: a supernet from before it was kept
    if taught is not None and (taught or len(examples)) + cfg.val_questions > len(examples):
        raise ValueError(f"val_questions: {cfg.val_questions} from the end of {train_file} overlap the first "
                         f"{taught or len(examples)} the teacher was fine-tuned on ({len(examples)} in all): its "
                         "outputs there are memorised, not a test; hold them out of the teacher's data.train_questions")
    val_examples = examples[-cfg.val_questions:]
    tokenizer = load_tokenizer(supernet_dir / SUPERNET_DIR)
    val_features = build_features(val_examples, tokenizer, features_cfg)
    vocab, positions = supernet.model.config.vocab_size, supernet.model.config.max_position_embeddings
    f1_cache: dict[SubnetConfig, float] = {}

    def val_f1(model: torch.nn.Module) -> float:
        start, end = QAPredictor(model, tokenizer, features_cfg, cfg.eval_batch_size).logits(val_features)
        predictions = postprocess(val_examples, val_features, start, end, features_cfg)
        return squad_score(val_examples, {q: p.text for q, p in predictions.items()})["f1"]

    def f1_of(subnet: SubnetConfig) -> float:
        if subnet not in f1_cache:
            f1_cache[subnet] = val_f1(extract(supernet, subnet))
        return f1_cache[subnet]

    c = space.cfg
    deepest = max(c.layer_counts)

    def suggest(trial: optuna.Trial) -> SubnetConfig:
        # Every trial names every layer's choices (a fixed set of variables, which NSGA-II's
        # crossover needs); layers past num_layers are ignored.
        return space.make(
            trial.suggest_categorical("num_layers", c.layer_counts),
            trial.suggest_categorical("hidden_size", c.hidden_sizes),
            [trial.suggest_categorical(f"heads_{i}", c.head_counts) for i in range(deepest)],
            [trial.suggest_categorical(f"ffn_{i}", c.ffn_sizes) for i in range(deepest)],
        )

    teacher_ms = latency.measured(space.largest())
    budget = latency_budget(cfg, teacher_ms, QA.baseline)
    looser = front_budgets(cfg, teacher_ms, QA.baseline)

    def fastest_ms(subnet: SubnetConfig) -> float:
        return latency.fastest(subnet)[0]

    def baseline_candidates(budget_ms: float) -> list[SubnetConfig]:
        """The uniform subnets that may be the budget's baseline (`baseline_within`), largest first."""
        if cfg.baseline_tries:
            return priced_within(uniform_subnets(space), fastest_ms, budget_ms, cfg.baseline_slack, cfg.baseline_tries)
        return [uniform_baseline(space, fastest_ms, budget_ms)]

    # The teacher's shape first (the reference point), then each budget's uniform baseline candidates
    # and each depth's largest uniform subnet priced within it: 96 trials over ~10^9 subnets can miss
    # the deep, thin ones a user tries first (the 2026-12-06 full run's front had none under its 8x
    # budget, where the 6-block baseline scored 42 to its 34), and the baseline candidates, priced
    # within the budget plus `baseline_slack`, may all be over it and so infeasible to NSGA-II (the
    # 2026-12-07 run: its 8x front held 3-block students alone).
    budgets = [budget, *(b["latency_budget_ms"] for b in looser)]  # 0: none
    seeds = [space.largest()]
    for b in budgets:
        candidates = [*baseline_candidates(b), *uniform_per_depth(space, fastest_ms, b)] if b else []
        seeds += [s for s in candidates if s not in seeds]
    started = time.perf_counter()
    climbed = tuple(b for b in budgets if b)
    climb = Climb(climbed, cfg.climb_trials, cfg.climb_per_round, space.larger_neighbours, SubnetConfig.from_dict,
                  lambda s: _trial_params(s, deepest)) if cfg.climb_trials and climbed else None
    study = pareto_search(dataclasses.replace(cfg, latency_budget_ms=search_budget(budget, looser)), QA, suggest,
                          lambda s: {"f1": f1_of(s)}, latency, lambda s: params(s, space.teacher, vocab, positions),
                          lambda s: flops(s, space.teacher, latency.seq_len),
                          [_trial_params(s, deepest) for s in seeds], on_trial, climb)
    search_seconds = time.perf_counter() - started

    front = front_of(study, SubnetConfig)
    compile_cfg = from_dict(CompileConfig, latency_manifest["config"]["compile"], "compile.")
    bench_cfg = from_dict(BenchConfig, latency_manifest["config"]["bench"], "bench.")
    out_dir.mkdir(parents=True, exist_ok=True)
    started_measure = time.perf_counter()

    frame_dir = out_dir / "teacher-shape"  # removed before the manifest is written
    frame = None
    if cfg.timed_with_teacher:
        if BASELINE not in teacher_ms:
            raise ValueError(f"timed_with_teacher: the latency model holds no {BASELINE} timing of the teacher's "
                             f"shape (only {', '.join(teacher_ms)}); add {BASELINE} to the latency stage's backends")
        compile_model(shape_model(space.largest(), supernet_dir / SUPERNET_DIR, frame_dir / "model"), device,
                      dataclasses.replace(compile_cfg, peers=(BASELINE,)), frame_dir / "compiled")
        frame = Frame(frame_dir / "compiled", frame_dir / "model", teacher_ms[BASELINE])

    def measured(subnet: SubnetConfig) -> dict[str, float]:
        return measure(subnet, supernet_dir / SUPERNET_DIR, device, tuple(latency.coefficients), compile_cfg,
                       bench_cfg, out_dir / "work", cfg.remeasure_rounds, frame)

    remeasure(front, QA, cfg.remeasure, lambda subnet: measured(SubnetConfig.from_dict(subnet)), budgets,
              per_budget=max(1, cfg.finalists.count))
    remeasure_seconds = time.perf_counter() - started_measure
    started_rerank = time.perf_counter()
    if cfg.finalists.count:
        if cfg.finalists.questions > distilled_on:
            raise ValueError(f"finalists.questions: {cfg.finalists.questions} is more than the {distilled_on} "
                             "training questions the supernet was distilled on (the rest are held out)")
        rerank(front, QA, budgets, cfg.finalists.count, lambda points: distilled_f1s(
            [SubnetConfig.from_dict(p["subnet"]) for p in points], supernet, space, distill_cfg, cfg,
            build_features(examples[:cfg.finalists.questions], tokenizer, features_cfg), val_f1,
            out_dir / "finalists"))
    rerank_seconds = time.perf_counter() - started_rerank
    result = {
        "device": latency.device, "seq_len": latency.seq_len,
        "latency_budget_ms": budget, "min_speedup": cfg.min_speedup, "params_budget": cfg.params_budget,
        "teacher": {"subnet": space.largest().to_dict(), "f1": f1_of(space.largest()), "measured_ms_by_backend":
                    teacher_ms, "params": params(space.largest(), space.teacher, vocab, positions)},
        "front": sorted(front, key=lambda p: p["predicted_ms"]),
        "trials": trials_of(study, QA),
    }
    if cfg.finalists.count:
        result["rerank"] = {"by": f"F1 on the held-out slice after distillation from the supernet's largest "
                                  f"subnet ({cfg.finalists.epochs:g} epochs over the first {cfg.finalists.questions} "
                                  "training questions)", "per_budget": cfg.finalists.count}

    # The student a user would build without the search, held to each budget (without one, to the
    # latency of the point finalize ships), so the two compare at equal latency: as measured where
    # `baseline_tries` says so (the student's choice is measured too), else as priced.
    def baseline_within(budget_ms: float) -> dict:
        fitted = first_fitting(baseline_candidates(budget_ms), measured, budget_ms) if cfg.baseline_tries else None
        baseline, ms = fitted or (uniform_baseline(space, fastest_ms, budget_ms), None)
        baseline_ms, baseline_backend = latency.fastest(baseline)
        figures = {"subnet": baseline.to_dict(), "label": baseline.label(), "f1": f1_of(baseline),
                   "predicted_ms": baseline_ms, "predicted_backend": baseline_backend,
                   "measured_ms": None, "measured_backend": None,
                   "params": params(baseline, space.teacher, vocab, positions),
                   "flops": flops(baseline, space.teacher, latency.seq_len)}
        return {**figures, **measured_fields(ms)} if ms else figures

    started_baselines = time.perf_counter()
    result["baseline"] = baseline_within(budget or point_ms(choose(result, QA)))
    result["front_budgets"] = [{**b, "baseline": baseline_within(b["latency_budget_ms"])} for b in looser]
    baseline_seconds = time.perf_counter() - started_baselines
    shutil.rmtree(frame_dir, ignore_errors=True)
    result["measured_frame"] = ({"model": "the teacher's shape", "backend": BASELINE, "ms": frame.ms}
                                if frame else None)
    (out_dir / FRONT_JSON).write_text(json.dumps(result, indent=1) + "\n")
    plot_front(result, out_dir / FRONT_PNG, QA)
    metrics = {"search_seconds": round(search_seconds, 1), "remeasure_seconds": round(remeasure_seconds, 1),
               "rerank_seconds": round(rerank_seconds, 1), "baseline_seconds": round(baseline_seconds, 1),
               "trials": len(study.trials), "climb_trials": len(study.trials) - cfg.trials,
               "distinct_subnets": len(f1_cache), "front_size": len(front),
               "teacher_val_f1": result["teacher"]["f1"], "val_questions": len(val_examples)}
    reranked = [p for p in front if RERANKED in p]
    if len(reranked) >= 2:  # how well the supernet's F1 ranks what a short distillation makes of each
        rho = float(spearmanr([p["f1"] for p in reranked], [p[RERANKED] for p in reranked]).statistic)
        if math.isfinite(rho):  # NaN where either side is constant
            metrics["finalists_spearman"] = rho
    inputs = {"supernet": str(supernet_dir.resolve()), "latency": str(latency_dir.resolve()),
              "train_file": {"path": str(train_file), "sha256": sha256_file(train_file)}}
    return write_manifest(out_dir, "search", {"device": latency.device, **to_dict(cfg)}, metrics, inputs,
                          config_hash=config_hash(cfg))


def distilled_f1s(subnets: list[SubnetConfig], supernet, space: SearchSpace, distill_cfg: dict, cfg: SearchConfig,
                  features, val_f1, work_dir: Path) -> list[float]:
    """Each of `subnets` extracted from `supernet`, distilled from its largest subnet on `features`
    as `cfg.finalists` says (the distill stage's KD and train settings otherwise: `distill_cfg`),
    and scored by `val_f1(model)`; `work_dir` (the kept targets, checkpoints) removed afterwards."""
    kd = from_dict(QAKDConfig, distill_cfg["kd"], "kd.")
    train = dataclasses.replace(from_dict(TrainConfig, distill_cfg["train"], "train."),
                                epochs=cfg.finalists.epochs, learning_rate=cfg.finalists.learning_rate)
    teacher = extract(supernet, space.largest()).requires_grad_(False)
    teacher_layers = supernet.shape.num_layers
    layer_maps = [s.layer_indices(teacher_layers) for s in subnets]
    hidden = target_layers(layer_maps, kd, teacher_layers)
    fingerprint = "-".join([config_hash(cfg.finalists), config_hash(kd), str(len(features)),
                            ",".join(map(str, hidden))])
    try:
        targets = TeacherTargets.compute(work_dir / "targets", fingerprint, features.lengths(),
                                         lambda index: teacher_targets(teacher, features.model_inputs(index), hidden),
                                         train.eval_batch_size, train.bf16)
        f1s = []
        for n, (subnet, layer_map) in enumerate(zip(subnets, layer_maps, strict=True)):
            student = extract(supernet, subnet)
            fit(student, features, student_kd_loss(kept_targets_of(targets), layer_map, kd, teacher), train, cfg.seed,
                work_dir / f"finalist-{n}", f"{fingerprint}-{config_hash(subnet)}",
                desc=f"finalist {n + 1}/{len(subnets)}", lengths=features.lengths())
            f1s.append(val_f1(student.eval()))
            print(f"search: finalist {subnet.label()}: F1 {f1s[-1]:.2f} after distillation", flush=True)
        return f1s
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _trial_params(subnet: SubnetConfig, deepest: int) -> dict:
    pad = deepest - subnet.num_layers
    p = {"num_layers": subnet.num_layers, "hidden_size": subnet.hidden_size}
    for i, (h, f) in enumerate(zip(list(subnet.heads) + [subnet.heads[-1]] * pad,
                                   list(subnet.ffn_sizes) + [subnet.ffn_sizes[-1]] * pad, strict=True)):
        p[f"heads_{i}"], p[f"ffn_{i}"] = h, f
    return p
