"""Every private API of a dependency that the project uses, as the code uses it: an upgrade that renames, removes or
reshapes one fails here, by name, instead of deep inside a training run or an upload."""
import inspect

import pytest
import torch


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_torch():
    from torch.overrides import TorchFunctionMode, _get_current_function_mode, _pop_mode_temporarily

    grads = [torch.ones(3), torch.full((2,), 2.0)]
    torch._foreach_mul_(grads, 0.5)  # megatron/cpu.py: grad clipping
    assert [g.tolist() for g in grads] == [[0.5] * 3, [1.0, 1.0]]
    assert [float(n) for n in torch._foreach_norm(grads)] == pytest.approx([3 ** 0.5 / 2, 2 ** 0.5])
    assert torch._C._are_functorch_transforms_active() is False  # megatron/node.py

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode() as mode:  # megatron/cpu.py: native_torch()
        assert _get_current_function_mode() is mode
        with _pop_mode_temporarily():
            assert _get_current_function_mode() is not mode
    module = torch.nn.Linear(2, 2)  # dae/expand.py: a buffer set in place keeps its persistence
    module.register_buffer("freq", torch.zeros(1), persistent=False)
    module._buffers["freq"] = torch.ones(1)
    assert "freq" not in module.state_dict() and float(module.freq) == 1.0


def test_megatron():
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.tensor_parallel import random as mrandom

    assert hasattr(filesystem_async, "_results_queue")  # megatron/ckpt.py
    assert hasattr(mrandom, "_CUDA_RNG_STATE_TRACKER") and hasattr(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED")


def test_minio():
    from minio import Minio

    client = Minio("127.0.0.1:9", access_key="a", secret_key="b", secure=False)
    assert _params(client._create_multipart_upload) == ["bucket_name", "object_name", "headers"]
    assert _params(client._complete_multipart_upload)[:4] == ["bucket_name", "object_name", "upload_id", "parts"]
    assert _params(client._abort_multipart_upload) == ["bucket_name", "object_name", "upload_id"]
    assert _params(client._upload_part)[:6] == ["bucket_name", "object_name", "data", "headers", "upload_id",
                                                "part_number"]
    assert _params(client._put_object)[:3] == ["bucket_name", "object_name", "data"]
    assert "headers" in _params(client._put_object)
    assert callable(client._http.clear)


def test_kfp():
    from kfp import Client

    assert "self._existing_config = config" in inspect.getsource(Client.__init__)


def test_transformer_engine_is_never_a_silent_fallback(monkeypatch):
    """On a GPU, Transformer Engine that cannot be used is an error naming the fix; local layers only when asked."""
    import builtins

    from ruyi_core.errors import RuyiError
    from ruyi_core.megatron.model import transformer_impl

    assert transformer_impl("auto") == "local"  # the CPU
    with pytest.raises(RuyiError, match="transformer_engine needs CUDA GPUs"):
        transformer_impl("transformer_engine")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_import = builtins.__import__

    def no_te(name, globals=None, locals=None, fromlist=(), level=0):
        if name.startswith("transformer_engine"):
            raise ImportError("No module named 'transformer_engine'")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_te)
    with pytest.raises(RuyiError) as e:
        transformer_impl("auto")
    assert "install transformer-engine[pytorch]" in str(e.value) and "train.transformer_impl: local" in str(e.value)
    assert transformer_impl("local") == "local"
