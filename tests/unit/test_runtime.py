"""raylm.runtime: the settings of a local Ray, and the shell script that repeats them."""

from __future__ import annotations

import json
import re

from raylm.runtime import local_system_config


def test_start_head_script_uses_the_same_system_config(repo_root):
    script = (repo_root / "cluster/local/start_head.sh").read_text()
    found = re.search(r"--system-config='(\{.*?\})'", script)
    assert found, "cluster/local/start_head.sh passes no --system-config"
    assert json.loads(found.group(1)) == local_system_config()
