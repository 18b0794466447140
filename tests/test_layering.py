"""ruyi_core is the library: importing every module of it never imports kfp (components/ and pipelines/ do)."""
import subprocess
import sys


def test_ruyi_core_never_imports_kfp():
    code = (
        "import pkgutil, sys, ruyi_core\n"
        "for m in pkgutil.walk_packages(ruyi_core.__path__, 'ruyi_core.'):\n"
        "    __import__(m.name)\n"
        "bad = sorted(n for n in sys.modules if n == 'kfp' or n.startswith('kfp.'))\n"
        "assert not bad, bad\n"
        "print(len([n for n in sys.modules if n.startswith('ruyi_core')]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip().splitlines()[-1]) >= 10
