"""Shell scripts: the cleanup a build runs on exit never turns a finished build into a failed one."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _function(script: Path, name: str) -> str:
    match = re.search(rf"^{name}\(\) \{{\n.*?^\}}\n", script.read_text(), re.MULTILINE | re.DOTALL)
    assert match is not None, f"{script.name} has no function {name}"
    return match.group(0)


def test_base_image_cleanup_succeeds_when_nothing_is_mounted(tmp_path: Path) -> None:
    # The exit trap of scripts/build-base-image.sh runs after a successful debootstrap, when /proc
    # and /sys are no longer mounted; under `set -e` a failing umount there was the script's exit
    # status, and `make images` failed on a fresh machine with only the base-image lines to show.
    work = tmp_path / "rootfs.test"
    (work / "proc").mkdir(parents=True)
    (work / "etc" / "hostname").parent.mkdir()
    (work / "etc" / "hostname").write_text("x\n")
    cleanup = _function(ROOT / "scripts" / "build-base-image.sh", "cleanup_rootfs")
    script = f'set -euo pipefail\nwork="{work}"\n{cleanup}trap cleanup_rootfs EXIT\necho built\n'
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, "built\n"), proc.stderr
    assert not work.exists()
