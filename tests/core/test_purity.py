"""vmpower's functional core (``vmpower/core/``) imports neither Salt nor libvirt: every
decision is a pure function of its inputs, tested here once, whatever Salt release runs."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import vmpower.core

CORE = sorted(f"vmpower.core.{info.name}" for info in pkgutil.iter_modules(vmpower.core.__path__))


def test_the_core_imports_neither_salt_nor_libvirt():
    assert len(CORE) > 5, CORE
    script = ("import sys\n"
              f"for name in {CORE!r}: __import__(name)\n"
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'salt', 'libvirt'}))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=Path(vmpower.core.__file__).parents[2], check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
