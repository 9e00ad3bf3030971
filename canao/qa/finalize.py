"""finalize: the front point with the highest F1 within the budget, extracted into a
standalone model, fine-tuned by distillation from the teacher, scored on dev-a, compiled
for the device and benchmarked against the teacher's shape on the peers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from canao.codesign.elastic import extract
from canao.codesign.kd import IMPORTANCE_FILE, SUPERNET_DIR, TeacherTargets, fit
from canao.codesign.pareto import FRONT_JSON, choose
from canao.config import TrainConfig, config_hash, from_dict, resolve_path, to_dict
from canao.hardware import torch_threads
from canao.lab import devices
from canao.manifest import reusable, sha256_file, verify_manifest, verify_stage, write_manifest, write_text_atomic
from canao.qa.augment import with_copies
from canao.qa.bench import BASELINE, median_ms, speedup, timed_in_turn
from canao.qa.compile import compile_model
from canao.qa.config import BenchConfig, CompileConfig, FinalizeConfig, QAKDConfig, SquadFeatureConfig
from canao.qa.data import Features, build_features, load_squad
from canao.qa.distill import (
    kept_targets_of,
    load_supernet,
    sorted_teacher,
    student_kd_loss,
    target_layers,
    teacher_targets,
)
from canao.qa.model import load_qa_model, load_tokenizer
from canao.qa.predictor import QAPredictor, evaluate, load_artifact
from canao.qa.search import QA
from canao.qa.space import SubnetConfig

BASELINE_DIR = "baseline"  # the uniform baseline's model, inside the student's directory
BUDGETS_DIR = "budgets"  # the students of the search's looser budgets (`front_speedups`), one directory each
# a finished distillation's figures beside its weights: in the work directory (a resumed finalize)
# and in each model directory with its `model_key` (a later finalize reuses it)
STATS_FILE = "fit.json"
WEIGHTS_FILE = "model.safetensors"  # save_pretrained's weights of the teacher and the supernet
# The deployed student's benchmark figures are named student_<key> in finalize's metrics.
STUDENT_PREFIXED = ("ms", "best_backend", "best_backend_f1", "best_backend_exact_match")


def finalized_figures(metrics: dict) -> list[tuple[str, str, dict]]:
    """Every model a finalize manifest's `metrics` record, as (budget, directory relative to the
    output, figures): the deployed student first ("deployed", "."), then each looser budget's
    student, each followed by its uniform baseline where one was trained ("<dir>/baseline")."""
    deployed = {**metrics, **{k: metrics[f"student_{k}"] for k in STUDENT_PREFIXED if f"student_{k}" in metrics}}
    students = [("deployed", ".", deployed)] + [(name, f"{BUDGETS_DIR}/{name}", figures)
                                                for name, figures in metrics.get("budgets", {}).items()]
    models = []
    for budget, directory, figures in students:
        models.append((budget, directory, figures))
        if figures.get("baseline"):
            models.append((budget, f"{directory}/{BASELINE_DIR}", figures["baseline"]))
    return models


@dataclasses.dataclass(frozen=True)
class Finalized:
    """One model finalize trains: the front point chosen within a budget, or that budget's
    uniform baseline."""

    budget: str  # "" for the deployed budget, else a looser one's speed-up, e.g. "4x"
    is_baseline: bool
    origin: dict  # the front point or baseline entry of front.json it comes from
    budget_ms: float  # the latency budget it was chosen within (0: none)

    @property
    def name(self) -> str:  # "student", "baseline", "4x", "4x/baseline"
        own = "baseline" if self.is_baseline else ""
        return "/".join(filter(None, [self.budget, own])) or "student"

    @property
    def directory(self) -> str:  # relative to finalize's output directory
        return "/".join(filter(None, [self.budget and f"{BUDGETS_DIR}/{self.budget}",
                                      self.is_baseline and BASELINE_DIR]))


def plan(result: dict, with_baseline: bool) -> list[Finalized]:
    """What finalize trains for a search `result` (front.json): the deployed budget's student,
    then per looser budget the front's most accurate point within it, each followed by its
    budget's uniform baseline when `with_baseline` and the search made one."""
    models = []
    for label, budget in [("", result)] + [(f"{b['min_speedup']:g}x", b) for b in result.get("front_budgets", [])]:
        ms = budget["latency_budget_ms"]
        models.append(Finalized(label, False, choose(result, QA, ms), ms))
        if with_baseline and "baseline" in budget:
            models.append(Finalized(label, True, budget["baseline"], ms))
    return models


