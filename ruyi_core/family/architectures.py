"""The published Qwen3 dense bases' architectures (their config.json fields that decide sizes), as data.

`ruyi plan` sizes a run from these when the base lives in a store it cannot read, and the rehearsal builds a
random base of Qwen3-0.6B's exact shape from them. Matched by the base's last path part, so
`s3://ruyi/bases/Qwen3-14B-Base` is Qwen3-14B."""
from __future__ import annotations

import re

_COMMON = {"vocab_size": 151936, "head_dim": 128, "num_key_value_heads": 8, "max_position_embeddings": 40960,
           "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu", "model_type": "qwen3",
           "attention_bias": False, "torch_dtype": "bfloat16"}


def _qwen3(hidden: int, intermediate: int, layers: int, heads: int, tied: bool) -> dict:
    return _COMMON | {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
                      "num_attention_heads": heads, "tie_word_embeddings": tied}


QWEN3: dict[str, dict] = {
    "Qwen3-0.6B": _qwen3(1024, 3072, 28, 16, tied=True),
    "Qwen3-1.7B": _qwen3(2048, 6144, 28, 16, tied=True),
    "Qwen3-4B": _qwen3(2560, 9728, 36, 32, tied=True),
    "Qwen3-8B": _qwen3(4096, 12288, 36, 32, tied=False),
    "Qwen3-14B": _qwen3(5120, 17408, 40, 40, tied=False),
    "Qwen3-32B": _qwen3(5120, 25600, 64, 64, tied=False),
}


def known_architecture(base: str) -> dict | None:
    """The published config of a base named like a Qwen3 release (`.../Qwen3-14B-Base`), or None."""
    name = base.rstrip("/").rsplit("/", 1)[-1]
    m = re.fullmatch(r"(Qwen3-[0-9.]+B)(-Base|-Instruct)?", name, flags=re.IGNORECASE)
    if m is None:
        return None
    return next((dict(cfg) for key, cfg in QWEN3.items() if key.lower() == m.group(1).lower()), None)
