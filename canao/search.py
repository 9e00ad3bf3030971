"""CANAO search and finalize: the accuracy-latency Pareto front of the supernet's subnets on a
device, and the chosen student.

search: Optuna's NSGA-II sampler proposes subnets; each is scored by its F1 with the
supernet's shared weights on a held-out slice of the training file (the last
`val_questions` questions, which distillation never saw; dev-a stays for the final
evaluation only) and by the latency model's prediction for the device (the fastest
backend, i.e. what would be deployed), under a latency budget and an optional parameter
budget (NSGA-II's constraint handling). The front's best points are compiled and measured
on the device again. Output: front.json, front.png, manifest.json.

finalize: the front point with the highest F1 within the budget is extracted into a
standalone model, fine-tuned by distillation from the teacher, scored on dev-a, compiled
for the device and benchmarked against the teacher's shape on the peers.

search-lm: the same search (`pareto_search`, `remeasure`, the front and its plot) for a
decoder supernet: held-out perplexity against predicted ms per generated token.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
from safetensors.torch import load_file

from canao import device_lab
from canao.apps.qa import QAPredictor, evaluate, load_artifact
from canao.bench import BASELINE
from canao.config import (
    BenchConfig,
    CompileConfig,
    FinalizeConfig,
    LMSearchConfig,
    SearchConfig,
    SpaceConfig,
    SquadFeatureConfig,
    config_hash,
    from_dict,
    resolve_path,
    to_dict,
)
from canao.data import squad_metric
from canao.data.squad import build_features, load_squad, postprocess
from canao.distill import IMPORTANCE_FILE, SUPERNET_DIR, fit, kd_loss, load_supernet, sorted_teacher
from canao.hardware import check_same, torch_threads
from canao.latency import LatencyModel, measure
from canao.manifest import read_manifest, reusable, sha256_file, verify_manifest, verify_stage, write_manifest
from canao.models.bert_qa import load_tokenizer
from canao.models.elastic import extract
from canao.space import SearchSpace, SubnetConfig, flops, params

FRONT_JSON = "front.json"
FRONT_PNG = "front.png"

# on_trial(number, params, metrics): the pipeline's hook to log every candidate (e.g. to MLflow).
TrialHook = Callable[[int, dict, dict], None]


def _inputs(supernet_dir: Path, latency_dir: Path, load: Callable, family: str, reuse_other_hardware: bool) -> tuple:
    """The supernet (`load(dir)` -> supernet, manifest) and a latency model of the same family and
    teacher, measured on the hardware its device is now (unless `reuse_other_hardware`)."""
    supernet, supernet_manifest = load(supernet_dir)
    latency_manifest = verify_stage(latency_dir, "latency", "a latency model")
    latency = LatencyModel.load(latency_dir)
    check_same(latency.hardware, device_lab.get_device(latency.device).hardware(), f"{latency_dir}: latency model",
               reuse_other_hardware)
    if latency.family != family:
        raise ValueError(f"{latency_dir}: a latency model of {latency.family} subnets, not of {family} subnets")
    if latency.teacher != supernet.shape:
        raise ValueError(f"{latency_dir}: latency model of a {latency.teacher} teacher, but the supernet in "
                         f"{supernet_dir} is {supernet.shape}")
    return supernet, supernet_manifest, latency, latency_manifest


@dataclasses.dataclass(frozen=True)
class Objectives:
    """What a search trades: an accuracy (a field of every trial and front point) against latency."""

    accuracy: str  # the accuracy's field: "f1" (QA), "perplexity" (generation)
    maximize: bool  # whether a higher accuracy value is better
    accuracy_label: str  # the plot's y axis
    latency_label: str  # the plot's x axis, formatted with the result (device, seq_len)
    baseline: str  # the backend whose time of the teacher's shape `min_speedup` divides: the peer to beat


QA = Objectives("f1", True, "F1 on the held-out training slice (supernet weights)",
                "latency on {device}, seq {seq_len} (ms, log scale)", BASELINE)
GENERATION = Objectives("perplexity", False, "held-out perplexity (supernet weights)",
                        "ms per generated token on {device}, context {seq_len} (log scale)", "llama.cpp")


def pareto_search(cfg, objectives: Objectives, suggest: Callable[[optuna.Trial], object],
                  score: Callable[[object], dict], latency: LatencyModel, count_params: Callable[[object], int],
                  count_flops: Callable[[object], int], first: dict, on_trial: TrialHook | None) -> optuna.Study:
    """NSGA-II over the subnets `suggest(trial)` proposes: the accuracy in `score(subnet)` (a dict
    that may hold more figures; they are kept with the trial) against the latency model's
    prediction for the fastest backend, under `cfg`'s latency and parameter budgets. `first`:
    the parameters of the first trial (the reference subnet)."""

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
    study.enqueue_trial(first)
    study.optimize(objective, n_trials=cfg.trials)
    return study


def remeasure(front: list[dict], objectives: Objectives, count: int,
              measure_one: Callable[[dict], dict[str, float]]) -> None:
    """Measure the `count` most accurate front points on the device again (`measure_one(subnet
    dict)` -> ms by backend), in place."""
    sign = -1 if objectives.maximize else 1
    for point in sorted(front, key=lambda p: sign * p[objectives.accuracy])[:count]:
        ms = measure_one(point["subnet"])
        point["measured_ms_by_backend"] = ms
        point["measured_ms"], point["measured_backend"] = min((v, b) for b, v in ms.items())


def search(cfg: SearchConfig, supernet_dir: str | Path, latency_dir: str | Path, out_dir: str | Path,
           on_trial: TrialHook | None = None) -> dict:
    """The Pareto front (max F1, min predicted latency) of the supernet's subnets; see the module doc."""
    supernet_dir, latency_dir, out_dir = Path(supernet_dir), Path(latency_dir), Path(out_dir)
    if read_manifest(out_dir) is not None:
        raise FileExistsError(f"{out_dir}: already holds a search; choose another --out")
    supernet, supernet_manifest, latency, latency_manifest = _inputs(supernet_dir, latency_dir, load_supernet,
                                                                     "bert-qa", cfg.reuse_other_hardware)
    distill_cfg = supernet_manifest["config"]
    space = SearchSpace(from_dict(SpaceConfig, distill_cfg["space"], "space."), supernet.shape)
    features_cfg = from_dict(SquadFeatureConfig, distill_cfg["features"], "features.")
    train_file = resolve_path(distill_cfg["data"]["train_file"])
    examples = load_squad(train_file)
    distilled_on = distill_cfg["data"]["train_questions"] or len(examples)
    if distilled_on + cfg.val_questions > len(examples):
        raise ValueError(f"val_questions: {cfg.val_questions} from the end of {train_file} overlap the first "
                         f"{distilled_on} the supernet was distilled on ({len(examples)} in all)")
    val_examples = examples[-cfg.val_questions:]
    tokenizer = load_tokenizer(supernet_dir / SUPERNET_DIR)
    val_features = build_features(val_examples, tokenizer, features_cfg)
    vocab, positions = supernet.model.config.vocab_size, supernet.model.config.max_position_embeddings
    f1_cache: dict[SubnetConfig, float] = {}

    def f1_of(subnet: SubnetConfig) -> float:
        if subnet not in f1_cache:
            predictor = QAPredictor(extract(supernet, subnet), tokenizer, features_cfg, cfg.eval_batch_size)
            start, end = predictor.logits(val_features)
            predictions = postprocess(val_examples, val_features, start, end, features_cfg)
            f1_cache[subnet] = squad_metric.score(val_examples, {q: p.text for q, p in predictions.items()})["f1"]
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
    started = time.perf_counter()
    # The teacher's shape first: the reference point, and a seed for the population.
    study = pareto_search(dataclasses.replace(cfg, latency_budget_ms=budget), QA, suggest,
                          lambda s: {"f1": f1_of(s)}, latency, lambda s: params(s, space.teacher, vocab, positions),
                          lambda s: flops(s, space.teacher, latency.seq_len), _trial_params(space.largest(), deepest),
                          on_trial)
    search_seconds = time.perf_counter() - started

    front = _front(study, SubnetConfig)
    compile_cfg = from_dict(CompileConfig, latency_manifest["config"]["compile"], "compile.")
    bench_cfg = from_dict(BenchConfig, latency_manifest["config"]["bench"], "bench.")
    out_dir.mkdir(parents=True, exist_ok=True)
    started_measure = time.perf_counter()
    remeasure(front, QA, cfg.remeasure, lambda subnet: measure(
        SubnetConfig.from_dict(subnet), supernet_dir / SUPERNET_DIR, latency.device, tuple(latency.coefficients),
        compile_cfg, bench_cfg, out_dir / "work"))
    result = {
        "device": latency.device, "seq_len": latency.seq_len,
        "latency_budget_ms": budget, "min_speedup": cfg.min_speedup, "params_budget": cfg.params_budget,
        "teacher": {"subnet": space.largest().to_dict(), "f1": f1_of(space.largest()), "measured_ms_by_backend":
                    teacher_ms, "params": params(space.largest(), space.teacher, vocab, positions)},
        "front": sorted(front, key=lambda p: p["predicted_ms"]),
        "trials": _trials(study, QA),
    }
    (out_dir / FRONT_JSON).write_text(json.dumps(result, indent=1) + "\n")
    plot_front(result, out_dir / FRONT_PNG)
    metrics = {"search_seconds": round(search_seconds, 1),
               "remeasure_seconds": round(time.perf_counter() - started_measure, 1),
               "trials": len(study.trials), "distinct_subnets": len(f1_cache), "front_size": len(front),
               "teacher_val_f1": result["teacher"]["f1"], "val_questions": len(val_examples)}
    inputs = {"supernet": str(supernet_dir.resolve()), "latency": str(latency_dir.resolve()),
              "train_file": {"path": str(train_file), "sha256": sha256_file(train_file)}}
    return write_manifest(out_dir, "search", {"device": latency.device, **to_dict(cfg)}, metrics, inputs,
                          config_hash=config_hash(cfg))


