"""The unit files: every directive explained by a comment, and systemd itself accepts them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[1] / "systemd"


@pytest.mark.parametrize("name", ["lacd.service", "lacd-user.service"])
def test_every_directive_has_a_comment_above_it(name):
    lines = (UNITS / name).read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            j = i - 1
            while j >= 0 and "=" in lines[j] and not lines[j].startswith("#"):
                j -= 1  # directives of one comment may follow each other
            assert j >= 0 and lines[j].startswith("#"), f"{name}:{i + 1} {line!r} has no comment"


@pytest.mark.parametrize("name", ["lacd.service", "lacd-user.service"])
def test_units_keep_the_daemon_contract(name):
    text = (UNITS / name).read_text()
    for directive in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "UMask=0077"):
        assert directive in text
    assert "PrivateDevices" not in text.replace("no PrivateDevices", "")  # the GPU must stay visible


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_accepts_the_system_unit(tmp_path):
    lacd = Path(sys.executable).with_name("lacd")
    text = (UNITS / "lacd.service").read_text()
    text = text.replace("/opt/lacd/.venv/bin/lacd", str(lacd)).replace("User=developer", "User=root")
    text = text.replace("Group=developer", "Group=root")
    unit = tmp_path / "lacd.service"
    unit.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    problems = [l for l in result.stderr.splitlines() if "lacd.service" in l]
    assert result.returncode == 0 and not problems, result.stderr
