"""What a production minion receives: the files of the built wheel and of the file_roots sync.

Both lists come from the real thing: the wheel is built by pip from the checkout's files, as
``pip install .`` builds it, and the file_roots list is what Salt's own ``saltutil.sync_all``
copies into a (masterless) minion's extension_modules from the repository's Salt directories.
Nothing of the test lab (``vmpower_lab``: it kills libvirtd, edits qemu.conf, adds users) may
be in either, and the library itself must be in both.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import salt.config
import salt.loader

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "vmpower_lab"


def _checkout_files() -> list:
    """The files a fresh clone of this checkout would have (tracked, plus new untracked ones
    not ignored), relative to the repository root."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, capture_output=True, check=False)
    if out.returncode != 0:
        pytest.skip(f"not a git checkout: {out.stderr.decode().strip()}")
    return [Path(name) for name in out.stdout.decode().split("\0") if name and (REPO / name).is_file()]


def _lab_files() -> set:
    return {path.name for path in LAB.glob("*.py") if path.name != "__init__.py"}


def _lab_findings(names) -> list:
    """The names (paths inside a wheel or a sync) that are, or smell of, the test lab."""
    lab_modules = _lab_files()
    found = []
    for name in names:
        if any(part.startswith("vmpower_lab") for part in Path(name).parts) or Path(name).name in lab_modules:
            found.append(name)
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel --no-deps`` of a copy of the checkout (a build writes build/ and *.egg-info
    next to its source), in pip's isolated build environment."""
    dest = tmp_path_factory.mktemp("wheel")
    source = dest / "source"
    for name in _checkout_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        if (REPO / name).is_symlink():
            (source / name).symlink_to((REPO / name).readlink())
        else:
            shutil.copy2(REPO / name, source / name)
    out = dest / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q",
         "-w", str(out), str(source)], capture_output=True, text=True, cwd=dest, check=False)
    wheels = sorted(out.glob("vmpower-*.whl"))
    assert result.returncode == 0 and len(wheels) == 1, f"{result.stdout}\n{result.stderr}"
    return wheels[0]


@pytest.fixture(scope="module")
def synced(tmp_path_factory) -> list:
    """The files ``saltutil.sync_all`` writes into a minion's extension_modules when its file
    root is the repository's Salt directories (each top-level ``_<kind>`` directory, as the
    daemon tests' master serves them), relative to extension_modules."""
    root = tmp_path_factory.mktemp("sync")
    view = root / "file_root"
    view.mkdir()
    for entry in sorted(REPO.iterdir()):
        if entry.is_dir() and entry.name.startswith("_") and not entry.name.startswith("__"):
            (view / entry.name).symlink_to(entry)
    opts = salt.config.minion_config(None)
    opts.update(id="sync-probe", file_client="local", cachedir=str(root / "cache"),
                pki_dir=str(root / "pki"), extension_modules=str(root / "extmods"),
                file_roots={"base": [str(view)]}, pillar_roots={"base": [str(root / "pillar")]})
    utils = salt.loader.utils(opts)
    functions = salt.loader.minion_mods(opts, utils=utils)
    ret = functions["saltutil.sync_all"](refresh=False)
    assert ret["utils"] and ret["modules"], ret
    extmods = root / "extmods"
    return sorted(str(p.relative_to(extmods)) for p in extmods.rglob("*") if p.is_file())


def test_the_lab_is_a_package_of_its_own():
    assert (LAB / "__init__.py").is_file() and {"lab.py", "saltlab.py"} <= _lab_files()
    assert not (REPO / "vmpower" / "lab.py").exists() and not (REPO / "vmpower" / "saltlab.py").exists()


def test_the_wheel_holds_vmpower_and_nothing_of_the_lab(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    print(f"{wheel.name}: {len(names)} files", *sorted(names), sep="\n  ")
    assert _lab_findings(names) == [], "the wheel carries the test lab"
    tops = {Path(name).parts[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"vmpower"}, tops
    for expected in ("vmpower/__init__.py", "vmpower/core/rules.py", "vmpower/store/sqlite.py",
                     "vmpower/salt/modules/vmpower.py", "vmpower/salt/states/vmpower.py",
                     "vmpower/salt/beacons/vmpower.py", "vmpower/loader.py"):
        assert expected in names


def test_the_file_roots_sync_holds_vmpower_and_nothing_of_the_lab(synced):
    print(f"saltutil.sync_all: {len(synced)} files", *synced, sep="\n  ")
    assert _lab_findings(synced) == [], "saltutil.sync_all copies the test lab to minions"
    for expected in ("modules/vmpower.py", "states/vmpower.py", "beacons/vmpower.py",
                     "utils/vmpower/__init__.py", "utils/vmpower/core/rules.py", "utils/vmpower/minion.py"):
        assert expected in synced
    # Everything synced is a vmpower Salt module (<kind>/vmpower.py) or the library
    # (utils/vmpower/...), nothing else.
    others = [name for name in synced
              if not (name.startswith("utils/vmpower/") or Path(name).parts[1:] == ("vmpower.py",))]
    assert others == []


def test_the_findings_name_the_lab_wherever_it_is():
    """The check itself: a lab module in either place would be found."""
    assert _lab_findings(["vmpower_lab/lab.py", "vmpower/saltlab.py", "utils/vmpower/lab.py",
                          "vmpower_lab-0.1.dist-info/RECORD", "vmpower/core/rules.py"]) == [
        "vmpower_lab/lab.py", "vmpower/saltlab.py", "utils/vmpower/lab.py", "vmpower_lab-0.1.dist-info/RECORD"]
