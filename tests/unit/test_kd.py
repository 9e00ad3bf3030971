"""The KD machinery finalize and the supernet train with: batches of like length, the teacher's
outputs kept on disk, the QA loss over real tokens only, its attention relations, and its terms
reported apart."""

import json

import pytest
import torch

from canao.bench.suite import STUDENTS_SECTION, TRAINING_SECTION, markdown_section
from canao.cli.main import main
from canao.codesign.kd import TeacherTargets, epoch_batches, fit, relation_kl
from canao.config import ConfigError, KDConfig, TrainConfig, resolve_path
from canao.qa.config import BertShape, QAKDConfig, SquadDataConfig, SquadFeatureConfig
from canao.qa.data import build_features, load_squad
from canao.qa.distill import kd_loss, matched_layers, student_kd_loss, target_layers, teacher_targets
from canao.qa.model import init_qa_model

SHAPE = BertShape(num_layers=3, hidden_size=48, num_heads=3, ffn_size=96)
FEATURES = SquadFeatureConfig(max_seq_len=96, doc_stride=32)


@pytest.fixture(scope="module")
def windows(tokenizer):
    return build_features(load_squad(resolve_path(SquadDataConfig.train_file), 40), tokenizer, FEATURES)


def test_length_pooled_batches_hold_the_same_windows_and_pad_less(windows):
    lengths = windows.lengths()
    plain = epoch_batches(len(windows), 8, seed=3)
    pooled = epoch_batches(len(windows), 8, seed=3, lengths=lengths, pool=4)
    for batches in (plain, pooled):  # every window once per epoch, the same number of steps
        assert sorted(torch.cat(batches).tolist()) == list(range(len(windows)))
        assert len(batches) == -(-len(windows) // 8)
    # without a pool, the batches are those of a plain random permutation (as before pools existed)
    assert torch.equal(torch.cat(plain), torch.randperm(len(windows), generator=torch.Generator().manual_seed(3)))

    def padded(batches):
        return sum(len(b) * int(lengths[b].max()) for b in batches)

    assert padded(pooled) < padded(plain)
    other_epoch = epoch_batches(len(windows), 8, 4, lengths, 4)
    assert not torch.equal(torch.cat(other_epoch), torch.cat(pooled))  # another epoch, another order


def test_kept_teacher_outputs_equal_a_fresh_teacher_pass(windows, tmp_path):
    teacher = init_qa_model("random", SHAPE, seed=0).eval()
    hidden = matched_layers([0, 2])
    calls = []

    def outputs(index):
        calls.append(len(index))
        return teacher_targets(teacher, windows.model_inputs(index), hidden)

    targets = TeacherTargets.compute(tmp_path / "targets", "f1", windows.lengths(), outputs, batch_size=16)
    assert sum(calls) == len(windows)
    index = torch.tensor([5, 0, len(windows) - 1])
    inputs = windows.model_inputs(index)
    with torch.no_grad():
        fresh = teacher_targets(teacher, inputs, hidden)
    kept = targets.batch(index, inputs["input_ids"].shape[1])
    real = inputs["attention_mask"].bool()
    assert set(kept) == {"start_logits", "end_logits", "hidden.0", "hidden.1", "hidden.3"}
    for name, value in fresh.items():
        assert kept[name].shape == value.shape
        # float16 storage: within its rounding on the real tokens, zero on the padding
        torch.testing.assert_close(kept[name][real], value[real], rtol=1e-3, atol=1e-3)
        assert not kept[name][~real].any()
    # the same fingerprint reads them back without the teacher; another computes them anew
    assert TeacherTargets.compute(tmp_path / "targets", "f1", windows.lengths(), outputs, 16).fingerprint == "f1"
    assert sum(calls) == len(windows)
    TeacherTargets.compute(tmp_path / "targets", "f2", windows.lengths(), outputs, 16)
    assert sum(calls) == 2 * len(windows)


def test_the_qa_loss_ignores_padding_and_names_its_terms(windows):
    torch.manual_seed(0)
    student = init_qa_model("random", BertShape(2, 48, 3, 64), seed=1).eval()
    teacher = init_qa_model("random", SHAPE, seed=0).eval()
    index = torch.tensor([0, 1, 2, 3])
    inputs = windows.model_inputs(index)
    mask = inputs["attention_mask"]
    assert not mask.all()  # some padding in this batch
    with torch.no_grad():
        target = teacher_targets(teacher, inputs, matched_layers([0, 2]))
        out = student(**inputs, output_hidden_states=True)
    gold = (windows.start_positions[index], windows.end_positions[index])
    cfg = KDConfig(temperature=2.0, hidden_weight=0.5, hard_weight=0.25)
    terms = kd_loss(out, target, [0, 2], cfg, mask, gold)
    assert set(terms) == {"kl", "hidden", "hard"}
    # whatever the student or the teacher put at padded positions changes nothing
    noise = {k: torch.where(mask.bool().reshape(*mask.shape, *[1] * (v.dim() - 2)), v, torch.randn_like(v) * 50)
             for k, v in target.items()}
    out.start_logits.masked_fill_(mask == 0, 123.0)
    for name, value in kd_loss(out, noise, [0, 2], cfg, mask, gold).items():
        torch.testing.assert_close(value, terms[name])


def test_attention_relations_compare_any_widths_over_real_tokens_only():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    teacher, student = torch.randn(2, 6, 48), torch.randn(2, 6, 32)  # 3 heads of 16 against 2 of 16
    assert relation_kl(teacher, teacher, 4, mask).item() == pytest.approx(0, abs=1e-6)
    kl = relation_kl(student, teacher, 4, mask)
    assert kl.item() > 0
    # what either side holds at padded positions changes nothing
    padded = mask[..., None] == 0
    torch.testing.assert_close(relation_kl(student.masked_fill(padded, 9.0), teacher.masked_fill(padded, -7.0), 4,
                                           mask), kl)
    with pytest.raises(ValueError, match="kd.relation_heads: 5 does not divide the student's attention width 32"):
        relation_kl(student, teacher, 5, mask)
    with pytest.raises(ConfigError, match="kd.attention_weight"):
        QAKDConfig(attention_weight=-1.0)


def test_attention_kd_trains_the_students_last_layer_from_the_teachers_kept_input(windows):
    teacher = init_qa_model("random", SHAPE, seed=0).eval().requires_grad_(False)
    student = init_qa_model("random", BertShape(2, 48, 2, 64), seed=1)
    cfg = QAKDConfig(hidden_weight=0.0, attention_weight=1.0)
    # the teacher's last layer's input is kept whatever the hidden-state KD asks for
    assert target_layers([[0, 2]], cfg, SHAPE.num_layers) == [2]
    assert target_layers([[0, 2], [1]], QAKDConfig(), SHAPE.num_layers) == [0, 1, 2, 3]
    hidden = target_layers([[0, 2]], cfg, SHAPE.num_layers)

    def targets_of(index, inputs):
        with torch.no_grad():
            return teacher_targets(teacher, inputs, hidden)

    index = torch.tensor([0, 1, 2, 3])
    terms = student_kd_loss(targets_of, [0, 2], cfg, teacher)(student, windows, index)
    assert set(terms) == {"kl", "attention"} and terms["attention"].item() > 0
    terms["attention"].backward()
    last, first = student.bert.encoder.layer[-1].attention.self, student.bert.encoder.layer[0].attention.self
    assert last.query.weight.grad.abs().sum() > 0 and last.value.weight.grad.abs().sum() > 0
    assert first.query.weight.grad.abs().sum() > 0  # through the last layer's input
    plain = student_kd_loss(targets_of, [0, 2], QAKDConfig(hidden_weight=0.0), teacher)(student, windows, index)
    assert "attention" not in plain


def test_fit_reports_each_loss_term_and_its_speed(windows, tmp_path):
    model = init_qa_model("random", SHAPE, seed=0)

    def loss_fn(net, feats, index):
        out = net(**feats.model_inputs(index))
        return {"a": out.start_logits.pow(2).mean(), "b": out.end_logits.pow(2).mean()}

    cfg = TrainConfig(epochs=1, batch_size=16, bf16=False, length_pool=2)
    stats = fit(model, windows, loss_fn, cfg, 0, tmp_path, "f", lengths=windows.lengths())
    assert set(stats["final_loss_terms"]) == {"a", "b"}
    assert stats["final_loss"] == pytest.approx(sum(stats["final_loss_terms"].values()), abs=1e-3)
    assert stats["windows_per_s"] > 0


def test_bench_kd_times_both_recipes_into_its_section(tmp_path, capsys):
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text("# Benchmarks\n\n## Serving load test\n\nkept as it is\n")
    subnet = '{"num_layers": 1, "hidden_size": 384, "heads": [2], "ffn_sizes": [256]}'
    assert main(["bench-kd", "--profile", "tiny", "--questions", "8", "--seq-len", "64", "--subnet", subnet,
                 "--benchmarks", str(benchmarks), "--work-dir", str(tmp_path / "work")]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("\n{") + 1:])  # the figures follow the progress lines
    assert result["teacher_every_step"]["steps"] == result["kept_targets"]["steps"] > 0
    assert result["teacher_every_step"]["windows_per_s"] > 0 and result["kept_targets"]["targets_seconds"] > 0
    section = markdown_section(benchmarks.read_text(), TRAINING_SECTION)
    assert f"| {result['kept_targets']['windows_per_s']} |" in section and "`canao bench-kd" in section
    assert "kept as it is" in benchmarks.read_text()


