"""Bad input fails fast with one ``error:`` line naming the key, a non-zero exit code, and
without touching an existing run folder."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import describe, last_error_line, path_overrides, run_cli, run_cli_many

SENTINEL_TEXT = "do not touch\n"
CONFIG_TEXT = "# an earlier run's config\nseed: 123\n"

#: name -> (overrides, words the error line must contain)
CASES = {
    "unknown_method": (["method=nope"], ["method", "nope"]),
    "negative_weight": (["method=dpok", "method.reward_weight=-1"], ["method.reward_weight"]),
    "zero_temperature": (["method=qlearning", "method.temperature=0"], ["method.temperature"]),
    "zero_steps": (["sampler.num_steps=0"], ["sampler.num_steps"]),
    "zero_horizon": (["process.T=0"], ["process.T"]),
}

#: range checks that only the constructors make (not in validation.RULES); the same happens for
#: e.g. dataset=gmm1d dataset.stds=[0.5,0.0] (no config overwrite there: the dataset is built first)
CONSTRUCTOR_CASES = {
    "zero_minibatches": (["method=ddpo", "method.minibatches=0"], ["minibatches"]),
}


#: pairs the methods' capability flags rule out (and a range check), with the words of the line
INCOMPATIBLE = {
    "qlearning_on_tokens": (["method=qlearning", "dataset=tfbind8"], ["method=qlearning", "dataset=tfbind8", "tokens"]),
    "backprop_with_box_indicator": (["method=nokl"], ["method=nokl", "reward=swiss_roll_box", "differentiable"]),
    "dpok_on_the_ode": (["method=dpok", "sampler=ode_euler"], ["method=dpok", "sampler=ode_euler", "deterministic"]),
    "ppo_kl_on_ddim_eta_0": (["method=ppo_kl", "sampler=ddim", "sampler.eta=0"], ["method=ppo_kl", "sampler=ddim"]),
    "out_of_range": (["sampler.num_steps=0"], ["sampler.num_steps"]),
}
#: the issue's bound; the check itself takes ~1 s, most of it Python and Hydra starting up
REJECT_SECONDS = 3.0


def prepare_existing_run(folder: Path) -> dict[str, tuple[str, int]]:
    folder.mkdir(parents=True)
    (folder / "sentinel.txt").write_text(SENTINEL_TEXT)
    (folder / "config.yaml").write_text(CONFIG_TEXT)
    return snapshot(folder)


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {name: ((folder / name).read_text(), (folder / name).stat().st_mtime_ns)
            for name in ("sentinel.txt", "config.yaml")}


@pytest.fixture(scope="module")
def failed_runs(tmp_path_factory, swiss_cache):
    """All bad invocations, run side by side (each costs mostly the interpreter start-up)."""
    root = tmp_path_factory.mktemp("cli_errors")
    cases = {**CASES, **CONSTRUCTOR_CASES}
    before, commands = {}, []
    for name, (overrides, _) in cases.items():
        run_dir = root / name
        before[name] = prepare_existing_run(run_dir)
        # debug=smoke: should a check be missing, the run stays small instead of taking hours
        commands.append(["debug=smoke", *overrides, f"hydra.run.dir={run_dir}",
                         *path_overrides(root, swiss_cache)])
    results = dict(zip(cases, run_cli_many(commands)))
    return {name: (results[name], root / name, before[name]) for name in cases}


def check_failure(failed_runs, name, cases):
    proc, run_dir, before = failed_runs[name]
    words = cases[name][1]
    assert proc.returncode != 0, describe(proc)
    line = last_error_line(proc)
    assert line.startswith("error:"), describe(proc)
    for word in words:
        assert word in line, (word, line)
    assert "Traceback" not in proc.stderr, describe(proc)
    # the existing run folder is left as it was
    assert snapshot(run_dir) == before
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "last.ckpt").exists()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_with_one_line_and_leaves_folder_alone(failed_runs, name):
    check_failure(failed_runs, name, CASES)
    assert failed_runs[name][0].returncode == 2


def test_unknown_option_lists_the_choices(failed_runs):
    line = last_error_line(failed_runs["unknown_method"][0])
    for method in ("ddpo", "dpok", "qlearning", "pretrained"):
        assert method in line


@pytest.mark.parametrize("name", list(CONSTRUCTOR_CASES))
def test_constructor_range_checks_fail_with_one_line_and_leave_folder_alone(failed_runs, name):
    check_failure(failed_runs, name, CONSTRUCTOR_CASES)


@pytest.mark.parametrize("damage", ["altered", "missing"])
def test_bad_data_file_fails_before_compute_naming_the_file(tmp_path, swiss_cache, damage):
    """A corrupted or missing TFBind8 file: one error line naming the file and where to get it
    (its PROVENANCE.md), exit 2, no oracle fitted, no pretraining, the run folder untouched."""
    import shutil

    from conftest import REPO_ROOT, run_cli

    data = tmp_path / "data"
    shutil.copytree(REPO_ROOT.parent / "shared" / "data" / "tfbind8", data / "tfbind8")
    target = data / "tfbind8" / "tf_bind_8-y-0.npy"
    if damage == "altered":
        with target.open("ab") as f:
            f.write(b"\0")
    else:
        target.unlink()
    run_dir = tmp_path / "run"
    before = prepare_existing_run(run_dir)
    proc = run_cli(["debug=smoke", "experiment=elegant_tfbind8", "method=elegant", f"paths.data_dir={data}",
                    f"hydra.run.dir={run_dir}", *path_overrides(tmp_path)])
    assert proc.returncode == 2, describe(proc)
    line = last_error_line(proc)
    assert line.startswith("error:") and "tf_bind_8-y-0.npy" in line and "PROVENANCE.md" in line, line
    assert "Traceback" not in proc.stderr
    assert snapshot(run_dir) == before and not (run_dir / "metrics.json").exists()
    assert not (tmp_path / "cache").exists()  # nothing was computed


@pytest.mark.parametrize("name", list(INCOMPATIBLE))
def test_incompatible_pair_is_rejected_in_one_line_before_anything_is_written(tmp_path, cli_paths, name):
    """One ``error:`` line, exit 2, fast (no torch / Lightning import), and no run folder,
    cache or anything else created. Run one at a time: the timing is the point."""
    overrides, words = INCOMPATIBLE[name]
    start = time.perf_counter()
    proc = run_cli([*overrides, f"hydra.run.dir={tmp_path / 'run'}", *cli_paths])
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, describe(proc)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), describe(proc)
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert elapsed < REJECT_SECONDS, f"{elapsed:.2f} s"
    assert list(tmp_path.iterdir()) == []
