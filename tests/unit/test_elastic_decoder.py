"""The elastic decoder on the tiny random Llama (2 layers, hidden 64, 4 query / 2 key-value heads
of 16, FFN 128): slicing, importance sorting, extraction into a plain LlamaForCausalLM that
runs through the KV-cache step and compiles."""

import dataclasses
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from canao.codesign.elastic import extract
from canao.config import ConfigError
from canao.lab.devices import get_device
from canao.lm.compile import compile_lm
from canao.lm.config import DecoderShape, DecoderSpaceConfig
from canao.lm.model import (
    DecoderSupernet,
    KVCacheStep,
    block_influence,
    importance,
    load_causal_lm,
    load_tokenizer,
    sort_by_importance,
)
from canao.lm.space import DecoderSpace, DecoderSubnet, decoder_params, decoder_shape, evenly_spaced, keep_order
from canao.profiles import load_config

TEACHER = DecoderShape(2, 64, 4, 2, 128)
SPACE = DecoderSpaceConfig(layer_counts=(1, 2), kv_head_counts=(1, 2), ffn_sizes=(32, 64, 96, 128), align=16)


def random_scores(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"kv_heads": torch.rand(2, 2, generator=g), "neurons": torch.rand(2, 128, generator=g)}


@pytest.fixture(scope="module")
def supernet(tiny_lm):
    model = load_causal_lm(tiny_lm)
    sort_by_importance(model, random_scores(0))  # so that slices are not simply the random init's first units
    return DecoderSupernet(model).eval()


def tokens(seed=0, length=12):
    return torch.randint(3, 49152, (2, length), generator=torch.Generator().manual_seed(seed))


def subnets():
    space = DecoderSpace(SPACE, TEACHER)
    rng = random.Random(0)
    return [space.largest(), space.smallest(), DecoderSubnet(2, 1, 96)] + [space.sample(rng) for _ in range(3)]


@pytest.mark.parametrize("subnet", subnets(), ids=lambda s: s.label())
def test_supernet_slice_equals_the_extracted_decoder_exactly(supernet, subnet, tmp_path):
    ids = tokens()
    with torch.no_grad():
        sliced = supernet(subnet, input_ids=ids).logits
        student = extract(supernet, subnet)
        extracted = student(input_ids=ids).logits
    assert torch.equal(sliced, extracted)
    # A plain, physically smaller Llama that loads back with from_pretrained.
    assert type(student) is LlamaForCausalLM
    assert sum(p.numel() for p in student.parameters()) == decoder_params(subnet, TEACHER, 49152, tied_head=True)
    student.save_pretrained(tmp_path)
    reloaded = load_causal_lm(tmp_path)
    assert reloaded.generation_config.eos_token_id == supernet.model.generation_config.eos_token_id
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, extracted)


def test_the_largest_subnet_is_the_teacher(supernet):
    ids = tokens(1)
    with torch.no_grad():
        largest = supernet(DecoderSubnet(2, 2, 128), input_ids=ids).logits
        assert torch.equal(largest, supernet.model(input_ids=ids).logits)


def test_importance_sorting_keeps_the_function_and_puts_the_best_units_first(tiny_lm):
    model = load_causal_lm(tiny_lm)
    ids = tokens(2)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    scores = random_scores(1)
    layer = model.model.layers[1]
    k_before, up_before = layer.self_attn.k_proj.weight.detach().clone(), layer.mlp.up_proj.weight.detach().clone()
    sort_by_importance(model, scores)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-5)
    best_kv, best_neuron = int(scores["kv_heads"][1].argmax()), int(scores["neurons"][1].argmax())
    assert torch.equal(layer.self_attn.k_proj.weight[:16], k_before[16 * best_kv : 16 * best_kv + 16])
    assert torch.equal(layer.mlp.up_proj.weight[0], up_before[best_neuron])


def test_importance_scores_every_kv_group_and_neuron(tiny_lm):
    model = load_causal_lm(tiny_lm)
    scores = importance(model, tokens(3, 16), batches=2, batch_size=1)
    assert scores["kv_heads"].shape == (2, 2) and scores["neurons"].shape == (2, 128)
    assert (scores["kv_heads"] > 0).all() and (scores["neurons"] >= 0).all()
    assert all(p.grad is None for p in model.parameters())


def test_subnet_gradients_reach_only_the_shared_slice(supernet):
    supernet.zero_grad()
    supernet(DecoderSubnet(1, 1, 32), input_ids=tokens()).logits.sum().backward()
    layer = supernet.model.model.layers[1]  # one kept layer: the last
    q, up = layer.self_attn.q_proj.weight.grad, layer.mlp.up_proj.weight.grad
    assert q[:32].abs().sum() > 0 and q[32:].abs().sum() == 0  # one KV head's two query heads of 16
    assert up[:32].abs().sum() > 0 and up[32:].abs().sum() == 0
    assert supernet.model.model.layers[0].mlp.up_proj.weight.grad is None
    supernet.zero_grad()


