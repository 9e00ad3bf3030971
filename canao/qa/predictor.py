"""Extractive QA with a model directory or a compiled artifact: answer questions, evaluate on a SQuAD file."""

from __future__ import annotations

import functools
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from canao.compile import peers
from canao.config import from_dict
from canao.manifest import read_manifest
from canao.qa.config import SquadFeatureConfig
from canao.qa.data import Features, Prediction, SquadExample, build_features, postprocess, squad_score
from canao.qa.model import INPUT_NAMES, OUTPUT_NAMES, SpanLogits, example_inputs, load_qa_model, load_tokenizer

log = logging.getLogger(__name__)


class TorchRunner:
    """PyTorch eager with transformers' default sdpa attention: the reference the peers are checked against."""

    def __init__(self, model_dir: str | Path, threads: int, name: str = "torch"):
        self.name, self.version, self.threads = name, torch.__version__, threads
        self.model = SpanLogits(load_qa_model(model_dir)).eval()

    @torch.inference_mode()
    def __call__(self, input_ids, token_type_ids, attention_mask):
        # The thread count is process-wide: another runner of the same process may have changed it.
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        start, end = self.model(*(torch.from_numpy(x) for x in (input_ids, token_type_ids, attention_mask)))
        return start.numpy(), end.numpy()


# The backends a QA model runs on, by name; a runner's inputs and outputs are the model's.
RUNNERS = {
    "tvm": peers.TVMRunner,
    "torch": TorchRunner,
    "onnxruntime": peers.OnnxRunner,
    "onnxruntime-int8": peers.OnnxRunner,
    "litert": peers.LiteRTRunner,
    "litert-int8": peers.LiteRTRunner,
}
NAMED_RUNNERS = (peers.OnnxRunner, peers.LiteRTRunner)  # find tensors by INPUT_NAMES and OUTPUT_NAMES


def runner_factory(name: str, path: str | Path, threads: int) -> functools.partial:
    """What builds backend `name`'s runner (tvm or a peer with `path` its file, or torch with
    `path` the model directory) when called: picklable, so a child process can build it
    (canao.compile.peers.timed_calls) importing only the runner's own module."""
    if name not in RUNNERS:
        raise ValueError(f"backend {name!r}: unknown; one of {list(RUNNERS)}")
    kind = RUNNERS[name]
    names = {"inputs": INPUT_NAMES, "outputs": OUTPUT_NAMES} if kind in NAMED_RUNNERS else {}
    return functools.partial(kind, str(path), threads, name=name, **names)


def backend_runner(name: str, path: str | Path, threads: int) -> peers.Runner:
    """A runner for backend `name` in this process (see `runner_factory`)."""
    return runner_factory(name, path, threads)()


