"""Augmented QA inputs on real SQuAD training questions: every gold answer stays where its
offset says, every window either holds its gold span or is labelled as having none, and the
copies follow the seed."""

import pytest

from canao.config import ConfigError
from canao.qa.augment import augment, with_copies
from canao.qa.config import AugmentConfig, SquadFeatureConfig
from canao.qa.data import build_features, load_squad
from tests.conftest import TRAIN_FILE

CFG = AugmentConfig(crop=2, repair=1, replace=2, seed=3)


@pytest.fixture(scope="module")
def examples():
    return load_squad(TRAIN_FILE, limit=120)


@pytest.fixture(scope="module")
def copies(examples):
    return augment(examples, CFG)


def test_each_kind_makes_its_copies_from_the_training_questions_alone(examples, copies):
    kinds = {kind: [c for c in copies if f"#{kind}" in c.qid] for kind in ("crop", "repair", "replace")}
    assert len(kinds["crop"]) == 2 * len(examples) and len(kinds["replace"]) == 2 * len(examples)
    assert 0 < len(kinds["repair"]) <= len(examples)
    assert len({c.qid for c in copies}) == len(copies)
    originals = {ex.qid: ex for ex in examples}
    article_contexts = {(ex.article, ex.context) for ex in examples}
    for copy in kinds["repair"]:
        original = originals[copy.qid.split("#")[0]]
        assert copy.answers == () and copy.question == original.question
        assert (original.article, copy.context) in article_contexts and copy.context != original.context
        assert original.answers[0].text not in copy.context
    for copy in kinds["crop"]:
        assert copy.context in originals[copy.qid.split("#")[0]].context
    assert sum(c.context != originals[c.qid.split("#")[0]].context for c in kinds["crop"]) > len(examples) // 2
    assert all(c.context != originals[c.qid.split("#")[0]].context for c in kinds["replace"])


def test_every_gold_answer_is_where_its_offset_says(copies):
    for copy in copies:
        for answer in copy.answers:
            assert copy.context[answer.start : answer.start + len(answer.text)] == answer.text, copy.qid


def test_every_window_holds_its_gold_span_or_is_labelled_as_having_none(examples, copies, tokenizer):
    augmented = with_copies(examples, CFG)
    features = build_features(augmented, tokenizer, SquadFeatureConfig(max_seq_len=128, doc_stride=32))
    labelled = 0
    for w, e in enumerate(features.example_index):
        example, offsets = augmented[e], features.offsets[w]
        start, end = int(features.start_positions[w]), int(features.end_positions[w])
        context_chars = [off for off in offsets if off is not None]
        if not example.answers:
            assert (start, end) == (0, 0)
            continue
        first = example.answers[0].start
        last = first + len(example.answers[0].text)
        if (start, end) == (0, 0):  # no window that has none may hold the whole answer
            assert not (context_chars[0][0] <= first and context_chars[-1][1] >= last), example.qid
            continue
        labelled += 1
        span = example.context[offsets[start][0] : offsets[end][1]]  # the labelled tokens' text, in this window
        assert example.answers[0].text.strip() in span and len(span) < last - first + 20, (example.qid, span)
    assert labelled >= len(augmented) - sum(1 for ex in augmented if not ex.answers)


def test_the_same_seed_makes_the_same_copies_and_another_seed_others(examples, copies):
    assert augment(examples, CFG) == copies
    assert augment(examples, AugmentConfig(crop=2, repair=1, replace=2, seed=4)) != copies
    assert with_copies(examples, AugmentConfig()) == examples


@pytest.mark.parametrize("override, field", [({"crop": -1}, "augment.crop"),
                                             ({"replace_rate": 0.0}, "augment.replace_rate")])
def test_a_bad_setting_is_named(override, field):
    with pytest.raises(ConfigError, match=field):
        AugmentConfig(**override)
