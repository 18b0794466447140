"""The layering contract: ruyi_core is the library and never imports the application (pipelines/, components/) or
kfp; inside it, each part imports only the parts below it (peers on one layer stay independent), and the demo world
(ruyi_core.demo) is reached only through the data-source resolver. Imports inside functions count: a lazy import is
still a dependency."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APPLICATION = ("pipelines", "components", "kfp")
DEMO, DEMO_DOOR = "ruyi_core.demo", "ruyi_core.data.sources"  # the demo world and the one module that opens it
# Lowest first. A module belongs to the longest entry that prefixes it; the package root (its version and
# registering the family with transformers' Auto classes) may be imported from anywhere. The bottom layer holds
# leaf modules of plain data and functions that the spec validates names against (presets, rewards), the demo, and
# the helpers every layer may call (measurements, plotting).
LAYERS = [
    ["ruyi_core.errors", "ruyi_core.family.presets", "ruyi_core.family.architectures", "ruyi_core.rl.rewards",
     DEMO, "ruyi_core.measure", "ruyi_core.plots"],
    ["ruyi_core.spec.checks"],
    ["ruyi_core.spec", "ruyi_core.runtime", "ruyi_core.launch"],
    ["ruyi_core.store"],
    ["ruyi_core.data"],
    ["ruyi_core.family"],
    ["ruyi_core.megatron", "ruyi_core.dae", "ruyi_core.rl", "ruyi_core.plan"],
    ["ruyi_core.eval"],
    ["ruyi_core.package"],
    ["ruyi_core.report", "ruyi_core.serve"],
    ["ruyi_core.stages"],
    ["ruyi_core.cli"],
]


def _unit(module: str) -> tuple[int, str] | None:
    best = None
    for level, units in enumerate(LAYERS):
        for u in units:
            if (module == u or module.startswith(u + ".")) and (best is None or len(u) > len(best[1])):
                best = (level, u)
    return best


def _imports(path: Path, module: str):
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from ruyi_core import demo` imports the demo module, not just the package root
            named = {f"{base}.{a.name}" for a in node.names}
            yield (DEMO if DEMO in named else base), node.lineno


def violations(root: Path, package: str = "ruyi_core") -> list[str]:
    """One line per import that breaks the contract: `file:line: A imports B (why)`."""
    out = []
    for path in sorted((root / package).rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        src = _unit(module)
        for target, line in _imports(path, module):
            where = f"{path.relative_to(root)}:{line}: {module} imports {target}"
            if target.split(".")[0] in APPLICATION:
                out.append(f"{where} (the library never imports the application or kfp)")
                continue
            is_demo = target == DEMO or target.startswith(DEMO + ".")
            if is_demo and module != DEMO_DOOR and not module.startswith(DEMO):
                out.append(f"{where} (the demo world is reached only through {DEMO_DOOR})")
                continue
            dst = _unit(target) if target.startswith(package + ".") else None
            if src is None or dst is None or src[1] == dst[1]:
                continue
            if dst[0] > src[0]:
                out.append(f"{where} ({dst[1]} is above {src[1]} in the declared layers)")
            elif dst[0] == src[0]:
                out.append(f"{where} ({src[1]} and {dst[1]} are peers: keep them independent)")
    return out


def test_ruyi_core_keeps_its_layers():
    assert all(_unit(m) for m in ("ruyi_core.stages.contract", "ruyi_core.family.names")), "layers lost a part"
    assert violations(ROOT) == []


def test_a_forbidden_import_is_named(tmp_path):
    """The check itself: a library module importing the application, or a lower layer importing a higher one."""
    pkg = tmp_path / "ruyi_core"
    (pkg / "store").mkdir(parents=True)
    (pkg / "store" / "__init__.py").write_text("")
    (pkg / "store" / "artifact.py").write_text("def f():\n    from pipelines.run import run_local\n")
    (pkg / "spec.py").write_text("from .stages import contract\nfrom ruyi_core.errors import RuyiError\n")
    (pkg / "eval.py").write_text("def f():\n    from ruyi_core import demo\n")
    assert violations(tmp_path) == [
        "ruyi_core/eval.py:2: ruyi_core.eval imports ruyi_core.demo (the demo world is reached only through "
        "ruyi_core.data.sources)",
        "ruyi_core/spec.py:1: ruyi_core.spec imports ruyi_core.stages (ruyi_core.stages is above ruyi_core.spec in "
        "the declared layers)",
        "ruyi_core/store/artifact.py:2: ruyi_core.store.artifact imports pipelines.run (the library never imports "
        "the application or kfp)",
    ]


@pytest.mark.slow
def test_ruyi_core_never_imports_kfp():
    code = (
        "import pkgutil, sys, ruyi_core\n"
        "for m in pkgutil.walk_packages(ruyi_core.__path__, 'ruyi_core.'):\n"
        "    __import__(m.name)\n"
        "bad = sorted(n for n in sys.modules if n == 'kfp' or n.startswith('kfp.') or n.startswith('pipelines'))\n"
        "assert not bad, bad\n"
        "print(len([n for n in sys.modules if n.startswith('ruyi_core')]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip().splitlines()[-1]) >= 10
