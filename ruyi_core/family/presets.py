"""Base-model presets built locally (configs as data). Nothing is downloaded: the tokenizer is trained
on the generated demo world and the weights are random with a fixed seed."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preset:
    tokenizer_vocab: int  # BPE target; the demo world's closed vocabulary may stop short of it
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    initializer_range: float = 0.02

    def qwen3_kwargs(self, vocab_size: int) -> dict:
        kw = asdict(self)
        del kw["tokenizer_vocab"]
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
        return kw | {"vocab_size": vocab_size}


PRESETS: dict[str, Preset] = {
    # The demo: 12 layers, exits [1, 4, 11]: the edge holds Ruyi2's share of the cloud's parameters (specs/tiny.yaml).
    "tiny": Preset(tokenizer_vocab=4096, hidden_size=192, intermediate_size=512, num_hidden_layers=12,
                   num_attention_heads=6, num_key_value_heads=2, head_dim=32),
    # Tests: small enough that a forward pass is a few milliseconds.
    "micro": Preset(tokenizer_vocab=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256),
}
