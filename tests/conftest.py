"""Shared test helpers: the repo root on sys.path, running a script as a subprocess, reading TB events.

Other test files use them as fixtures (``run_script``) or import them (``from conftest import ...``;
pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = Path(__file__).resolve().parent
for _p in (str(REPO_ROOT), str(TESTS_DIR)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# Default wall-clock limit of one script run; the tiny-budget runs take seconds, the margin is
# for a loaded shared machine.
SCRIPT_TIMEOUT = 300


def script_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a script subprocess: the repo root (memory_envs) and tests/ (helper_envs,
    reachable as ``--env-id helper_envs:<Id>``) on PYTHONPATH, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def script_cmd(script: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / script), *map(str, args)]


def run_script_at(cwd: str | os.PathLike, script: str, *args: str, timeout: float = SCRIPT_TIMEOUT,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python <repo>/<script> args...`` in ``cwd`` (so its runs/ lands there), capturing output."""
    return subprocess.run(script_cmd(script, *args), cwd=cwd, env=script_env(env), capture_output=True,
                          text=True, timeout=timeout)


def popen_script_at(cwd: str | os.PathLike, script: str, *args: str,
                    env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a script without waiting (e.g. to kill it); output goes to files in ``cwd``."""
    out = open(Path(cwd) / f"{Path(script).stem}.stdout", "w")
    err = open(Path(cwd) / f"{Path(script).stem}.stderr", "w")
    return subprocess.Popen(script_cmd(script, *args), cwd=cwd, env=script_env(env), stdout=out,
                            stderr=err, text=True)


def describe(proc: subprocess.CompletedProcess) -> str:
    """Failure message with the command's exit code and output tails."""
    return (f"rc={proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n"
            f"--- stderr ---\n{proc.stderr[-3000:]}")


@pytest.fixture
def run_script(tmp_path):
    """``run_script(script, *args, timeout=..., env=...)`` -> CompletedProcess, run in tmp_path."""

    def run(script: str, *args: str, timeout: float = SCRIPT_TIMEOUT, env=None):
        return run_script_at(tmp_path, script, *args, timeout=timeout, env=env)

    return run


def read_tb_scalars(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """All scalar events under ``run_dir`` (every events file, in order): tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
