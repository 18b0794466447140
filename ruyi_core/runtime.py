"""One runtime policy for every stage that loads a model (init, DaE, GRPO, SVD, export, evaluation, packaging,
training): the device and dtype come from the spec's `runtime` section; `auto` means CUDA + bf16 where a GPU
is visible and CPU + fp32 otherwise (bf16 matmuls on these CPUs are slow and fp32 keeps the CPU path exact)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ruyi_core.errors import RuyiError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def vllm(self) -> bool:
        """Whether generation can run in vLLM here: on CUDA, with vLLM installed (the `gpu` extra)."""
        import importlib.util

        return self.cuda and importlib.util.find_spec("vllm") is not None

    def load(self, cls, path, **kw):
        """`cls.from_pretrained(path)` in this runtime's dtype, on its device, in eval mode."""
        return cls.from_pretrained(path, dtype=self.dtype, **kw).to(self.device).eval()

    def __str__(self) -> str:
        return f"{self.device.type} {str(self.dtype).removeprefix('torch.')}"


def resolve(runtime_spec, cuda_available: bool | None = None) -> Runtime:
    """The runtime a spec's `runtime` section (RuntimeSpec) resolves to on this machine."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    device = runtime_spec.device if runtime_spec.device != "auto" else ("cuda" if cuda else "cpu")
    if device == "cuda" and not cuda:
        raise RuyiError("runtime.device is cuda but no GPU is visible here: use runtime.device auto or cpu, or run "
                        "this step on a GPU node (pipeline.resources.<step>.gpus)")
    dtype = runtime_spec.dtype if runtime_spec.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return Runtime(torch.device(device), DTYPES[dtype])


def for_spec(spec, cuda_available: bool | None = None) -> Runtime:
    """The spec's runtime, with its thread count and determinism applied to this process."""
    rt = resolve(spec.runtime, cuda_available)
    if spec.runtime.cpu_threads:
        torch.set_num_threads(spec.runtime.cpu_threads)
    if spec.runtime.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return rt
