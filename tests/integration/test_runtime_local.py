"""The local Ray that raylm starts carries raylm's settings into Ray's own processes."""

from __future__ import annotations

from pathlib import Path

from raylm.runtime import LOCAL_ENV_DEFAULTS


def _processes(*needles: str) -> list[Path]:
    """/proc entries of the processes whose command line holds every needle."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # not a process, or gone
            continue
        if all(any(n in a for a in cmdline) for n in needles):
            found.append(proc)
    return found


def test_local_ray_processes_inherit_the_environment_defaults(ray_local):
    session_dir = ray_local._private.worker._global_node.get_session_dir_path()
    monitors = _processes("log_monitor.py", f"--session-dir={session_dir}")
    assert monitors, f"no Ray log monitor process of {session_dir}"
    env = dict(v.split("=", 1) for v in (monitors[0] / "environ").read_bytes().decode().split("\0") if "=" in v)
    for key, value in LOCAL_ENV_DEFAULTS.items():
        assert env.get(key) == value, f"{key} in the log monitor's environment: {env.get(key)!r}"
