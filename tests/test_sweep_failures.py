"""A sweep (``-m``) survives a failing job (issue 9). A job whose config is invalid, or that raises
a ``ValueError`` while it runs, fails alone: one ``error: <job>: <message>`` line, the other jobs
run to their end (the basic launcher and joblib's), and the multirun exits non-zero with one
line naming the failed jobs, without a traceback. A problem of the command itself stops it before
any job starts, with one line and nothing written (the behaviour is described in cli.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import describe, last_error_line, path_overrides, run_cli_many

#: name -> (overrides, the failing job's own override, words of its error). The failing job is
#: the first one: the job after it must still run.
SWEEPS = {
    "invalid_job": (["method=dpok", "method.reward_weight=-1,1"], "method.reward_weight=-1",
                    ["method.reward_weight must be >= 0"]),
    "invalid_job_joblib": (["method=dpok", "method.reward_weight=-1,1", "hydra/launcher=joblib",
                            "hydra.launcher.n_jobs=2"], "method.reward_weight=-1", ["method.reward_weight must be >= 0"]),
    # a range check only the dataset's constructor makes: raised while the job runs
    "value_error_at_run_time": (["dataset=gmm1d", "dataset.stds=[0.5,0.0],[0.5,0.5]"], "dataset.stds=[0.5,0.0]",
                                ["dataset.stds > 0"]),
}

A_FILE = "a_file"
#: name -> (overrides, words of the one error line): refused before any job starts
REFUSED = {
    "unknown_key_in_every_job": (["method=dpok,ddpo", "method.kl_wieght=1"],
                                 ["method.kl_wieght", "did you mean method.kl_weight"]),
    "unknown_key_in_one_job": (["method=dpok,qlearning", "method.kl_weight=2"], ["method=qlearning", "method.kl_weight"]),
    "unknown_option": (["method=dpok,nope"], ["nope", "method", "ddpo"]),
    "sweep_dir_under_a_file": ([f"hydra.sweep.dir={{root}}/{A_FILE}/sweep", "seed=0,1"], ["hydra.sweep.dir", A_FILE]),
}


def job_folders(root: Path) -> list[Path]:
    """The job folders of the one sweep folder under ``root`` (the default ``<time>_<pid>``)."""
    sweeps = list((root / "runs" / "multirun").iterdir())
    assert len(sweeps) == 1, sweeps  # one sweep folder for all jobs, in joblib's workers too
    return sorted((p for p in sweeps[0].iterdir() if p.is_dir()), key=lambda p: int(p.name))


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, swiss_cache):
    """Every sweep of SWEEPS, side by side (debug=smoke: each job takes seconds)."""
    base = tmp_path_factory.mktemp("sweeps")
    commands = [["-m", "debug=smoke", *overrides, *path_overrides(base / name, swiss_cache)]
                for name, (overrides, _, _) in SWEEPS.items()]
    return {name: (proc, base / name) for name, proc in zip(SWEEPS, run_cli_many(commands))}


@pytest.mark.parametrize("name", list(SWEEPS))
def test_a_failing_job_fails_alone(sweeps, name):
    proc, root = sweeps[name]
    _, failing, words = SWEEPS[name]
    assert proc.returncode == 1, describe(proc)
    assert "Traceback" not in proc.stdout + proc.stderr, describe(proc)
    # the job's own line, when it failed
    job_lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ") and failing in line
                 and all(word in line for word in words)]
    assert job_lines, describe(proc)
    # the other job ran to its end; the failed one wrote nothing but its log, which has the error
    failed, finished = job_folders(root)
    assert (finished / "metrics.json").exists(), describe(proc)
    assert sorted(p.name for p in failed.iterdir()) == ["cli.log"]
    assert words[0] in (failed / "cli.log").read_text()
    # and the multirun ends with one line naming the failed jobs
    summary = last_error_line(proc)
    assert summary.startswith("error: 1 of 2 jobs failed") and failing in summary, summary


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    base = tmp_path_factory.mktemp("refused")
    commands = []
    for name, (overrides, _) in REFUSED.items():
        root = base / name
        root.mkdir()
        (root / A_FILE).write_text("not a folder\n")
        commands.append(["-m", "debug=smoke", *path_overrides(root), *(o.format(root=root) for o in overrides)])
    return {name: (proc, base / name) for name, proc in zip(REFUSED, run_cli_many(commands))}


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_wrong_command_stops_before_any_job(refused, name):
    proc, root = refused[name]
    assert proc.returncode == 2, describe(proc)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), describe(proc)
    for word in REFUSED[name][1]:
        assert word in lines[0], (word, lines[0])
    assert sorted(p.name for p in root.iterdir()) == [A_FILE]  # no sweep folder, no multirun.yaml
