"""``vmpower.loader.library_versions``: the library running next to the one synced and installed.

The running library is the ``vmpower`` in ``sys.modules``; the others are read as text from
disk, as an upgrade through file_roots (``saltutil.sync_all``) or pip leaves them.
"""

import vmpower
from vmpower import loader


def _synced(extmods, version):
    package = extmods / "utils" / "vmpower"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f'"""vmpower."""\n\n__version__ = "{version}"\n')


def test_nothing_synced_is_no_restart(tmp_path):
    got = loader.library_versions(str(tmp_path / "extmods"))
    assert got["version"] == vmpower.__version__ and got["synced_version"] is None
    assert got["installed_version"] == vmpower.__version__
    assert got["restart_needed"] is False and "restart" not in got


def test_the_same_version_synced_is_no_restart(tmp_path):
    _synced(tmp_path, vmpower.__version__)
    got = loader.library_versions(str(tmp_path))
    assert (got["synced_version"], got["restart_needed"]) == (vmpower.__version__, False)


def test_a_newer_version_synced_needs_a_restart_and_says_so(tmp_path):
    _synced(tmp_path, "99.0.0")
    got = loader.library_versions(str(tmp_path))
    assert (got["version"], got["synced_version"], got["restart_needed"]) == (
        vmpower.__version__, "99.0.0", True)
    assert got["restart"] == (f"this minion runs vmpower {vmpower.__version__}, but synced 99.0.0: "
                              f"restart the salt-minion for the new version to take effect")


def test_a_synced_file_without_a_version_is_unknown_and_needs_a_restart(tmp_path):
    (tmp_path / "utils" / "vmpower").mkdir(parents=True)
    (tmp_path / "utils" / "vmpower" / "__init__.py").write_text("# no version here\n")
    got = loader.library_versions(str(tmp_path))
    assert (got["synced_version"], got["restart_needed"]) == ("unknown", True)


def test_no_extension_modules_setting(tmp_path):
    got = loader.library_versions(None)
    assert got["synced_version"] is None and got["restart_needed"] is False


def test_the_version_has_one_home():
    """setup.cfg reads the version from vmpower/__init__.py; nothing else in the package or
    its build files spells it."""
    from pathlib import Path

    repo = Path(vmpower.__file__).resolve().parents[1]
    assert "version = attr: vmpower.__version__" in (repo / "setup.cfg").read_text()
    spelled = [str(path.relative_to(repo))
               for pattern in ("vmpower/**/*.py", "_*/**/*.py", "*.cfg", "*.toml")
               for path in repo.glob(pattern)
               if f'"{vmpower.__version__}"' in path.read_text(encoding="utf-8")]
    assert spelled == ["vmpower/__init__.py"]


def test_the_python_floor_agrees_everywhere():
    """setup.cfg's python_requires is a floor that the tested Salt releases allow (Salt 3008
    needs 3.10), every Python its classifiers name is at or above it, and ruff lints for it."""
    import configparser
    import re
    from pathlib import Path

    repo = Path(vmpower.__file__).resolve().parents[1]
    cfg = configparser.ConfigParser()
    cfg.read(repo / "setup.cfg")
    requires = cfg["options"]["python_requires"].strip()
    assert re.fullmatch(r">=3\.\d+", requires), requires
    floor = (3, int(requires.rsplit(".", 1)[1]))
    assert floor >= (3, 10)
    named = [(3, int(line.rsplit(".", 1)[1]))
             for line in (c.strip() for c in cfg["metadata"]["classifiers"].splitlines())
             if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", line)]
    assert named and all(version >= floor for version in named), named
    target = re.search(r'^target-version = "py3(\d+)"', (repo / "pyproject.toml").read_text(),
                       re.MULTILINE)
    assert target and (3, int(target.group(1))) == floor


def test_a_pip_upgrade_under_the_running_library_needs_a_restart(tmp_path, monkeypatch):
    """The running library's own files changed on disk (pip install --upgrade)."""
    package = tmp_path / "site" / "vmpower"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('__version__ = "99.1"\n')
    monkeypatch.setattr(vmpower, "__file__", str(package / "__init__.py"))
    got = loader.library_versions(str(tmp_path / "extmods"))
    assert (got["installed_version"], got["restart_needed"]) == ("99.1", True)
    assert f"runs vmpower {vmpower.__version__}, but installed 99.1: restart" in got["restart"]


def test_running_from_the_synced_files_names_them_once(tmp_path, monkeypatch):
    _synced(tmp_path, "99.2")
    monkeypatch.setattr(vmpower, "__file__", str(tmp_path / "utils" / "vmpower" / "__init__.py"))
    got = loader.library_versions(str(tmp_path))
    assert "but synced 99.2: restart" in got["restart"] and "installed" not in got["restart"]


def test_status_shows_the_versions(load_minion):
    from .conftest import TEST_URI

    status = load_minion(TEST_URI).functions["vmpower.status"]()
    assert status["version"] == vmpower.__version__ and status["restart_needed"] is False
    assert "synced_version" in status and status["connected"] is True


def test_status_under_a_library_older_than_its_module_says_restart(load_minion, monkeypatch):
    """A module synced after the library was imported, which has no library_versions yet."""
    from .conftest import TEST_URI

    monkeypatch.delattr(loader, "library_versions")
    status = load_minion(TEST_URI).functions["vmpower.status"]()
    assert status["restart_needed"] is True and "restart the salt-minion" in status["restart"]
