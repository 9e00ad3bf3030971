"""The hardware identity and the defaults that follow it: bf16 autocast only where the CPU computes
bfloat16 natively, and a tuning database or latency measurements from other hardware refused."""

import json
import re

import pytest
import torch

from canao import hardware
from canao.codesign.kd import fit
from canao.compile.relax import TUNING_HARDWARE, open_tuning_database
from canao.config import ConfigError, TrainConfig
from canao.hardware import Hardware, HardwareMismatch, autocast_bf16, check_same, read_cpuinfo
from canao.lab.devices import get_device
from canao.manifest import write_manifest
from canao.profiles import load_config
from canao.qa.latency import fit_latency_model
from canao.qa.model import init_qa_model

ZEN3 = Hardware(cpu="AMD EPYC 7B13, family 25 model 1", arch="x86_64", isa=("avx2", "fma"), cores=1, mcpu="znver3")
ZEN4 = Hardware(cpu="AMD EPYC 9B14, family 25 model 17", arch="x86_64",
                isa=("avx2", "avx512", "avx512_bf16", "avx512_vnni", "fma"), cores=1, mcpu="znver4")

ZEN3_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx fma avx2 bmi2

processor\t: 1
model name\t: (the second processor repeats the first)
"""
GRAVITON3_CPUINFO = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes asimddp sve i8mm bf16
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""


def test_cpuinfo_gives_the_name_family_model_and_the_flags_that_matter():
    name, flags = read_cpuinfo(ZEN3_CPUINFO)
    assert name == "AMD EPYC 7B13, family 25 model 1" and {"avx2", "fma"} <= flags and "avx512f" not in flags
    name, flags = read_cpuinfo(GRAVITON3_CPUINFO)
    assert name == "0xd40" and {"asimd", "asimddp", "bf16", "i8mm"} <= flags


def test_bf16_auto_follows_the_reported_capability_both_ways():
    on, why = autocast_bf16("auto", "cpu", (ZEN4.cpu, ZEN4.isa))
    assert on and "natively (avx512_bf16)" in why
    off, why = autocast_bf16("auto", "cpu", (ZEN3.cpu, ZEN3.isa))
    assert not off and ZEN3.cpu in why and "no native bfloat16" in why
    assert autocast_bf16("auto", "cpu", ("Graviton3", ("bf16", "neon")))[0]


def test_a_forced_bf16_wins_over_the_hardware():
    assert autocast_bf16(True, "cpu", (ZEN3.cpu, ZEN3.isa)) == (True, "bf16=true set in the config")
    assert autocast_bf16(False, "cpu", (ZEN4.cpu, ZEN4.isa)) == (False, "bf16=false set in the config")


def test_bf16_defaults_to_auto_and_refuses_other_words():
    assert TrainConfig().bf16 == "auto" and load_config("teacher", "quick").train.bf16 == "auto"
    assert load_config("teacher", "tiny", overrides=["train.bf16=true"]).train.bf16 is True
    with pytest.raises(ConfigError, match="train.bf16: must be auto, true or false, got 'maybe'"):
        load_config("teacher", "tiny", overrides=["train.bf16=maybe"])
    with pytest.raises(ConfigError, match="train.bf16: expected bool or str, got 1"):
        load_config("teacher", "tiny", overrides=["train.bf16=1"])


@pytest.mark.parametrize("cpu, autocast", [(ZEN3, "fp32"), (ZEN4, "bf16")])
def test_training_uses_the_choice_and_says_it_on_the_progress_line_and_in_its_stats(cpu, autocast, tmp_path,
                                                                                     monkeypatch, capsys):
    monkeypatch.setattr(hardware, "host_cpu", lambda: (cpu.cpu, cpu.isa))
    seen = []

    def loss_fn(model, examples, index):
        seen.append(torch.is_autocast_enabled("cpu"))
        return model(examples[index]).pow(2).mean()

    model = torch.nn.Linear(4, 1)
    stats = fit(model, torch.randn(8, 4), loss_fn, TrainConfig(epochs=1, batch_size=4), 0, tmp_path, "x")
    assert seen == [autocast == "bf16"] * 2
    assert stats["precision"]["autocast"] == autocast and stats["precision"]["bf16"] == "auto"
    assert cpu.cpu in stats["precision"]["why"] and stats["threads"] == torch.get_num_threads()
    assert f"train: {autocast} autocast, {stats['threads']} threads ({stats['precision']['why']})" in \
        capsys.readouterr().out


def test_check_same_names_both_identities_and_yields_to_the_user(capsys):
    check_same(ZEN4.to_dict(), ZEN4, "db", reuse=False)
    with pytest.raises(HardwareMismatch) as refused:
        check_same(ZEN4.to_dict(), ZEN3, "outputs/tuning/x86-1t: tuning database", reuse=False)
    assert ZEN4.label() in str(refused.value) and ZEN3.label() in str(refused.value)
    assert "reuse_other_hardware=true" in str(refused.value)
    with pytest.raises(HardwareMismatch, match="made on hardware it does not record"):
        check_same(None, ZEN3, "db", reuse=False)
    check_same(ZEN4.to_dict(), ZEN3, "db", reuse=True)
    assert "used anyway (reuse_other_hardware)" in capsys.readouterr().out


def test_a_tuning_database_records_its_hardware_and_refuses_another(tmp_path):
    database = tmp_path / "x86-1t"
    database.mkdir()
    open_tuning_database(database, ZEN4, reuse_other_hardware=False)
    assert Hardware.from_dict(json.loads((database / TUNING_HARDWARE).read_text())) == ZEN4
    open_tuning_database(database, ZEN4, reuse_other_hardware=False)  # the same CPU: reused
    with pytest.raises(HardwareMismatch, match=f"tuning database: made on {re.escape(ZEN4.label())}, not on this "
                                               f"device's {re.escape(ZEN3.label())}"):
        open_tuning_database(database, ZEN3, reuse_other_hardware=False)
    open_tuning_database(database, ZEN3, reuse_other_hardware=True)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "database_workload.json").write_text("")
    with pytest.raises(HardwareMismatch, match="does not record"):
        open_tuning_database(legacy, ZEN3, reuse_other_hardware=False)


def test_a_latency_stage_output_from_other_hardware_is_refused_before_measuring(tmp_path, monkeypatch):
    teacher, out = tmp_path / "teacher", tmp_path / "latency"
    init_qa_model("random", load_config("teacher", "tiny").random_shape, seed=0).config.save_pretrained(teacher)
    out.mkdir()
    write_manifest(out, "latency", {}, {}, config_hash="any", hardware=ZEN4.to_dict())
    monkeypatch.setattr(hardware, "host", lambda cores=None: ZEN3)
    with pytest.raises(HardwareMismatch, match=f"latency model: made on {re.escape(ZEN4.label())}, not on this "
                                               f"device's {re.escape(ZEN3.label())}"):
        fit_latency_model(load_config("latency", "tiny"), get_device("x86-1t"), out, teacher)