def latency_budget(cfg: SearchConfig | LMSearchConfig, teacher_ms: dict[str, float], baseline: str) -> float:
    """The search's budget in ms: the tighter of `latency_budget_ms` and the teacher's measured
    latency on `baseline` (`teacher_ms`: ms by backend) over `min_speedup`; 0 = none."""
    budgets = [cfg.latency_budget_ms] if cfg.latency_budget_ms else []
    if cfg.min_speedup:
        if baseline not in teacher_ms:
            raise ValueError(f"min_speedup: the latency model holds no {baseline} timing of the teacher's shape "
                             f"(only {', '.join(teacher_ms)}); add {baseline} to the latency stage's backends")
        budgets.append(teacher_ms[baseline] / cfg.min_speedup)
    return min(budgets, default=0.0)


def _trial_params(subnet: SubnetConfig, deepest: int) -> dict:
    pad = deepest - subnet.num_layers
    p = {"num_layers": subnet.num_layers, "hidden_size": subnet.hidden_size}
    for i, (h, f) in enumerate(zip(list(subnet.heads) + [subnet.heads[-1]] * pad,
                                   list(subnet.ffn_sizes) + [subnet.ffn_sizes[-1]] * pad, strict=True)):
        p[f"heads_{i}"], p[f"ffn_{i}"] = h, f
    return p


