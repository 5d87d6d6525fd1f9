"""vmpower's Salt modules are never taken for the vmpower library.

Salt puts a module's directory on sys.path while it executes the module, so a module named
``vmpower.py`` is what ``from vmpower import ...`` finds when the library is not importable
(yet): a minion that loads the execution module between ``saltutil.sync_all``'s copy of
``_modules`` and its copy of ``_utils``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KINDS = ("_modules", "_states", "_runners", "_returners", "_beacons")


@pytest.mark.parametrize("kind", KINDS)
def test_a_salt_module_refuses_to_be_imported_as_the_library(kind):
    spec = importlib.util.spec_from_file_location("vmpower", REPO / kind / "vmpower.py")
    with pytest.raises(ImportError, match="No module named 'vmpower'"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


# Run without site's .pth files: the editable install's finder would find the library.
LOADER_RUN = textwrap.dedent("""
    import json, os, shutil, sys
    sys.path.append(sys.argv[3])
    import salt.config, salt.loader

    repo, root = sys.argv[1], sys.argv[2]
    ext = os.path.join(root, "extmods")
    os.makedirs(os.path.join(ext, "modules"))
    shutil.copy(os.path.join(repo, "_modules", "vmpower.py"), os.path.join(ext, "modules"))
    opts = salt.config.minion_config(None)
    opts.update(extension_modules=ext, cachedir=os.path.join(root, "cache"), grains={},
                pillar={}, file_client="local")

    def status():
        funcs = salt.loader.minion_mods(opts, utils=salt.loader.utils(opts))
        return "vmpower.status" in funcs, funcs.missing_fun_string("vmpower.status")

    seen = {"before": status()}
    os.makedirs(os.path.join(ext, "utils"))
    os.symlink(os.path.join(repo, "vmpower"), os.path.join(ext, "utils", "vmpower"))
    seen["after"] = status()  # new loaders, as a minion's module refresh makes
    seen["library"] = getattr(sys.modules.get("vmpower"), "__file__", None)
    print(json.dumps(seen))
""")


def test_the_module_loaded_before_its_library_is_synced_loads_once_the_library_is(tmp_path):
    out = subprocess.run(
        [sys.executable, "-S", "-c", LOADER_RUN, str(REPO), str(tmp_path),
         sysconfig.get_paths()["purelib"]],
        capture_output=True, text=True, cwd=tmp_path, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.splitlines()[-1])
    available, reason = seen["before"]
    assert not available and "the vmpower library cannot be imported" in reason, reason
    assert seen["after"][0] is True, seen
    assert seen["library"] == str(tmp_path / "extmods" / "utils" / "vmpower" / "__init__.py")