def test_bench_students_distils_each_candidate_alike_into_its_section(memorized_qa, tmp_path, capsys):
    subnets = tmp_path / "subnets.json"
    subnets.write_text(json.dumps([{"num_layers": 1, "hidden_size": 16, "heads": [1], "ffn_sizes": [32]},
                                   {"num_layers": 2, "hidden_size": 32, "heads": [2, 2], "ffn_sizes": [64, 32],
                                    "layers": [0, 1]}]))
    benchmarks, out = tmp_path / "BENCHMARKS.md", tmp_path / "students.json"
    benchmarks.write_text("# Benchmarks\n\n## Serving load test\n\nkept as it is\n")
    assert main(["bench-students", "--profile", "tiny", "--teacher", str(memorized_qa[0]), "--subnets", str(subnets),
                 "--questions", "6", "--eval-questions", "4", "--seq-len", "64", "--importance-batches", "1",
                 "--set", "kd.attention_weight=1.0",
                 "--out", str(out), "--benchmarks", str(benchmarks), "--work-dir", str(tmp_path / "work")]) == 0
    result = json.loads(out.read_text())
    rows = result["students"]
    assert all("attention" in r["final_loss_terms"] for r in rows)  # relation KD from the kept targets
    assert [r["subnet"]["num_layers"] for r in rows] == [1, 2] and rows[1]["subnet"]["layers"] == [0, 1]
    assert rows[0]["steps"] == rows[1]["steps"] > 0 and rows[0]["flops"] < rows[1]["flops"]
    assert result["eval_questions"] == 4 and result["command"].startswith("canao bench-students")
    section = markdown_section(benchmarks.read_text(), STUDENTS_SECTION)
    assert all(f"| {r['label']} |" in section for r in rows) and "kept as it is" in benchmarks.read_text()

    for bad, named in (('[{"num_layers": 1}]', "[0]: expected keys"),
                       ('[{"num_layers": 1, "hidden_size": 48, "heads": [1], "ffn_sizes": [32]}]',
                        "subnets[0]: subnet.hidden_size: 48 not in [16, 32]")):
        subnets.write_text(bad)
        assert main(["bench-students", "--profile", "tiny", "--teacher", str(memorized_qa[0]), "--subnets",
                     str(subnets), "--out", str(tmp_path / "bad.json"), "--work-dir", str(tmp_path / "work")]) == 2
        assert f"--subnets {subnets}: " in (err := capsys.readouterr().err) and named in err, err
        assert not (tmp_path / "bad.json").exists()