class SpanPredictor:
    """Windows -> start/end logits -> best spans; subclasses say how logits are computed."""

    tokenizer: object
    features_cfg: SquadFeatureConfig

    def logits(self, features: Features, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def predict(self, examples: list[SquadExample], progress: bool = False) -> dict[str, Prediction]:
        features = build_features(examples, self.tokenizer, self.features_cfg)
        start, end = self.logits(features, progress)
        return postprocess(examples, features, start, end, self.features_cfg)


@dataclass
class QAPredictor(SpanPredictor):
    """A model directory in PyTorch, batches of windows trimmed to their longest real length."""

    model: torch.nn.Module
    tokenizer: object
    features_cfg: SquadFeatureConfig
    batch_size: int = 64

    @classmethod
    def from_dir(cls, model_dir: str | Path, features_cfg: SquadFeatureConfig | None = None,
                 batch_size: int = 64) -> QAPredictor:
        """Load a model directory; windowing defaults to what the model was trained with."""
        if features_cfg is None:
            manifest = read_manifest(model_dir) or {}
            trained_with = manifest.get("config", {}).get("features")
            features_cfg = from_dict(SquadFeatureConfig, trained_with) if trained_with else SquadFeatureConfig()
        return cls(load_qa_model(model_dir), load_tokenizer(model_dir), features_cfg, batch_size)

    @torch.inference_mode()
    def logits(self, features: Features, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Start and end logits [n_windows, max_seq_len]; -inf past each batch's real length."""
        self.model.eval()
        shape = tuple(features.input_ids.shape)
        start = np.full(shape, -np.inf, dtype=np.float32)
        end = np.full(shape, -np.inf, dtype=np.float32)
        batches = range(0, len(features), self.batch_size)
        for lo in tqdm(batches, desc="eval", unit="batch", disable=not progress):
            index = slice(lo, lo + self.batch_size)
            out = self.model(**features.model_inputs(index))
            width = out.start_logits.shape[1]
            start[index, :width] = out.start_logits.float().numpy()
            end[index, :width] = out.end_logits.float().numpy()
        return start, end


@dataclass
class StaticShapePredictor(SpanPredictor):
    """A compiled backend (canao.compile.peers.Runner): one window of exactly the compiled length per call."""

    runner: peers.Runner
    tokenizer: object
    features_cfg: SquadFeatureConfig  # max_seq_len must be the compiled sequence length

    def logits(self, features: Features, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        inputs = [t.numpy() for t in (features.input_ids, features.token_type_ids, features.attention_mask)]
        start = np.empty(inputs[0].shape, dtype=np.float32)
        end = np.empty(inputs[0].shape, dtype=np.float32)
        for w in tqdm(range(len(features)), desc="eval", unit="window", disable=not progress):
            start[w], end[w] = (x[0] for x in self.runner(*(x[w : w + 1] for x in inputs)))
        return start, end


def load_artifact(artifact_dir: Path, manifest: dict, backend: str, threads: int
                  ) -> tuple[StaticShapePredictor, str, dict[str, float]]:
    """A compiled artifact (its verified `manifest`) as a predictor on `backend`, or with
    "auto" on the fastest of the backends within the artifact's numerics bound; also the
    backend chosen and the ms per window of each candidate timed here."""
    compiled, backends = manifest["config"], manifest["backends"]
    if backend == "auto":
        numerics = manifest["metrics"]["numerics_max_abs_diff"]
        candidates = [b for b in backends if numerics.get(b, float("inf")) <= compiled["numerics_tol"]]
    elif backend in backends:
        candidates = [backend]
    else:
        raise ValueError(f"backend: {artifact_dir} has no {backend!r} (it has: {', '.join(backends)})")
    inputs = [t.numpy() for t in example_inputs(compiled["seq_len"])]
    runners, timings, failures = {}, {}, {}
    for name in candidates:
        try:
            runner = backend_runner(name, Path(artifact_dir) / backends[name], threads)
            # Few runs: enough to rank backends that differ by tens of percent, and an untuned
            # TVM library (seconds a window) does not hold the start-up for long.
            timings[name] = round(statistics.median(peers.time_calls(runner, inputs, warmup=1, runs=5)), 3)
        except Exception as e:  # a backend that cannot run here (another CPU, a missing runtime)
            failures[name] = f"{type(e).__name__}: {e}"
            log.warning("%s: backend %s does not run here: %s", artifact_dir, name, failures[name])
            continue
        runners[name] = runner
    if not runners:
        raise RuntimeError(f"{artifact_dir}: none of the backends {candidates} runs here: {failures}")
    fastest = min(timings, key=timings.get)
    # The compiled length is the window; consecutive windows share a quarter of it.
    features = SquadFeatureConfig(max_seq_len=compiled["seq_len"], doc_stride=compiled["seq_len"] // 4)
    return StaticShapePredictor(runners[fastest], load_tokenizer(artifact_dir), features), fastest, timings


def open_predictor(model_dir: Path, manifest: dict, backend: str, threads: int, batch_size: int = 64,
                   field: str = "backend") -> tuple[SpanPredictor, str, dict[str, float]]:
    """A QA model directory (its verified `manifest`) as a predictor: a compiled artifact through
    `load_artifact`, a model directory in PyTorch on `threads` threads with the windowing it was
    trained with. Also the backend that runs it and the start-up timing of each candidate. `field`
    names the setting that chose `backend` in the error for a backend the directory cannot run."""
    if "backends" in manifest:
        return load_artifact(model_dir, manifest, backend, threads)
    if backend not in ("auto", "torch"):
        raise ValueError(f"{field}: {backend!r} needs a compiled artifact; {model_dir} is a model directory "
                         "(it runs in PyTorch)")
    torch.set_num_threads(threads)
    return QAPredictor.from_dir(model_dir, batch_size=batch_size), "torch", {}


def evaluate(predictor: SpanPredictor, examples: list[SquadExample],
             progress: bool = True) -> tuple[dict, dict[str, Prediction]]:
    """Official EM/F1 (percent) of `predictor` on `examples`, and its predictions."""
    predictions = predictor.predict(examples, progress)
    scores = squad_score(examples, {qid: p.text for qid, p in predictions.items()})
    metrics = {"exact_match": scores["exact_match"], "f1": scores["f1"], "questions": len(examples)}
    return metrics, predictions