def _feasible(trial: optuna.trial.FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def _trials(study: optuna.Study, objectives: Objectives) -> list[dict]:
    return [{objectives.accuracy: t.values[0], "predicted_ms": t.values[1], "feasible": _feasible(t)}
            for t in study.trials if t.values]


def _front(study: optuna.Study, subnet_type: type) -> list[dict]:
    """Non-dominated feasible trials, one per distinct subnet."""
    points: dict[str, dict] = {}
    for t in study.best_trials:
        if not _feasible(t):
            continue
        key = json.dumps(t.user_attrs["subnet"], sort_keys=True)
        points.setdefault(key, {
            "trial": t.number, "subnet": t.user_attrs["subnet"],
            "label": subnet_type.from_dict(t.user_attrs["subnet"]).label(), **t.user_attrs["scores"],
            "predicted_ms": t.values[1], "predicted_backend": t.user_attrs["backend"],
            "params": t.user_attrs["params"], "flops": t.user_attrs["flops"],
            "measured_ms": None, "measured_backend": None, "measured_ms_by_backend": None,
        })
    return list(points.values())


def dominated(points: list[dict], objectives: Objectives = QA) -> list[dict]:
    """The points of `points` that another point beats or ties on both accuracy and latency, and
    beats on one."""
    sign = 1 if objectives.maximize else -1

    def position(p):  # larger is better on both axes
        return sign * p[objectives.accuracy], -p["predicted_ms"]

    return [p for p in points
            if any(position(q) != position(p) and all(a >= b for a, b in zip(position(q), position(p), strict=True))
                   for q in points)]


def plot_front(result: dict, path: Path, objectives: Objectives = QA) -> None:
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
    teacher = result["teacher"]
    colors = iter(["tab:red", "tab:green", "tab:purple", "tab:brown"])
    for backend, ms in sorted(teacher["measured_ms_by_backend"].items()):
        ax.axvline(ms, ls="--", c=next(colors), label=f"teacher on {backend}: {ms:.1f} ms")
    ax.axhline(teacher[key], ls=":", c="gray", label=f"teacher {key} {teacher[key]:.1f} (supernet, largest)")
    if result["latency_budget_ms"]:
        ax.axvspan(result["latency_budget_ms"], ax.get_xlim()[1], color="gray", alpha=0.1, label="over budget")
    ax.set_xscale("log")  # backends and subnets span orders of magnitude (untuned TVM vs LiteRT)
    ax.set_xlabel(objectives.latency_label.format(**result))
    ax.set_ylabel(objectives.accuracy_label)
    ax.set_title("CANAO: accuracy vs compiled latency")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def search_lm(cfg: LMSearchConfig, supernet_dir: str | Path, latency_dir: str | Path, out_dir: str | Path,
              on_trial: TrialHook | None = None) -> dict:
    """`canao search-lm`: the Pareto front (min held-out perplexity, min predicted ms per generated
    token) of a decoder supernet's subnets (a `canao distill-lm` output) on the device of a
    `canao latency-lm` model. Perplexity is that of the subnet with the supernet's weights on
    the supernet's held-out text (the first `eval_tokens` tokens; canao.data.text's protocol);
    beside it, its greedy agreement with the teacher: the share of those positions where its
    most likely next token is the teacher's. The front's most accurate points are compiled
    and timed again. Output as `search`'s."""
    from canao.config import DecoderSpaceConfig, LMCompileConfig
    from canao.data.text import HELDOUT_FILE, perplexity, read_text_file
    from canao.distill_lm import corpus_file, distilled_teacher, load_decoder_supernet, torch_device
    from canao.latency import measure_decoder
    from canao.models.llama_lm import load_causal_lm
    from canao.models.llama_lm import load_tokenizer as load_lm_tokenizer
    from canao.space import DecoderSpace, DecoderSubnet, decoder_flops, decoder_params

    supernet_dir, latency_dir, out_dir = Path(supernet_dir), Path(latency_dir), Path(out_dir)
    if read_manifest(out_dir) is not None:
        raise FileExistsError(f"{out_dir}: already holds a search; choose another --out")
    supernet, supernet_manifest, latency, latency_manifest = _inputs(supernet_dir, latency_dir,
                                                                     load_decoder_supernet, "decoder",
                                                                     cfg.reuse_other_hardware)
    space = DecoderSpace(from_dict(DecoderSpaceConfig, supernet_manifest["config"]["space"], "space."), supernet.shape)
    device = torch_device(cfg.torch_device)
    supernet.to(device)
    heldout_file = corpus_file(supernet_manifest, HELDOUT_FILE)
    heldout = read_text_file(heldout_file)
    tokenizer = load_lm_tokenizer(supernet_dir / SUPERNET_DIR)
    config = supernet.model.config
    teacher = perplexity(load_causal_lm(distilled_teacher(supernet_manifest)).to(device), tokenizer, heldout,
                         cfg.eval_tokens, progress=False, top1=True)
    scores: dict[DecoderSubnet, dict] = {}

    def score(subnet: DecoderSubnet) -> dict:
        if subnet not in scores:
            scored = perplexity(extract(supernet, subnet).to(device), tokenizer, heldout, cfg.eval_tokens,
                                progress=False, top1=True)
            scores[subnet] = {"perplexity": scored["perplexity"],
                              "greedy_agreement": float((scored["top1"] == teacher["top1"]).double().mean())}
        return scores[subnet]

    c = space.cfg

    def suggest(trial: optuna.Trial) -> DecoderSubnet:
        return space.validate(DecoderSubnet(trial.suggest_categorical("num_layers", c.layer_counts),
                                            trial.suggest_categorical("kv_heads", c.kv_head_counts),
                                            trial.suggest_categorical("ffn_size", c.ffn_sizes)))

    def count_params(subnet: DecoderSubnet) -> int:
        return decoder_params(subnet, space.teacher, config.vocab_size, config.tie_word_embeddings)

    teacher_ms = latency.measured(space.largest())
    budget = latency_budget(cfg, teacher_ms, GENERATION.baseline)
    started = time.perf_counter()
    study = pareto_search(dataclasses.replace(cfg, latency_budget_ms=budget), GENERATION, suggest, score, latency,
                          count_params, lambda s: decoder_flops(s, space.teacher, latency.seq_len),
                          space.largest().to_dict(), on_trial)
    search_seconds = time.perf_counter() - started

    front = _front(study, DecoderSubnet)
    timing = latency_manifest["config"]
    compile_cfg = from_dict(LMCompileConfig, timing["compile"], "compile.")
    out_dir.mkdir(parents=True, exist_ok=True)
    started_measure = time.perf_counter()
    remeasure(front, GENERATION, cfg.remeasure, lambda subnet: measure_decoder(
        DecoderSubnet.from_dict(subnet), supernet_dir / SUPERNET_DIR, latency.device, tuple(latency.coefficients),
        compile_cfg, timing["new_tokens"], timing["repeats"], out_dir / "work"))
    largest = space.largest()
    result = {
        "device": latency.device, "seq_len": latency.seq_len,
        "latency_budget_ms": budget, "min_speedup": cfg.min_speedup, "params_budget": cfg.params_budget,
        # The largest subnet with the supernet's weights stands for the teacher, as in `search`; the
        # teacher's own perplexity is beside it.
        "teacher": {"subnet": largest.to_dict(), **score(largest), "measured_ms_by_backend": teacher_ms,
                    "params": count_params(largest), "teacher_perplexity": teacher["perplexity"]},
        "front": sorted(front, key=lambda p: p["predicted_ms"]),
        "trials": _trials(study, GENERATION),
    }
    (out_dir / FRONT_JSON).write_text(json.dumps(result, indent=1) + "\n")
    plot_front(result, out_dir / FRONT_PNG, GENERATION)
    metrics = {"search_seconds": round(search_seconds, 1),
               "remeasure_seconds": round(time.perf_counter() - started_measure, 1),
               "trials": len(study.trials), "distinct_subnets": len(scores), "front_size": len(front),
               "teacher_perplexity": teacher["perplexity"],
               "largest_subnet_perplexity": result["teacher"]["perplexity"]}
    inputs = {"supernet": str(supernet_dir.resolve()), "latency": str(latency_dir.resolve()),
              "heldout_file": {"path": str(heldout_file), "sha256": sha256_file(heldout_file)}}
    return write_manifest(out_dir, "search-lm", {"device": latency.device, **to_dict(cfg)}, metrics, inputs,
                          config_hash=config_hash(cfg))


def choose(result: dict, objectives: Objectives = QA) -> dict:
    """The front point to ship: the most accurate one whose latency (measured, else predicted) is
    within the budget."""
    budget = result["latency_budget_ms"]
    fitting = [p for p in result["front"]
               if not budget or (p["measured_ms"] if p["measured_ms"] is not None else p["predicted_ms"]) <= budget]
    if not fitting:
        raise ValueError(f"no front point within the latency budget of {budget} ms")
    sign = 1 if objectives.maximize else -1
    return max(fitting, key=lambda p: sign * p[objectives.accuracy])


def finalize(cfg: FinalizeConfig, teacher_dir: str | Path, supernet_dir: str | Path, search_dir: str | Path,
             out_dir: str | Path) -> dict:
    """The student model directory (save_pretrained layout + manifest with dev EM/F1)."""
    teacher_dir, supernet_dir, search_dir, out_dir = map(Path, (teacher_dir, supernet_dir, search_dir, out_dir))
    search_manifest = verify_stage(search_dir, "search", "a search")
    result = json.loads((search_dir / FRONT_JSON).read_text())
    point = choose(result)
    subnet = SubnetConfig.from_dict(point["subnet"])
    fingerprint = config_hash(cfg) + "-" + search_manifest["files"][FRONT_JSON][:16]
    existing = reusable(out_dir, fingerprint, "student")
    if existing is not None:
        return existing
    torch_threads(cfg.train.threads)
    supernet, supernet_manifest = load_supernet(supernet_dir)
    features_cfg = from_dict(SquadFeatureConfig, supernet_manifest["config"]["features"], "features.")
    teacher = sorted_teacher(teacher_dir, load_file(supernet_dir / IMPORTANCE_FILE))
    student = extract(supernet, subnet)
    tokenizer = load_tokenizer(teacher_dir)
    train_file, eval_file = resolve_path(cfg.data.train_file), resolve_path(cfg.data.eval_file)
    features = build_features(load_squad(train_file, cfg.data.train_questions), tokenizer, features_cfg)
    layer_map = subnet.layer_indices(supernet.shape.num_layers)

    def loss_fn(model, feats, index):
        inputs = feats.model_inputs(index)
        with torch.no_grad():
            target = teacher(**inputs, output_hidden_states=True)
        gold = (feats.start_positions[index], feats.end_positions[index])
        return kd_loss(model(**inputs, output_hidden_states=True), target, layer_map, cfg.kd, gold)

    print(f"finalize: {point['label']} (search F1 {point['f1']:.2f}); fine-tuning on {len(features)} windows",
          flush=True)
    work_dir = out_dir / "checkpoints"
    stats = fit(student, features, loss_fn, cfg.train, cfg.seed, work_dir, fingerprint, desc="student")
    shutil.rmtree(work_dir, ignore_errors=True)
    student.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    eval_examples = load_squad(eval_file, cfg.data.eval_questions)
    metrics, _ = evaluate(QAPredictor(student, tokenizer, features_cfg, cfg.train.eval_batch_size), eval_examples)
    teacher_metrics, _ = evaluate(QAPredictor(teacher, tokenizer, features_cfg, cfg.train.eval_batch_size),
                                  eval_examples)
    metrics.update(stats, teacher_exact_match=teacher_metrics["exact_match"], teacher_f1=teacher_metrics["f1"],
                   f1_drop=teacher_metrics["f1"] - metrics["f1"], subnet=point["subnet"],
                   params=point["params"], search_f1=point["f1"])
    if cfg.benchmark:
        metrics.update(_benchmark(cfg, out_dir, teacher_dir, search_dir, result, eval_examples))
    inputs = {"teacher": str(teacher_dir.resolve()), "supernet": str(supernet_dir.resolve()),
              "search": str(search_dir.resolve()),
              "train_file": {"path": str(train_file), "sha256": sha256_file(train_file)},
              "eval_file": {"path": str(eval_file), "sha256": sha256_file(eval_file)}}
    # `features` in the config: QAPredictor.from_dir windows inputs the way the student was trained.
    config = {**to_dict(cfg), "features": to_dict(features_cfg), "subnet": point["subnet"]}
    return write_manifest(out_dir, "finalize", config, metrics, inputs, config_hash=fingerprint)


def _benchmark(cfg: FinalizeConfig, out_dir: Path, teacher_dir: Path, search_dir: Path, result: dict,
               eval_examples: list) -> dict:
    """Compile the student for the search's device (into out_dir/compiled) and the teacher (a
    scratch directory, removed afterwards) with the latency stage's compiler settings, and
    time both back to back: two timings taken at different times on a shared machine are not
    comparable, so the speed-up never mixes them. The student's fastest backend is then scored
    on `eval_examples` as compiled (an int8 backend loses accuracy of its own), so the speed-up
    comes with the F1 of what runs at that speed."""
    from canao import bench
    from canao.compile import compile_model

    search_manifest = verify_manifest(search_dir)
    latency_manifest = verify_manifest(search_manifest["inputs"]["latency"])
    compile_cfg = from_dict(CompileConfig, latency_manifest["config"]["compile"], "compile.")
    bench_cfg = from_dict(BenchConfig, latency_manifest["config"]["bench"], "bench.")
    compile_cfg = dataclasses.replace(compile_cfg, peers=tuple(b for b in cfg.bench_backends if b != "tvm"))
    device = result["device"]
    student_manifest = compile_model(out_dir, device, compile_cfg, out_dir / "compiled")
    scratch = out_dir / "teacher-compiled"
    try:
        compile_model(teacher_dir, device, compile_cfg, scratch)
        teacher_ms = {r.backend: r.p50_ms for r in bench.bench(scratch, teacher_dir, device, cfg.bench_backends,
                                                                bench_cfg)}
        student_ms = {r.backend: r.p50_ms for r in bench.bench(out_dir / "compiled", out_dir, device,
                                                                cfg.bench_backends, bench_cfg)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    best_ms, best_backend = min((v, b) for b, v in student_ms.items())
    threads = device_lab.get_device(device).threads
    predictor, _, _ = load_artifact(out_dir / "compiled", student_manifest, best_backend, threads)
    compiled_metrics, _ = evaluate(predictor, eval_examples)
    out = {"device": device, "seq_len": compile_cfg.seq_len, "student_ms": student_ms, "teacher_ms": teacher_ms,
           "student_best_backend": best_backend, "student_best_backend_f1": compiled_metrics["f1"],
           "student_best_backend_exact_match": compiled_metrics["exact_match"]}
    if "litert" in teacher_ms:
        out["speedup_vs_teacher_litert"] = teacher_ms["litert"] / best_ms
    return out
