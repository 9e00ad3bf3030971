"""The search space and the elastic supernet: slicing, importance sorting, extraction."""

import dataclasses
import itertools
import random

import pytest
import torch

from canao.codesign.elastic import extract
from canao.codesign.pareto import first_fitting, priced_within
from canao.config import ConfigError
from canao.qa.config import BertShape, SpaceConfig
from canao.qa.model import Supernet, init_qa_model, load_qa_model, sort_by_importance
from canao.qa.modeling_canao_bert import CanaoBertForQuestionAnswering
from canao.qa.space import (
    SearchSpace,
    SubnetConfig,
    first_layers_spread,
    params,
    uniform_baseline,
    uniform_per_depth,
    uniform_subnets,
)

SHAPE = BertShape(num_layers=3, hidden_size=48, num_heads=3, ffn_size=96)  # head size 16
SPACE = SpaceConfig(layer_counts=(1, 2, 3), hidden_sizes=(16, 32, 48), head_counts=(1, 2, 3),
                    ffn_sizes=(32, 64, 96), align=16)


@pytest.fixture(scope="module")
def supernet():
    model = init_qa_model("random", SHAPE, seed=0).eval()
    return Supernet(model).eval()


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (2, 24), generator=g)
    types = torch.zeros_like(ids)
    types[:, 8:] = 1
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


def subnets():
    space = SearchSpace(SPACE, BertShape.of(init_qa_model("random", SHAPE, 0).config))
    rng = random.Random(0)
    return [space.largest(), space.smallest(), SubnetConfig(2, 32, (2, 1), (96, 32)),
            SubnetConfig(2, 32, (2, 2), (64, 64), layers=(0, 1))] + [space.sample(rng)
                                                                                         for _ in range(5)]


@pytest.mark.parametrize("subnet", subnets(), ids=lambda s: s.label())
def test_supernet_slice_equals_the_extracted_model_exactly(supernet, subnet, tmp_path):
    x = inputs()
    with torch.no_grad():
        sliced = supernet(subnet, **x)
        student = extract(supernet, subnet)
        extracted = student(**x)
    assert torch.equal(sliced.start_logits, extracted.start_logits)
    assert torch.equal(sliced.end_logits, extracted.end_logits)
    # Physically smaller: exactly the subnet's parameters, and it loads back with from_pretrained.
    assert sum(p.numel() for p in student.parameters()) == params(subnet, supernet.shape, 30522, 512)
    student.save_pretrained(tmp_path)
    reloaded = load_qa_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**x).start_logits, extracted.start_logits)


def test_the_largest_subnet_is_the_teacher(supernet):
    x = inputs(1)
    space = SearchSpace(SPACE, supernet.shape)
    with torch.no_grad():
        assert torch.equal(supernet(space.largest(), **x).start_logits, supernet.model(**x).start_logits)


def test_importance_sorting_keeps_the_function_and_puts_the_best_units_first():
    model = init_qa_model("random", SHAPE, seed=1).eval()
    x = inputs(2)
    with torch.no_grad():
        before = model(**x).start_logits
    scores = {"heads": torch.rand(3, 3), "neurons": torch.rand(3, 96), "channels": torch.rand(48)}
    ffn_in = model.bert.encoder.layer[0].intermediate.dense.weight.detach().clone()
    sort_by_importance(model, scores)
    with torch.no_grad():
        torch.testing.assert_close(model(**x).start_logits, before, rtol=0, atol=1e-5)
    best_neuron, best_channel = scores["neurons"][0].argmax(), scores["channels"].argmax()
    assert torch.equal(model.bert.encoder.layer[0].intermediate.dense.weight[0, 0], ffn_in[best_neuron, best_channel])


def test_subnet_gradients_reach_only_the_shared_slice(supernet):
    subnet = SubnetConfig(1, 16, (1,), (32,))
    supernet.zero_grad()
    supernet(subnet, **inputs()).start_logits.sum().backward()
    layer = supernet.model.bert.encoder.layer[0]  # one kept layer: the first
    grad = layer.intermediate.dense.weight.grad
    assert grad[:32, :16].abs().sum() > 0 and grad[32:].abs().sum() == 0 and grad[:, 16:].abs().sum() == 0
    assert supernet.model.bert.encoder.layer[2].intermediate.dense.weight.grad is None
    supernet.zero_grad()