def finalize(cfg: FinalizeConfig, teacher_dir: str | Path, supernet_dir: str | Path, search_dir: str | Path,
             out_dir: str | Path, reuse: list[Path] = ()) -> dict:
    """The student model directory (save_pretrained layout + manifest with dev EM/F1); beside it,
    in `BASELINE_DIR`, the search's uniform baseline finalized alike, so its figures compare, and
    in `BUDGETS_DIR`, the students (and baselines) of the search's looser budgets. A model already
    distilled alike in one of the finished finalize outputs `reuse` (same recipe, subnet, teacher
    and supernet: `model_key`) is copied from there instead of trained again; every model is
    scored, compiled and timed anew."""
    teacher_dir, supernet_dir, search_dir, out_dir = map(Path, (teacher_dir, supernet_dir, search_dir, out_dir))
    search_manifest = verify_stage(search_dir, "search", "a search")
    result = json.loads((search_dir / FRONT_JSON).read_text())
    models = plan(result, cfg.baseline)
    fingerprint = config_hash(cfg) + "-" + search_manifest["files"][FRONT_JSON][:16]
    existing = reusable(out_dir, fingerprint, "student")
    if existing is not None:
        return existing
    torch_threads(cfg.train.threads)
    supernet, supernet_manifest = load_supernet(supernet_dir)
    features_cfg = from_dict(SquadFeatureConfig, supernet_manifest["config"]["features"], "features.")
    teacher = sorted_teacher(teacher_dir, load_file(supernet_dir / IMPORTANCE_FILE))
    tokenizer = load_tokenizer(teacher_dir)
    train_file, eval_file = resolve_path(cfg.data.train_file), resolve_path(cfg.data.eval_file)
    features = build_features(with_copies(load_squad(train_file, cfg.data.train_questions), cfg.augment),
                              tokenizer, features_cfg)
    teacher_layers = supernet.shape.num_layers
    subnets = {m.name: kept_blocks(SubnetConfig.from_dict(m.origin["subnet"]), teacher_layers) for m in models}
    work_dir = out_dir / "checkpoints"
    train_sha256 = sha256_file(train_file)
    contents = [*(sha256_file(path) for path in (teacher_dir / WEIGHTS_FILE, supernet_dir / SUPERNET_DIR / WEIGHTS_FILE,
                                                 supernet_dir / IMPORTANCE_FILE)), train_sha256]
    keys = {m.name: model_key(cfg, not m.budget, subnets[m.name], features_cfg, contents) for m in models}
    distilled_before = _distilled_models(reuse)
    # One teacher pass serves every student to train: the hidden states any of them learns from.
    hidden = target_layers([subnets[m.name].layer_indices(teacher_layers) for m in models
                            if keys[m.name] not in distilled_before], cfg.kd, teacher_layers)
    targets = None
    eval_examples = load_squad(eval_file, cfg.data.eval_questions)
    teacher_metrics, _ = evaluate(QAPredictor(teacher, tokenizer, features_cfg, cfg.train.eval_batch_size),
                                  eval_examples)
    scores, done = {}, {}  # done: subnet -> the model that trained it (two budgets may choose the same point)
    for m in models:
        subnet, directory = subnets[m.name], out_dir / m.directory
        if subnet in done:
            trained = done[subnet]
            print(f"finalize: {m.name} is {trained.name}'s subnet; copying it", flush=True)
            _copy_model(out_dir / trained.directory, directory)
            scores[m.name] = {**scores[trained.name], "budget": m.budget or "deployed", "budget_ms": m.budget_ms}
            continue
        if keys[m.name] in distilled_before:
            source = distilled_before[keys[m.name]]
            print(f"finalize: {m.name} {m.origin['label']} was distilled alike in {source}; copying it", flush=True)
            _copy_model(source, directory)
            student, stats = load_qa_model(directory), json.loads((directory / STATS_FILE).read_text())["stats"]
            stats = {**stats, "reused_from": str(source)}
        else:
            print(f"finalize: {m.name} {m.origin['label']} (search F1 {m.origin['f1']:.2f}); fine-tuning on "
                  f"{len(features)} windows", flush=True)
            if targets is None:
                targets = TeacherTargets.compute(
                    work_dir / "teacher-targets", fingerprint, features.lengths(),
                    lambda index: teacher_targets(teacher, features.model_inputs(index), hidden),
                    cfg.train.eval_batch_size, cfg.train.bf16)
            student, stats = _distilled(cfg.kd, cfg.train_of(not m.budget), cfg.seed, extract(supernet, subnet),
                                        subnet.layer_indices(teacher_layers), features, targets, teacher,
                                        work_dir / m.name, fingerprint, m.name)
            student.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
            write_text_atomic(directory / STATS_FILE, json.dumps({"model_key": keys[m.name], "stats": stats}))
        scored, _ = evaluate(QAPredictor(student, tokenizer, features_cfg, cfg.train.eval_batch_size), eval_examples)
        print(f"finalize: {m.name}: dev F1 {scored['f1']:.2f} (teacher {teacher_metrics['f1']:.2f})", flush=True)
        scores[m.name] = {**scored, **stats, "f1_drop": teacher_metrics["f1"] - scored["f1"],
                          "subnet": m.origin["subnet"], "params": m.origin["params"], "search_f1": m.origin["f1"],
                          "budget": m.budget or "deployed", "budget_ms": m.budget_ms}
        done[subnet] = m
    shutil.rmtree(work_dir, ignore_errors=True)
    common = {}
    if cfg.benchmark:
        figures, common = _benchmark(cfg, out_dir, teacher_dir, search_dir, result, eval_examples, models)
        for name, figure in figures.items():
            scores[name].update(figure)
    student = scores["student"]
    # the student's figures keep their names of before baselines (search-report and deploy read them)
    metrics = {**{(f"student_{k}" if k in STUDENT_PREFIXED else k): v for k, v in student.items()},
               "teacher_exact_match": teacher_metrics["exact_match"], "teacher_f1": teacher_metrics["f1"], **common}
    budgets = {}
    for m in models[1:]:  # each budget's student comes before its baseline
        if not m.budget:
            metrics["baseline"] = scores[m.name]
        elif m.is_baseline:
            budgets[m.budget]["baseline"] = scores[m.name]
        else:
            budgets[m.budget] = dict(scores[m.name])
    if budgets:
        metrics["budgets"] = budgets
    inputs = {"teacher": str(teacher_dir.resolve()), "supernet": str(supernet_dir.resolve()),
              "search": str(search_dir.resolve()),
              "train_file": {"path": str(train_file), "sha256": train_sha256},
              "eval_file": {"path": str(eval_file), "sha256": sha256_file(eval_file)}}
    # `features` in the config: QAPredictor.from_dir windows inputs the way the student was trained.
    config = {**to_dict(cfg), "features": to_dict(features_cfg)}
    for m in reversed(models[1:]):  # each a model directory of its own, loadable like the student; inner ones first
        write_manifest(out_dir / m.directory, "finalize", {**config, "subnet": m.origin["subnet"]}, scores[m.name],
                       inputs, config_hash=fingerprint)
    return write_manifest(out_dir, "finalize", {**config, "subnet": models[0].origin["subnet"]}, metrics, inputs,
                          config_hash=fingerprint)