def test_extracted_decoder_runs_with_a_kv_cache_and_compiles(supernet, tiny_lm, tmp_path):
    student = extract(supernet, DecoderSubnet(1, 1, 64))
    student_dir = tmp_path / "student"
    student.save_pretrained(student_dir)
    load_tokenizer(tiny_lm).save_pretrained(student_dir)
    ids = tokens(4, 10)[:1]
    step = KVCacheStep(load_causal_lm(student_dir), max_context=16).eval()
    with torch.no_grad():
        full = student(input_ids=ids).logits[0]
        keys, values = step.empty_cache()
        logits, keys, values = step(ids[:, :6], torch.tensor([0]), torch.tensor([5]), keys, values)
        torch.testing.assert_close(logits[0], full[5], atol=1e-5, rtol=0)
        for t in range(6, 10):
            logits, keys, values = step(ids[:, t : t + 1], torch.tensor([t]), torch.tensor([0]), keys, values)
            torch.testing.assert_close(logits[0], full[t], atol=1e-5, rtol=0)
    cfg = load_config("compile-lm", "tiny", overrides=[f"tuning_dir={tmp_path / 'tuning'}"])
    manifest = compile_lm(student_dir, get_device("x86-1t"), cfg, tmp_path / "compiled")
    assert set(manifest["backends"]) == {"prefill", "decode"}
    assert all(diff <= cfg.numerics_tol for diff in manifest["metrics"]["numerics_max_abs_diff"].values())


def test_space_rejects_bad_configs_and_subnets():
    teacher = TEACHER
    with pytest.raises(ConfigError, match="space.kv_head_counts: values must be in"):
        DecoderSpace(DecoderSpaceConfig((1, 2), (1, 3), (32, 128), 16), teacher)
    with pytest.raises(ConfigError, match="space.layer_counts: must include the teacher's 2"):
        DecoderSpace(DecoderSpaceConfig((1,), (1, 2), (32, 128), 16), teacher)
    with pytest.raises(ConfigError, match=r"space.ffn_sizes: \[40\] not multiples of space.align"):
        DecoderSpace(DecoderSpaceConfig((1, 2), (1, 2), (40, 128), 16), teacher)
    with pytest.raises(ConfigError, match="space.align: 32 does not divide the head size 16"):
        DecoderSpace(DecoderSpaceConfig((1, 2), (1, 2), (32, 128), 32), teacher)
    space = DecoderSpace(SPACE, teacher)
    with pytest.raises(ValueError, match=r"subnet.kv_heads: 3 not in \[1, 2\]"):
        space.validate(DecoderSubnet(1, 3, 32))
    with pytest.raises(ValueError, match="subnet.ffn_size: 48 not in"):
        space.validate(DecoderSubnet(1, 1, 48))
    with pytest.raises(ValueError, match="subnet: expected keys"):
        DecoderSubnet.from_dict({"num_layers": 1, "kv_heads": 1})
    assert DecoderSubnet.from_dict(DecoderSubnet(2, 1, 64).to_dict()) == DecoderSubnet(2, 1, 64)


def test_the_block_influence_cut_keeps_the_first_and_last_blocks_then_those_that_change_most():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                         num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    influence = block_influence(model, ids, batches=2, batch_size=2)
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states  # inputs of blocks 0..4, normed last
    for i in range(4):  # a block's output is the next block's input
        change = 1 - torch.nn.functional.cosine_similarity(states[i + 1], states[i], dim=-1)
        assert influence[i] == pytest.approx(float(change.mean()), rel=1e-4)
    order = keep_order(influence)
    assert order[:2] == [0, 4] and order[2:] == sorted([1, 2, 3], key=lambda i: -influence[i])
    space_cfg = DecoderSpaceConfig(layer_counts=(2, 3, 5), kv_head_counts=(1,), ffn_sizes=(64,), align=16)
    space = DecoderSpace(space_cfg, decoder_shape(config), order)
    three = space.make(3, 1, 64)
    assert three.layers == tuple(sorted(order[:3])) and three.layer_indices(5) == sorted(order[:3])
    assert space.smallest().layers == (0, 4) and space.largest().layers == ()
    assert DecoderSubnet.from_dict(three.to_dict()) == three and "blocks 0," in three.label()
    assert extract(DecoderSupernet(model), three).config.num_hidden_layers == 3
    spread = DecoderSpace(dataclasses.replace(space_cfg, depth="spread"), decoder_shape(config), order)
    assert spread.make(3, 1, 64).layer_indices(5) == evenly_spaced(3, 5)
    with pytest.raises(ValueError, match="block_order: .* is not an order of the teacher's 5 blocks"):
        DecoderSpace(space_cfg, decoder_shape(config), [0, 4, 1])
    with pytest.raises(ConfigError, match="space.depth: 'deep' is not one of influence, spread"):
        DecoderSpaceConfig(depth="deep")