def test_space_rejects_bad_configs_and_subnets():
    teacher = BertShape(3, 48, 3, 96)
    with pytest.raises(ConfigError, match="space.ffn_sizes: values must be in"):
        SearchSpace(SpaceConfig((1, 3), (16, 48), (1, 3), (32, 128), 16), teacher)
    with pytest.raises(ConfigError, match="space.hidden_sizes: must include the teacher's 48"):
        SearchSpace(SpaceConfig((1, 3), (16, 32), (1, 3), (32, 96), 16), teacher)
    with pytest.raises(ConfigError, match=r"space.ffn_sizes: \[40\] not multiples of space.align"):
        SearchSpace(SpaceConfig((1, 3), (16, 48), (1, 3), (40, 96), 16), teacher)
    space = SearchSpace(SPACE, teacher)
    with pytest.raises(ValueError, match=r"subnet.heads\[0\]: 3 not in \[1\]"):
        space.validate(SubnetConfig(1, 16, (3,), (32,)))
    with pytest.raises(ValueError, match="subnet.ffn_sizes: 1 values for 2 layers"):
        space.validate(SubnetConfig(2, 32, (1, 2), (32,)))
    with pytest.raises(ValueError, match="subnet.num_layers: 4 not in"):
        space.validate(SubnetConfig(4, 32, (1,) * 4, (32,) * 4))
    assert SubnetConfig(3, 16, (1,) * 3, (32,) * 3).layer_indices(6) == [0, 2, 4]
    assert SubnetConfig(3, 16, (1,) * 3, (32,) * 3, layers=(1, 3, 5)).layer_indices(6) == [1, 3, 5]
    with pytest.raises(ValueError, match=r"subnet.layers: \[2, 0\] must be 2 distinct"):
        SubnetConfig(2, 32, (1, 1), (32, 32), layers=(2, 0))
    with pytest.raises(ValueError, match=r"subnet.layers: \[1, 3\] past the teacher's 3"):
        space.validate(SubnetConfig(2, 32, (1, 1), (32, 32), layers=(1, 3)))
    kept = SubnetConfig(2, 32, (1, 1), (32, 32), layers=(0, 2))
    assert SubnetConfig.from_dict(kept.to_dict()) == kept
    assert "layers" not in SubnetConfig(1, 16, (1,), (32,)).to_dict()  # fronts written before keep their form


def test_the_uniform_baseline_is_the_largest_uniform_subnet_within_its_budget():
    space = SearchSpace(SPACE, SHAPE)

    def ms(subnet):  # a latency that grows with the subnet
        return params(subnet, SHAPE, 0, 0) / 1000

    uniform_sizes = sorted({ms(s) for s in (space.largest(), space.smallest())})
    for budget in (uniform_sizes[0], 20.0, 30.0, uniform_sizes[1]):
        baseline = uniform_baseline(space, ms, budget)
        assert ms(baseline) <= budget
        assert baseline.layers == tuple(first_layers_spread(baseline.num_layers, SHAPE.num_layers))
        assert baseline.layers[0] == 0 and len(set(baseline.heads)) == len(set(baseline.ffn_sizes)) == 1
        for heads in range(1, 4):  # no larger uniform subnet of its depth and width fits as well
            for ffn in SPACE.ffn_sizes:
                other = SubnetConfig(baseline.num_layers, baseline.hidden_size, (heads,) * baseline.num_layers,
                                     (ffn,) * baseline.num_layers, baseline.layers)
                if heads <= space.max_heads(baseline.hidden_size) and ms(other) > ms(baseline):
                    assert ms(other) > budget
    assert uniform_baseline(space, ms, uniform_sizes[1]) == dataclasses.replace(space.largest(), layers=(0, 1, 2))
    # below the smallest subnet: the fastest uniform one, its latency over the budget for all to see
    assert uniform_baseline(space, ms, 0.1) == dataclasses.replace(space.smallest(), layers=(0,))
    assert first_layers_spread(3, 6) == [0, 2, 4] and first_layers_spread(2, 6) == [0, 3]


