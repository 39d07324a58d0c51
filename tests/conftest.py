"""Shared helpers: the repo root, a CLI runner (``python -m diffusion_rl ...`` as a subprocess),
a parallel variant for independent runs, and a float64 default-dtype switch for closed-form tests."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
PYTHON = sys.executable

# The machine has 2 cores shared with other jobs: torch's intra-op thread pool then spends
# most of its time spinning (a 1000-step simulation took ~60 s with 2 threads, ~1.5 s with 1).
torch.set_num_threads(1)

#: generous per-run limit: a smoke run takes ~10 s (mostly importing Lightning)
CLI_TIMEOUT_S = 300


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PYTHONWARNINGS": "ignore",
        # tiny networks: one thread per process, so parallel runs do not oversubscribe 2 cores
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
    })
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_cli(args: Sequence[str], timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``python -m diffusion_rl *args`` from the repo root; captures stdout/stderr as text."""
    return subprocess.run([PYTHON, "-m", "diffusion_rl", *map(str, args)], cwd=REPO_ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def run_cli_many(arg_lists: Sequence[Sequence[str]], workers: int = 3) -> list[subprocess.CompletedProcess]:
    """Independent CLI runs, a few at a time (their cost is mostly the interpreter start-up)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run_cli, arg_lists))


def path_overrides(root: Path, cache_dir: Path | None = None) -> list[str]:
    """Keep every path the CLI may write under ``root`` (never the repo's ``outputs/``)."""
    return [f"paths.runs_dir={root / 'runs'}", f"paths.report_dir={root / 'report'}",
            f"paths.cache_dir={cache_dir if cache_dir is not None else root / 'cache'}"]


def last_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\n--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-3000:]}"


def compose_config(overrides: Sequence[str]):
    """The config ``diffusion-rl *overrides`` would run with."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose("config", overrides=list(overrides))


def method_class(name: str) -> type:
    """The class ``method=<name>`` builds: its capability flags (``fine_tunes``,
    ``needs_differentiable_reward``, ...) decide what a test runs it with."""
    from hydra.utils import get_class

    return get_class(compose_config([f"method={name}"]).method._target_)


@pytest.fixture
def cli_paths(tmp_path: Path) -> list[str]:
    """``paths.*`` overrides pointing at this test's tmp dir."""
    return path_overrides(tmp_path)


@pytest.fixture(scope="session")
def swiss_cache(tmp_path_factory) -> Path:
    """One pretraining cache for every swiss-roll smoke run of the session (the backbone is
    keyed by a hash of its config, so runs with the same pretraining share it)."""
    return tmp_path_factory.mktemp("shared_cache")


def one_per_class(methods: Sequence[str]) -> list[str]:
    """The first YAML of each method class: a variant of the same class only changes keys, so
    the suites that pay a full run per method (determinism, sequences) run one per class; the
    vector smoke test still runs every YAML."""
    seen, out = set(), []
    for m in methods:
        target = compose_config([f"method={m}"]).method._target_
        if target not in seen:
            seen.add(target)
            out.append(m)
    return out


@pytest.fixture
def float64():
    """Run a test with float64 as torch's default dtype (process coefficients, time grids)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
