"""Ruyi Flow's library: familial LLMs (one trunk, one deployable model per exit) and the stages that
train, compress, evaluate and package them. `import ruyi_core` registers the family with transformers' Auto
classes, so `AutoModelForCausalLM.from_pretrained(dir)` needs no remote code. It does so when transformers is
imported (already, or later), so the package root itself stays light: a command that refuses a bad spec never
imports torch."""
import importlib.abc
import importlib.util
import os
import sys

# No hub is reachable: every model and tokenizer is built locally or read from a store.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

__version__ = "0.1.0"
__all__ = ["RuyiConfig", "RuyiForCausalLM", "register", "__version__"]


def register() -> None:
    """Registers the family with transformers' Auto classes (idempotent)."""
    import ruyi_core.family.modeling  # noqa: F401  (registers on import)


class _RegisterWithTransformers(importlib.abc.MetaPathFinder):
    """Registers the family right after transformers' own module has run: only then do its Auto classes exist."""

    def find_spec(self, name, path, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def run_then_register(module):
                run(module)
                config = sys.modules.get("ruyi_core.family.config")
                if config is None or hasattr(config, "RuyiConfig"):  # else the family is loading: it registers
                    register()

            spec.loader.exec_module = run_then_register  # this spec's own loader: nothing else imports through it
        return spec


if "transformers" in sys.modules:
    register()
else:
    sys.meta_path.insert(0, _RegisterWithTransformers())


def __getattr__(name: str):
    if name == "RuyiConfig":
        from ruyi_core.family.config import RuyiConfig

        return RuyiConfig
    if name == "RuyiForCausalLM":
        from ruyi_core.family.modeling import RuyiForCausalLM

        return RuyiForCausalLM
    raise AttributeError(f"module 'ruyi_core' has no attribute {name!r}")
