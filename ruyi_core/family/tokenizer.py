"""A preset's tokenizer: byte-level BPE trained locally on the run's pretraining texts, with a Qwen-style chat
template. Deterministic for a given vocabulary size and texts."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# What a tokenizer is saved as (HF's fast and slow tokenizers, sentencepiece, the chat template).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "vocab.txt", "merges.txt",
                   "tokenizer.model")
EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}" + IM_START + "{{ m['role'] }}\n{{ m['content'] }}" + IM_END + "\n{% endfor %}"
    "{% if add_generation_prompt %}" + IM_START + "assistant\n{% endif %}"
)


def build_tokenizer(vocab_size: int, texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Train on `texts` (the run's pretraining corpus)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, IM_START, IM_END], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, chat_template=CHAT_TEMPLATE,
        model_max_length=1024, padding_side="left",
    )


def tokenizer_digest(tok) -> str:
    """What a tokenizer does, as a digest: its model, normalizer and pre/post-processing, special tokens and chat
    template. Not its files' bytes, which each save rewrites (transformers adds loading flags to the config)."""
    doc = {"backend": json.loads(tok.backend_tokenizer.to_str()), "chat_template": tok.chat_template,
           "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())}}
    for part in ("padding", "truncation"):  # call-time settings, not the tokenizer
        doc["backend"].pop(part, None)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