def model_key(cfg: FinalizeConfig, deployed: bool, subnet: SubnetConfig, features: SquadFeatureConfig,
              contents: list[str]) -> str:
    """What a finalized model's training depends on: the recipe (`cfg`'s KD, training questions,
    augmentation, seed and its budget's training), its subnet (blocks written out,
    `kept_blocks`), its windows (`features`) and the `contents` it learns from (the sha256 of the
    teacher's weights, the supernet's and its unit order, and the training file)."""
    recipe = {"kd": to_dict(cfg.kd), "train_questions": cfg.data.train_questions, "augment": to_dict(cfg.augment),
              "seed": cfg.seed, "train": to_dict(cfg.train_of(deployed)), "features": to_dict(features),
              "subnet": subnet.to_dict(), "contents": contents}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _distilled_models(outputs: list[Path]) -> dict[str, Path]:
    """model_key -> directory of every model the finished finalize `outputs` distilled."""
    found = {}
    for output in outputs:
        for stats in sorted(Path(output).rglob(STATS_FILE)):
            key = json.loads(stats.read_text()).get("model_key")
            if key:
                found.setdefault(key, stats.parent)
    return found


def kept_blocks(subnet: SubnetConfig, teacher_layers: int) -> SubnetConfig:
    """`subnet` with the teacher blocks it keeps written out, so that a front point and a
    baseline of the same shape (the search may ship the baseline itself) compare equal and
    train once."""
    return dataclasses.replace(subnet, layers=tuple(subnet.layer_indices(teacher_layers)))


