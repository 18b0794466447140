"""Ruyi Flow's library: familial LLMs (one trunk, one deployable model per exit) and the stages that
train, compress, evaluate and package them. Importing it registers the family with transformers' Auto
classes, so `AutoModelForCausalLM.from_pretrained(dir)` needs no remote code."""
import os

# No hub is reachable: every model and tokenizer is built locally or read from a store.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from ruyi_core.family.config import RuyiConfig  # noqa: E402
from ruyi_core.family.modeling import RuyiForCausalLM  # noqa: E402

AutoConfig.register(RuyiConfig.model_type, RuyiConfig, exist_ok=True)
AutoModelForCausalLM.register(RuyiConfig, RuyiForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["RuyiConfig", "RuyiForCausalLM", "__version__"]
