"""SQuAD loading, validation errors, windowed features and post-processing."""

import json

import numpy as np
import pytest

from canao.qa.config import SquadFeatureConfig
from canao.qa.data import SquadExample, SquadFormatError, build_features, load_squad, postprocess
from tests.conftest import DEV_FILE, TRAIN_FILE, article, qa, squad_file

CONTEXT = "Paris is the capital of France. The Eiffel Tower was finished in 1889 for the World's Fair."


def test_loads_the_shared_files_with_a_limit():
    examples = load_squad(TRAIN_FILE, limit=50)
    assert len(examples) == 50
    assert len({ex.qid for ex in examples}) == 50
    dev = load_squad(DEV_FILE)
    assert len(dev) == 4961  # the data README's count
    assert all(ex.answers for ex in dev)


def _qa0(data):
    return data["data"][0]["paragraphs"][0]["qas"][0]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("data"), "missing field 'data'"),
        (lambda d: d["data"][0].pop("title"), "article 0: missing field 'title'"),
        (lambda d: d["data"][0]["paragraphs"][0].pop("context"),
         "article 0 ('Test'), paragraph 0: missing field 'context'"),
        (lambda d: _qa0(d).pop("question"), "question id 'q1': missing field 'question'"),
        (lambda d: _qa0(d).update(answers=[]), "question id 'q1': field 'answers' is empty"),
        (lambda d: _qa0(d)["answers"][0].update(answer_start="3"),
         "question id 'q1', answers[0]: field 'answer_start' must be int, got str"),
        (lambda d: _qa0(d)["answers"][0].update(answer_start=1),
         "question id 'q1': field 'answers[0].answer_start': 1 points at 'aris '"),
        (lambda d: _qa0(d)["answers"][0].update(answer_start=-1),
         "field 'answers[0].answer_start': -1"),
        (lambda d: d["data"][0]["paragraphs"][0]["qas"].append(qa("q1", "Again?", ("Paris", 0))),
         "question id 'q1': field 'id': duplicate question id"),
    ],
)
def test_bad_files_name_file_article_question_and_field(tmp_path, mutate, message):
    data = {"version": "1.1", "data": [article(CONTEXT, [qa("q1", "Capital?", ("Paris", 0))])]}
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SquadFormatError) as err:
        load_squad(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_malformed_and_missing_files(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"data": [')
    with pytest.raises(SquadFormatError, match="broken.json: not valid JSON"):
        load_squad(path)
    with pytest.raises(SquadFormatError, match="nothing.json: file not found"):
        load_squad(tmp_path / "nothing.json")


def test_answer_spans_map_back_to_their_text(tokenizer):
    """Every window that holds the answer labels tokens whose offsets decode to it."""
    examples = load_squad(TRAIN_FILE, limit=300)
    features = build_features(examples, tokenizer, SquadFeatureConfig(max_seq_len=128, doc_stride=32))
    labelled = exact = 0
    for w, ex_i in enumerate(features.example_index):
        start, end = int(features.start_positions[w]), int(features.end_positions[w])
        if start == 0:
            continue
        gold = examples[ex_i].answers[0].text
        text = examples[ex_i].context[features.offsets[w][start][0] : features.offsets[w][end][1]]
        assert gold in text  # a gold answer cut mid-word ("six" of "sixth") decodes to the whole word
        labelled += 1
        exact += text == gold
    assert exact / labelled > 0.99
    assert set(features.example_index[features.start_positions.numpy() > 0]) == set(range(len(examples)))


def test_long_context_is_split_into_overlapping_windows(tokenizer):
    context = " ".join(f"word{i}" for i in range(300)) + " The answer is Paris."
    example = SquadExample("q", "Where?", context, ())
    cfg = SquadFeatureConfig(max_seq_len=64, doc_stride=16)
    features = build_features([example], tokenizer, cfg)
    assert len(features) > 1
    assert features.input_ids.shape == (len(features), 64)
    spans = [[off for off in window if off is not None] for window in features.offsets]
    for prev, nxt in zip(spans, spans[1:], strict=False):
        assert nxt[0][0] < prev[-1][1]  # consecutive windows overlap
    assert spans[0][0][0] == 0 and spans[-1][-1][1] == len(context)


def test_question_too_long_is_a_clear_error(tokenizer):
    example = SquadExample("q", "why " * 200, CONTEXT, ())
    with pytest.raises(ValueError, match="question: 200 tokens long"):
        build_features([example], tokenizer, SquadFeatureConfig(max_seq_len=128, doc_stride=32))


def _logits(features, spans):
    """Logits that put `value` at (window, token) for start and end."""
    start = np.full(features.input_ids.shape, -10.0, dtype=np.float32)
    end = start.copy()
    for (w, s, e), value in spans:
        start[w, s] = value
        end[w, e] = value
    return start, end


def _token(features, window, char_start):
    return next(i for i, off in enumerate(features.offsets[window]) if off is not None and off[0] == char_start)


def test_postprocess_picks_the_best_span_in_the_context(tokenizer):
    example = SquadExample("q", "When was the tower finished?", CONTEXT, ())
    cfg = SquadFeatureConfig(max_seq_len=64, doc_stride=16, n_best=5, max_answer_len=5)
    features = build_features([example], tokenizer, cfg)
    year = _token(features, 0, CONTEXT.index("1889"))
    start, end = _logits(features, [((0, year, year), 5.0)])
    start[0, 2] = end[0, 3] = 50.0  # question tokens: never an answer
    start[0, -1] = end[0, -1] = 60.0  # padding: never an answer
    start[0, 0] = end[0, 0] = 70.0  # [CLS]
    pred = postprocess([example], features, start, end, cfg)["q"]
    assert pred.text == "1889"
    assert (pred.start, pred.end) == (CONTEXT.index("1889"), CONTEXT.index("1889") + 4)
    assert 0 < pred.probability <= 1


@pytest.mark.parametrize("first, second", [("Paris", "France"), ("Fair", "Paris")])
def test_postprocess_skips_too_long_and_reversed_spans(tokenizer, first, second):
    """Paris..France is 6 tokens (over max_answer_len 3); Fair..Paris ends before it starts."""
    example = SquadExample("q", "What?", CONTEXT, ())
    cfg = SquadFeatureConfig(max_seq_len=64, doc_stride=16, n_best=5, max_answer_len=3)
    features = build_features([example], tokenizer, cfg)
    start_tok = _token(features, 0, CONTEXT.index(first))
    end_tok = _token(features, 0, CONTEXT.index(second))
    tower = _token(features, 0, CONTEXT.index("Tower"))
    start, end = _logits(features, [((0, start_tok, end_tok), 9.0), ((0, tower, tower), 1.0)])
    assert postprocess([example], features, start, end, cfg)["q"].text == "Tower"


def test_postprocess_chooses_across_windows(tokenizer):
    context = " ".join(f"w{i}" for i in range(120)) + " Paris is here."
    example = SquadExample("q", "Where?", context, ())
    cfg = SquadFeatureConfig(max_seq_len=48, doc_stride=8)
    features = build_features([example], tokenizer, cfg)
    last = len(features) - 1
    paris = _token(features, last, context.index("Paris"))
    start, end = _logits(features, [((0, _token(features, 0, 0), _token(features, 0, 0)), 2.0),
                                    ((last, paris, paris), 3.0)])
    assert postprocess([example], features, start, end, cfg)["q"].text == "Paris"


def test_files_from_helpers_load(tmp_path):
    path = squad_file(tmp_path / "ok.json", [article(CONTEXT, [qa("q1", "Capital?", ("Paris", 0))])])
    (example,) = load_squad(path)
    assert example.answers[0].text == "Paris"
