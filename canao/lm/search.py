"""search-lm: the accuracy-latency Pareto front of a decoder supernet's subnets on a device
(canao.codesign.pareto's search): held-out perplexity with the supernet's weights against
the latency model's prediction of the config's `objective`, ms per generated token or time to
first token; every front point carries both predictions, and both measurements where timed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import optuna

from canao.codesign.elastic import extract
from canao.codesign.kd import SUPERNET_DIR
from canao.codesign.latency_model import LatencyModel
from canao.codesign.pareto import (
    FRONT_JSON,
    FRONT_PNG,
    Objectives,
    TrialHook,
    front_of,
    latency_budget,
    pareto_search,
    plot_front,
    remeasure,
    search_inputs,
    trials_of,
)
from canao.config import config_hash, from_dict, to_dict
from canao.lm.config import DecoderSpaceConfig, LMCompileConfig, LMSearchConfig
from canao.lm.data import HELDOUT_FILE, perplexity, read_text_file
from canao.lm.distill import corpus_file, distilled_teacher, load_decoder_supernet, supernet_order, torch_device
from canao.lm.latency import DECODER, FIRST_TOKEN, PER_TOKEN, measure_decoder
from canao.lm.model import load_causal_lm
from canao.lm.model import load_tokenizer as load_lm_tokenizer
from canao.lm.space import DecoderSpace, DecoderSubnet, decoder_params
from canao.manifest import read_manifest, sha256_file, write_manifest

GENERATION = Objectives("perplexity", False, "held-out perplexity (supernet weights)",
                        "ms per generated token on {device}, context {seq_len} (log scale)", "llama.cpp", PER_TOKEN)
# What search-lm minimises and budgets, by LMSearchConfig.objective (canao.lm.config.LM_OBJECTIVES)
OBJECTIVES = {
    "ms_per_token": GENERATION,
    "time_to_first_token": dataclasses.replace(
        GENERATION, latency=FIRST_TOKEN,
        latency_label="time to first token (ms) on {device}, prompt of {prompt_tokens} tokens (log scale)"),
}
# front.json's name of each latency the decoder model predicts: a point's "predicted_<name>" (on
# its predicted backend) and "measured_<name>" (on its measured backend; None where not re-timed)
LATENCY_NAMES = {PER_TOKEN: "ms_per_token", FIRST_TOKEN: "time_to_first_token_ms"}


def search_lm(cfg: LMSearchConfig, supernet_dir: str | Path, latency_dir: str | Path, out_dir: str | Path,
              on_trial: TrialHook | None = None) -> dict:
    """`canao search-lm`: the Pareto front (min held-out perplexity, min predicted latency of
    `cfg.objective`: ms per generated token or time to first token) of a decoder supernet's
    subnets (a `canao distill-lm` output) on the device of a `canao latency-lm` model.
    Perplexity is that of the subnet with the supernet's weights on the supernet's held-out
    text (the first `eval_tokens` tokens; canao.lm.data's protocol); beside it, its top-1
    agreement with the teacher: the share of those positions where its most likely next token
    is the teacher's. The front's most accurate points are compiled and timed again. Output as
    `search`'s; each point's `predicted_ms` and `measured_ms` are the objective's, and it holds
    both latencies by their LATENCY_NAMES."""
    supernet_dir, latency_dir, out_dir = Path(supernet_dir), Path(latency_dir), Path(out_dir)
    if read_manifest(out_dir) is not None:
        raise FileExistsError(f"{out_dir}: already holds a search; choose another --out")
    supernet, supernet_manifest, latency, latency_manifest, lab_device = search_inputs(
        supernet_dir, latency_dir, load_decoder_supernet, DECODER, cfg.reuse_other_hardware)
    space = DecoderSpace(from_dict(DecoderSpaceConfig, supernet_manifest["config"]["space"], "space."), supernet.shape,
                         supernet_order(supernet_manifest))
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
                              "top1_agreement": float((scored["top1"] == teacher["top1"]).double().mean())}
        return scores[subnet]

    c = space.cfg

    def suggest(trial: optuna.Trial) -> DecoderSubnet:
        return space.make(trial.suggest_categorical("num_layers", c.layer_counts),
                          trial.suggest_categorical("kv_heads", c.kv_head_counts),
                          trial.suggest_categorical("ffn_size", c.ffn_sizes))

    def count_params(subnet: DecoderSubnet) -> int:
        return decoder_params(subnet, space.teacher, config.vocab_size, config.tie_word_embeddings)

    # timed without a block order: a decoder's time depends on its depth, not on which blocks
    timed_teacher = dataclasses.replace(space.largest(), layers=())
    objectives, teacher_ms, budget = search_objective(cfg, latency, timed_teacher)
    flops, tokens = DECODER.metric(objectives.latency).flops, latency.of(objectives.latency).seq_len
    started = time.perf_counter()
    study = pareto_search(dataclasses.replace(cfg, latency_budget_ms=budget), objectives, suggest, score, latency,
                          count_params, lambda s: flops(s, space.teacher, tokens), [_trial_params(space.largest())],
                          on_trial)
    search_seconds = time.perf_counter() - started

    front = front_of(study, DecoderSubnet)
    timing = latency_manifest["config"]
    compile_cfg = from_dict(LMCompileConfig, timing["compile"], "compile.")
    out_dir.mkdir(parents=True, exist_ok=True)
    started_measure = time.perf_counter()
    timed: dict[DecoderSubnet, dict[str, dict[str, float]]] = {}  # both latencies of each re-timed subnet

    def measure_one(subnet: dict) -> dict[str, float]:
        decoder = DecoderSubnet.from_dict(subnet)
        timed[decoder] = measure_decoder(decoder, supernet_dir / SUPERNET_DIR, lab_device, tuple(latency.coefficients),
                                         compile_cfg, timing["new_tokens"], timing["repeats"], out_dir / "work")
        return timed[decoder][objectives.latency]

    remeasure(front, objectives, cfg.remeasure, measure_one, [budget])
    for point in front:
        subnet = DecoderSubnet.from_dict(point["subnet"])
        for key, name in LATENCY_NAMES.items():
            point[f"predicted_{name}"] = latency.of(key).predict(subnet, point["predicted_backend"])
            point[f"measured_{name}"] = timed[subnet][key][point["measured_backend"]] if subnet in timed else None
    largest = space.largest()
    result = {
        "device": latency.device, "seq_len": latency.seq_len, "prompt_tokens": latency.of(FIRST_TOKEN).seq_len,
        "objective": cfg.objective, "latency_budget_ms": budget, "min_speedup": cfg.min_speedup,
        "params_budget": cfg.params_budget,
        # The largest subnet with the supernet's weights stands for the teacher, as in `search`; the
        # teacher's own perplexity is beside it.
        "teacher": {"subnet": largest.to_dict(), **score(largest), "measured_ms_by_backend": teacher_ms,
                    **{f"measured_{name}_by_backend": latency.of(key).measured(timed_teacher)
                       for key, name in LATENCY_NAMES.items()},
                    "params": count_params(largest), "teacher_perplexity": teacher["perplexity"]},
        "front": sorted(front, key=lambda p: p["predicted_ms"]),
        "trials": trials_of(study, objectives),
    }
    (out_dir / FRONT_JSON).write_text(json.dumps(result, indent=1) + "\n")
    plot_front(result, out_dir / FRONT_PNG, objectives)
    metrics = {"search_seconds": round(search_seconds, 1),
               "remeasure_seconds": round(time.perf_counter() - started_measure, 1),
               "trials": len(study.trials), "distinct_subnets": len(scores), "front_size": len(front),
               "teacher_perplexity": teacher["perplexity"],
               "largest_subnet_perplexity": result["teacher"]["perplexity"]}
    inputs = {"supernet": str(supernet_dir.resolve()), "latency": str(latency_dir.resolve()),
              "heldout_file": {"path": str(heldout_file), "sha256": sha256_file(heldout_file)}}
    return write_manifest(out_dir, "search-lm", {"device": latency.device, **to_dict(cfg)}, metrics, inputs,
                          config_hash=config_hash(cfg))


def search_objective(cfg: LMSearchConfig, latency: LatencyModel,
                     teacher: DecoderSubnet) -> tuple[Objectives, dict[str, float], float]:
    """What the search minimises (`cfg.objective`'s Objectives), the latency of it measured for
    the `teacher`'s shape (ms by backend) and the budget in ms: the tighter of
    `cfg.latency_budget_ms` and that latency in llama.cpp over `cfg.min_speedup`."""
    objectives = OBJECTIVES[cfg.objective]
    teacher_ms = latency.of(objectives.latency).measured(teacher)
    return objectives, teacher_ms, latency_budget(cfg, teacher_ms, objectives.baseline)


def _trial_params(subnet: DecoderSubnet) -> dict:
    """The search's variables of `subnet` (its blocks follow from its depth)."""
    return {"num_layers": subnet.num_layers, "kv_heads": subnet.kv_heads, "ffn_size": subnet.ffn_size}
