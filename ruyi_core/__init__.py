"""Ruyi Flow's library: familial LLMs (one trunk, one deployable model per exit) and the stages that
train, compress, evaluate and package them. Importing `ruyi_core.family.modeling` (or calling `register()`)
registers the family with transformers' Auto classes, so `AutoModelForCausalLM.from_pretrained(dir)` needs no
remote code. The package root itself stays light: a command that refuses a bad spec never imports torch."""
import os

# No hub is reachable: every model and tokenizer is built locally or read from a store.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

__version__ = "0.1.0"
__all__ = ["RuyiConfig", "RuyiForCausalLM", "register", "__version__"]


def register() -> None:
    """Registers the family with transformers' Auto classes (idempotent)."""
    import ruyi_core.family.modeling  # noqa: F401  (registers on import)


def __getattr__(name: str):
    if name == "RuyiConfig":
        from ruyi_core.family.config import RuyiConfig

        return RuyiConfig
    if name == "RuyiForCausalLM":
        from ruyi_core.family.modeling import RuyiForCausalLM

        return RuyiForCausalLM
    raise AttributeError(f"module 'ruyi_core' has no attribute {name!r}")
