"""The package layering (setup.cfg, [importlinter]): each part of kprune imports only the parts
below it, at module level or inside a function, so no import cycle can come back unnoticed."""

import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_parts_import_only_the_parts_below_them():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--config", str(REPO / "setup.cfg"), "--no-cache"], cwd=REPO,
                            capture_output=True, text=True, env={"PATH": "", "NO_COLOR": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 1 kept, 0 broken." in result.stdout