def test_each_depths_largest_uniform_subnet_within_a_budget_seeds_the_search():
    space = SearchSpace(SPACE, SHAPE)

    def ms(subnet):  # a latency that grows with the subnet
        return params(subnet, SHAPE, 0, 0) / 1000

    uniform = uniform_subnets(space)
    for budget in sorted({ms(s) for s in uniform})[::3]:
        seeds = uniform_per_depth(space, ms, budget)
        depths = [s.num_layers for s in seeds]
        assert depths == sorted({s.num_layers for s in uniform if ms(s) <= budget}, reverse=True)
        for seed in seeds:  # within the budget, and no larger uniform subnet of its depth is
            assert ms(seed) <= budget
            assert all(ms(s) > budget for s in uniform if s.num_layers == seed.num_layers
                       and params(s, SHAPE, 0, 0) > params(seed, SHAPE, 0, 0))
        assert uniform_baseline(space, ms, budget) in seeds


def test_a_student_loads_with_canaos_classes_and_never_runs_its_saved_modeling_file(supernet, tmp_path):
    student = extract(supernet, SubnetConfig(2, 32, (2, 1), (96, 32)))
    student.save_pretrained(tmp_path / "student")
    marker = tmp_path / "the-modeling-file-ran"
    modeling = tmp_path / "student" / "modeling_canao_bert.py"
    assert modeling.is_file()  # kept for users outside canao
    modeling.write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit('tampered modeling file')\n")
    reloaded = load_qa_model(tmp_path / "student")
    assert type(reloaded) is CanaoBertForQuestionAnswering and not marker.exists()
    x = inputs()
    with torch.no_grad():
        assert torch.equal(reloaded(**x).start_logits, student(**x).start_logits)


def test_the_measured_baseline_is_the_largest_uniform_subnet_that_measures_within_its_budget():
    """`first_fitting` over `uniform_subnets`, as the search holds the baseline to a budget as measured:
    a shape priced over the budget but measured under it may be the baseline; one priced past the
    slack is never timed; the tries are capped; none fitting is None."""
    space = SearchSpace(SPACE, SHAPE)
    uniform = uniform_subnets(space)
    assert all(params(a, SHAPE, 0, 0) >= params(b, SHAPE, 0, 0) for a, b in itertools.pairwise(uniform))
    assert uniform_baseline(space, lambda s: params(s, SHAPE, 0, 0), 1e12) == uniform[0]

    def priced(subnet):  # the latency model: 10 % over what the device measures
        return params(subnet, SHAPE, 0, 0) / 1000 * 1.1

    timed = []

    def measure(subnet):
        timed.append(subnet)
        return {"litert": params(subnet, SHAPE, 0, 0) / 1000 * 1.3, "litert-int8": params(subnet, SHAPE, 0, 0) / 1000}

    budget = params(uniform[len(uniform) // 2], SHAPE, 0, 0) / 1000  # that one measures exactly the budget
    candidates = priced_within(uniform, priced, budget, slack=0.25, count=len(uniform))
    assert all(priced(s) <= budget * 1.25 for s in candidates) and candidates == [
        s for s in uniform if priced(s) <= budget * 1.25]  # largest first, nothing priced past the slack
    baseline, ms = first_fitting(candidates, measure, budget)
    assert min(ms.values()) <= budget and priced(baseline) > budget  # priced over, measured within: it fits
    assert all(min(measure(s).values()) > budget for s in timed[:-1])  # the larger ones tried first did not
    assert uniform_baseline(space, priced, budget) != baseline  # by price alone, a smaller one
    timed.clear()
    assert first_fitting(priced_within(uniform, priced, 0.5, 0.25, 2), measure, 0.5) is None and len(timed) <= 2


def test_a_subnets_larger_neighbours_step_one_layer_or_every_layer_one_choice_up():
    space = SearchSpace(SPACE, SHAPE)
    subnet = SubnetConfig(3, 32, (1, 2, 2), (32, 96, 64))  # hidden 32 holds at most 2 heads
    steps = space.larger_neighbours(subnet)
    assert steps == [SubnetConfig(3, 32, (2, 2, 2), (32, 96, 64)),
                     SubnetConfig(3, 32, (1, 2, 2), (64, 96, 64)), SubnetConfig(3, 32, (1, 2, 2), (32, 96, 96)),
                     SubnetConfig(3, 32, (1, 2, 2), (64, 96, 96))]
    assert space.larger_neighbours(space.largest()) == []