def _copy_model(source: Path, directory: Path) -> None:
    """The model files of `source` (not its subdirectories) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file():
            shutil.copy2(path, directory / path.name)


def _distilled(kd: QAKDConfig, train: TrainConfig, seed: int, student: torch.nn.Module, layer_map: list[int],
               features: Features, targets: TeacherTargets, teacher: torch.nn.Module, work_dir: Path,
               fingerprint: str, name: str) -> tuple[torch.nn.Module, dict]:
    """`student` fine-tuned by distillation from the kept teacher `targets` (of `teacher`), and `fit`'s figures.
    Kept in `work_dir` once done, so a finalize resumed after it skips it."""
    done = work_dir / "distilled"
    if (done / STATS_FILE).is_file():
        kept = json.loads((done / STATS_FILE).read_text())
        if kept["fingerprint"] == fingerprint:
            return load_qa_model(done), kept["stats"]

    loss_fn = student_kd_loss(kept_targets_of(targets), layer_map, kd, teacher)
    stats = fit(student, features, loss_fn, train, seed, work_dir, fingerprint, desc=name,
                lengths=features.lengths())
    student.save_pretrained(done)
    write_text_atomic(done / STATS_FILE, json.dumps({"fingerprint": fingerprint, "stats": stats}))
    return student, stats


TEACHER = "teacher"  # the teacher's name among the timed models (no finalized model is named so)


def _benchmark(cfg: FinalizeConfig, out_dir: Path, teacher_dir: Path, search_dir: Path, result: dict,
               eval_examples: list, models: list[Finalized]) -> tuple[dict, dict]:
    """Compile every finalized model (into its compiled/) and the teacher (a scratch directory,
    removed afterwards) for the search's device with the latency stage's compiler settings, and
    time them in turn, `cfg.timing_rounds` times over: two timings taken at different times on a
    shared machine are not comparable, so a speed-up is the median of ratios of timings taken
    in the same round. Each model's fastest backend is then scored on
    `eval_examples` as compiled (an int8 backend loses accuracy of its own), so a speed-up comes
    with the F1 of what runs at that speed. Returns the figures by model name, and the device,
    sequence length and teacher's timings they share."""
    search_manifest = verify_manifest(search_dir)
    latency_manifest = verify_manifest(search_manifest["inputs"]["latency"])
    compile_cfg = from_dict(CompileConfig, latency_manifest["config"]["compile"], "compile.")
    bench_cfg = from_dict(BenchConfig, latency_manifest["config"]["bench"], "bench.")
    compile_cfg = dataclasses.replace(compile_cfg, peers=tuple(b for b in cfg.bench_backends if b != "tvm"))
    device = devices.get_device(result["device"])
    directories = {m.name: out_dir / m.directory for m in models}
    compiled = {name: compile_model(d, device, compile_cfg, d / "compiled") for name, d in directories.items()}
    scratch = out_dir / "teacher-compiled"
    try:
        compile_model(teacher_dir, device, compile_cfg, scratch)
        timings = timed_in_turn({TEACHER: (scratch, teacher_dir)} | {name: (d / "compiled", d)
                                                                     for name, d in directories.items()},
                                device, cfg.bench_backends, bench_cfg, cfg.timing_rounds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    teacher_ms = median_ms(timings[TEACHER])
    figures = {}
    for name, directory in directories.items():
        model_ms = median_ms(timings[name])
        best_ms, best_backend = min((v, b) for b, v in model_ms.items())
        predictor, _, _ = load_artifact(directory / "compiled", compiled[name], best_backend, device.threads)
        compiled_metrics, _ = evaluate(predictor, eval_examples)
        figures[name] = {"ms": model_ms, "ms_rounds": timings[name], "best_backend": best_backend,
                         "best_backend_f1": compiled_metrics["f1"],
                         "best_backend_exact_match": compiled_metrics["exact_match"]}
        if BASELINE in teacher_ms:
            figures[name]["speedup_vs_teacher_litert"] = speedup(timings[TEACHER], BASELINE, timings[name],
                                                                 best_backend)
    return figures, {"device": device.key, "seq_len": compile_cfg.seq_len, "teacher_ms": teacher_ms,
                     "teacher_ms_rounds": timings[TEACHER], "timing_rounds": cfg.timing_rounds}
