"""The tiny preset's tokenizer: byte-level BPE trained locally on the generated demo world, with a
Qwen-style chat template. Deterministic for a given vocabulary size and seed."""
from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from ruyi_core.data import world

EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}" + IM_START + "{{ m['role'] }}\n{{ m['content'] }}" + IM_END + "\n{% endfor %}"
    "{% if add_generation_prompt %}" + IM_START + "assistant\n{% endif %}"
)


def _corpus(seed: int):
    for r in world.pretrain_records(3000, seed):
        yield r["text"]
    for r in world.sft_records(1000, seed):
        for m in r["messages"]:
            yield m["content"]


def build_tokenizer(vocab_size: int, seed: int = 0, texts: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """Train on `texts` (the run's pretraining corpus) or, by default, on the generated demo world."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, IM_START, IM_END], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(seed) if texts is None else texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, chat_template=CHAT_TEMPLATE,
        model_max_length=1024, padding_side="left",
    )
