"""Shared helpers: the repo root, a CLI runner (``python -m diffusion_rl ...`` as a subprocess),
a parallel variant for independent runs, and a float64 default-dtype switch for closed-form tests."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
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


class PreloadedCLI:
    """One ``tests/preloaded_cli.py`` server: the package imported once, each run a forked
    child that behaves as ``python -m diffusion_rl`` (that file says how)."""

    def __init__(self):
        self.proc = subprocess.Popen([PYTHON, str(Path(__file__).with_name("preloaded_cli.py"))], cwd=REPO_ROOT,
                                     env=cli_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()  # ready

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the preloaded CLI server exited (status {self.proc.wait()})")
        return json.loads(line)

    def run(self, args: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"argv": list(args), "cwd": str(REPO_ROOT), "env": cli_env(), "stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            pid = self._read()["pid"]
            timed_out = threading.Event()

            def kill():
                timed_out.set()
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killer = threading.Timer(timeout, kill)
            killer.start()
            try:
                status = self._read()["status"]
            finally:
                killer.cancel()
            if timed_out.is_set():
                raise subprocess.TimeoutExpired(["diffusion_rl", *args], timeout)
            return subprocess.CompletedProcess(["diffusion_rl", *args], os.waitstatus_to_exitcode(status),
                                               out.read_text(), err.read_text())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


_IDLE_SERVERS: "queue.SimpleQueue[PreloadedCLI]" = queue.SimpleQueue()
_ALL_SERVERS: list[PreloadedCLI] = []


def run_cli(args: Sequence[str], timeout: float = CLI_TIMEOUT_S, fresh_process: bool = False) -> subprocess.CompletedProcess:
    """``python -m diffusion_rl *args`` from the repo root; captures stdout/stderr as text.
    By default the run forks from a server that has imported the package already (each run
    would otherwise spend ~5 s of CPU on imports); ``fresh_process=True`` (or
    ``DIFFUSION_RL_TESTS_FRESH_CLI=1`` for the whole suite) starts a new interpreter."""
    args = list(map(str, args))
    if fresh_process or os.environ.get("DIFFUSION_RL_TESTS_FRESH_CLI") == "1":
        return subprocess.run([PYTHON, "-m", "diffusion_rl", *args], cwd=REPO_ROOT, env=cli_env(),
                              capture_output=True, text=True, timeout=timeout)
    try:
        server = _IDLE_SERVERS.get_nowait()
    except queue.Empty:
        server = PreloadedCLI()
        _ALL_SERVERS.append(server)
    try:
        return server.run(args, timeout)
    finally:
        _IDLE_SERVERS.put(server)


def run_cli_many(arg_lists: Sequence[Sequence[str]], workers: int = 3,
                 fresh_process: bool = False) -> list[subprocess.CompletedProcess]:
    """Independent CLI runs, a few at a time."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda args: run_cli(args, fresh_process=fresh_process), arg_lists))


@pytest.fixture(scope="session", autouse=True)
def _close_cli_servers():
    yield
    for server in _ALL_SERVERS:
        server.close()


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
