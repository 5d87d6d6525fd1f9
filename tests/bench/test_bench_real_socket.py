"""The smoke run of the real-socket benchmark (part 5): a sync through a real libvirtd's
socket (``test+unix:///default``) against the Nova-style baseline, at its smallest size. Shapes
and the work done, never timings. It starts a real libvirtd, like tests/real:
one run per lane (scripts/lane.sh).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-socket")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--only",
                           "real_socket", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "latest.json").read_text())["benchmarks"], (out / "latest.md").read_text()


def test_the_sync_through_libvirtds_socket(results):
    socket = results[0]["real_socket"]
    assert socket["uri"] == "test+unix:///default" and socket["sizes"] == [200]
    for name in ("vmpower", "nova-style", "floor"):
        [point] = socket["series"][name]
        assert point["work"]["checked"] == 200 and point["seconds"] > 0
    assert {t["met"] for t in socket["targets"]} == {None}  # the target is at 10,000


def test_the_markdown_has_the_part(results):
    assert "## Part 5: sync through a real libvirtd socket" in results[1]
