"""One runtime policy: CUDA + bf16 where a GPU is visible, CPU + fp32 otherwise, overridable by the spec."""
import pytest
import torch

from conftest import with_demo
from ruyi_core.demo import tokenizer_texts
from ruyi_core.errors import RuyiError
from ruyi_core.runtime import for_spec, resolve
from ruyi_core.spec import RuntimeSpec, parse_spec


def test_auto_follows_the_machine_and_the_spec_overrides_it(monkeypatch):
    auto = RuntimeSpec()
    gpu, cpu = resolve(auto, cuda_available=True), resolve(auto, cuda_available=False)
    assert (gpu.device.type, gpu.dtype, gpu.cuda) == ("cuda", torch.bfloat16, True)
    assert (cpu.device.type, cpu.dtype, cpu.cuda) == ("cpu", torch.float32, False)
    assert resolve(RuntimeSpec(device="cpu"), cuda_available=True).dtype == torch.float32
    assert resolve(RuntimeSpec(dtype="bfloat16"), cuda_available=False).dtype == torch.bfloat16
    with pytest.raises(RuyiError, match="runtime.device is cuda but no GPU is visible"):
        resolve(RuntimeSpec(device="cuda"), cuda_available=False)
    # every stage asks the same function: with CUDA visible the run's spec resolves to CUDA + bf16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert str(for_spec(parse_spec(with_demo()))) == "cuda bfloat16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert str(for_spec(parse_spec(with_demo()))) == "cpu float32"


def test_a_model_loads_in_the_runtime_dtype(tmp_path):
    from transformers import AutoModelForCausalLM

    from ruyi_core.family.convert import build_preset_base

    base, _ = build_preset_base("micro", tokenizer_texts())
    base.save_pretrained(tmp_path)
    m = resolve(RuntimeSpec(dtype="bfloat16"), cuda_available=False).load(AutoModelForCausalLM, tmp_path)
    assert next(m.parameters()).dtype == torch.bfloat16 and not m.training
