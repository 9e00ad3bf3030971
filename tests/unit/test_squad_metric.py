"""The metric against the official v1.1 definition, with values worked out by hand."""

import json

import pytest

from canao.cli.main import main
from canao.qa.data import exact_match, f1, load_squad, normalize_answer, squad_score
from tests.conftest import article, qa, squad_file

CONTEXT = "The Denver Broncos won in Paris, France, near the Eiffel Tower in the U.S. style; don't ask."


@pytest.mark.parametrize(
    "prediction, gold, em, expected_f1",
    [
        ("Eiffel Tower", "Eiffel Tower", 1.0, 1.0),  # exact
        ("the Eiffel Tower", "Eiffel Tower", 1.0, 1.0),  # article
        ("Eiffel tower.", "The Eiffel Tower", 1.0, 1.0),  # case, punctuation, article
        ("U.S.", "US", 1.0, 1.0),  # punctuation inside a word
        ("don't", "dont", 1.0, 1.0),
        ("  Paris \t France ", "Paris France", 1.0, 1.0),  # white space
        ("in Paris France", "Paris", 0.0, 0.5),  # P=1/3, R=1
        ("paris paris", "Paris", 0.0, 2 / 3),  # repeated tokens count once each side
        ("Broncos", "Denver Broncos", 0.0, 2 / 3),  # P=1, R=1/2
        ("", "Paris", 0.0, 0.0),  # empty prediction
        ("a an the", "the", 1.0, 0.0),  # both normalise to "": v1.1 gives EM 1, F1 0
        ("Eiffelturm", "Eiffel Tower", 0.0, 0.0),
    ],
)
def test_exact_match_and_f1(prediction, gold, em, expected_f1):
    assert exact_match(prediction, gold) == em
    assert f1(prediction, gold) == pytest.approx(expected_f1, abs=1e-12)


def test_normalize_answer():
    assert normalize_answer("  The  Quick, brown FOX! an apple ") == "quick brown fox apple"
    assert normalize_answer("theatre anthem") == "theatre anthem"  # only whole words


def _span(text):
    return text, CONTEXT.index(text)


def _dataset(tmp_path):
    qas = [
        qa("q1", "Who won?", _span("Denver Broncos"), _span("Broncos")),
        qa("q2", "Where?", _span("Paris")),
        qa("q3", "Near what?", _span("the Eiffel Tower")),
        qa("q4", "Style?", _span("U.S.")),
        qa("q5", "Missing?", _span("Paris")),
    ]
    return squad_file(tmp_path / "data.json", [article(CONTEXT, qas)])


def test_score_takes_max_over_golds_and_counts_missing(tmp_path):
    examples = load_squad(_dataset(tmp_path))
    predictions = {
        "q1": "the Broncos team",  # vs "Denver Broncos": F1 1/2; vs "Broncos": P=1/2, R=1 -> 2/3
        "q2": "in Paris France",  # F1 1/2
        "q3": "Eiffel Tower",  # EM
        "q4": "",  # wrong
        # q5 missing: wrong
    }
    scores = squad_score(examples, predictions)
    assert scores["missing"] == 1
    assert scores["exact_match"] == pytest.approx(100 * 1 / 5, abs=1e-6)
    assert scores["f1"] == pytest.approx(100 * (2 / 3 + 1 / 2 + 1) / 5, abs=1e-6)


def test_squad_score_cli(tmp_path, capsys):
    data = _dataset(tmp_path)
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps({"q1": "Denver Broncos", "q2": "paris", "q3": "Eiffel", "q4": "US"}))
    assert main(["squad-score", str(data), str(preds)]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert set(result) == {"exact_match", "f1"}
    assert result["exact_match"] == pytest.approx(60.0, abs=1e-6)
    assert result["f1"] == pytest.approx(100 * (1 + 1 + 2 / 3 + 1) / 5, abs=1e-6)  # "Eiffel": P=1, R=1/2
    assert "1 of 5 questions have no prediction" in err


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected an object"),
        ('{"q1": 3}', "question id 'q1': answer must be a string"),
    ],
)
def test_squad_score_rejects_bad_predictions(tmp_path, capsys, content, message):
    preds = tmp_path / "preds.json"
    preds.write_text(content)
    assert main(["squad-score", str(_dataset(tmp_path)), str(preds)]) == 2
    err = capsys.readouterr().err
    assert str(preds) in err and message in err
