"""Bad input fails fast with one ``error:`` line naming the key, a non-zero exit code, and
without touching an existing run folder."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from conftest import CLI_TIMEOUT_S, PYTHON, REPO_ROOT, cli_env, describe, last_error_line, path_overrides, run_cli, run_cli_many

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
    (its PROVENANCE.md), exit 2, no oracle fitted, no pretraining, no run files."""
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
    proc = run_cli(["debug=smoke", "experiment=elegant_tfbind8", "method=elegant", f"paths.data_dir={data}",
                    f"hydra.run.dir={run_dir}", *path_overrides(tmp_path)])
    assert proc.returncode == 2, describe(proc)
    line = last_error_line(proc)
    assert line.startswith("error:") and "tf_bind_8-y-0.npy" in line and "PROVENANCE.md" in line, line
    assert "Traceback" not in proc.stderr
    # the files are verified when the dataset is built, in the run: Hydra has made the run folder
    # and its log by then, nothing else (a folder of another run is refused before: run_folder.py)
    assert [p.name for p in run_dir.iterdir()] == ["cli.log"]
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


# ------------------------------------------------------------------ checked before Hydra starts (issue 9)

A_FILE = "a_file"  # a plain file, used where a folder is needed (root may write almost anywhere else)

#: name -> (overrides, words the one error line must contain). ``{root}`` is the case's own folder,
#: which holds only ``a_file`` when the command starts and must hold only it afterwards.
REJECTED = {
    # counts are integers: 2.5 steps used to run 2 silently, 16.0 to fail inside Lightning
    "float_steps": (["sampler.num_steps=2.5", "method.iterations=2"], ["sampler.num_steps", "integer", "2.5"]),
    "float_iterations": (["method.iterations=2.5"], ["method.iterations", "integer"]),
    "float_batch_size": (["method.batch_size=16.0"], ["method.batch_size", "integer", "16.0"]),
    "negative_seed": (["seed=-1"], ["seed", ">= 0"]),
    "float_seed": (["seed=1.5"], ["seed", "integer"]),
    "text_seed": (["seed=abc"], ["seed", "integer", "abc"]),
    # numbers are finite numbers
    "text_weight": (["method=dpok", "method.kl_weight=abc"], ["method.kl_weight", "number", "abc"]),
    "infinite_lr": (["method.lr=inf"], ["method.lr", "finite"]),
    "nan_lr": (["method.lr=nan"], ["method.lr", "finite"]),
    # keys that nothing reads, with the key meant
    "typo_key": (["method=dpok", "method.kl_wieght=1"], ["method.kl_wieght", "did you mean method.kl_weight"]),
    "typo_key_added": (["method=dpok", "+method.kl_wieght=1"], ["method.kl_wieght", "did you mean method.kl_weight"]),
    "new_top_level_key": (["+kl_weight=5"], ["kl_weight", "did you mean method.kl_weight"]),
    "empty_group_option": (["method="], ["method", "ddpo", "dpok", "qlearning"]),
    # folders the run cannot create, data it cannot read
    "run_dir_under_proc": (["hydra.run.dir=/proc/diffusion_rl_test/run"], ["hydra.run.dir", "/proc"]),
    "run_dir_under_a_file": ([f"hydra.run.dir={{root}}/{A_FILE}/run"], ["hydra.run.dir", A_FILE]),
    "cache_dir_under_a_file": ([f"paths.cache_dir={{root}}/{A_FILE}/cache"], ["paths.cache_dir", A_FILE]),
    "cache_dir_under_proc": (["paths.cache_dir=/proc/diffusion_rl_test/cache"], ["paths.cache_dir", "/proc"]),
    "missing_data_dir": (["dataset=tfbind8", "paths.data_dir={root}/no_data"], ["paths.data_dir", "no_data"]),
}


@pytest.fixture(scope="module")
def rejected_runs(tmp_path_factory):
    """Every case of REJECTED, side by side (each costs about a second: Python and Hydra starting)."""
    base = tmp_path_factory.mktemp("rejected")
    commands = []
    for name, (overrides, _) in REJECTED.items():
        root = base / name
        root.mkdir()
        (root / A_FILE).write_text("not a folder\n")
        # debug=smoke: should a check be missing, the run stays small; the case's own overrides last
        commands.append(["debug=smoke", f"hydra.run.dir={root / 'run'}", *path_overrides(root),
                         *(o.format(root=root) for o in overrides)])
    return {name: (proc, base / name) for name, proc in zip(REJECTED, run_cli_many(commands))}


@pytest.mark.parametrize("name", list(REJECTED))
def test_rejected_before_anything_is_written(rejected_runs, name):
    """One ``error:`` line naming the key and what is wrong, exit 2, and nothing created: no run
    folder (Hydra's, with its log, included), no cache, no empty folder."""
    proc, root = rejected_runs[name]
    assert proc.returncode == 2, describe(proc)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), describe(proc)
    for word in REJECTED[name][1]:
        assert word in lines[0], (word, lines[0])
    assert sorted(p.name for p in root.iterdir()) == [A_FILE]


def test_a_missing_data_folder_points_at_no_missing_file(rejected_runs):
    line = last_error_line(rejected_runs["missing_data_dir"][0])
    assert "PROVENANCE" not in line and "DIFFUSION_RL_DATA_DIR" in line, line


def test_the_data_loader_names_no_provenance_file_that_is_not_there(tmp_path):
    """The loader's own message for a data folder that does not exist (a caller other than the CLI)."""
    from diffusion_rl.data.checksums import DataFileError, verify_files

    with pytest.raises(DataFileError) as err:
        verify_files(tmp_path / "missing", ["x.npy"])
    assert "no such data folder" in str(err.value) and "PROVENANCE" not in str(err.value)


@pytest.mark.parametrize("sweep, jobs", [
    (["method=choice(dpok,ddpo)"], 2),
    (["method=qlearning", "sampler=glob(dd*)"], 1),
    (["method=dpok, ddpo"], 2),
    (["seed=range(3)"], 3),
    (["method=dpok,ddpo", "method.reward_weight=1,2"], 4),
])
def test_sweep_syntax_passes_the_check_before_hydra(tmp_path, sweep, jobs):
    """Hydra's sweep syntax is read by Hydra's parser (not by splitting on commas), and every job
    of the sweep is composed before Hydra starts, without writing anything."""
    from diffusion_rl.cli import CONFIG_DIR, precheck
    from diffusion_rl.validation import check_group_overrides

    check_group_overrides(sweep, CONFIG_DIR)
    assert precheck(["-m", *sweep, *path_overrides(tmp_path)]) == jobs
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sweep, words", [
    (["method=choice(dpok,nope)"], ["nope", "method"]),
    (["sampler=glob(zz*)"], ["zz*", "matches no option", "sampler", "ddim"]),
])
def test_unknown_options_in_a_sweep_are_refused(sweep, words):
    from diffusion_rl.cli import CONFIG_DIR
    from diffusion_rl.validation import ConfigError, check_group_overrides

    with pytest.raises(ConfigError) as err:
        check_group_overrides(sweep, CONFIG_DIR)
    for word in words:
        assert word in str(err.value)


def test_shared_base_is_not_offered_as_a_method():
    """``_finetune`` (the methods' shared keys) is no option of ``method`` in --help or in shell
    completion, and every method still has its keys."""
    from conftest import CONF_DIR, compose_config

    help_text = run_cli(["--help"]).stdout
    method_line = next(line for line in help_text.splitlines() if line.startswith("method:"))
    assert "dpok" in method_line and "_finetune" not in method_line, method_line
    completion = subprocess.run([PYTHON, "-m", "diffusion_rl", "-sc", "query=bash"], cwd=REPO_ROOT, text=True,
                                capture_output=True, env={**cli_env(), "COMP_LINE": "diffusion_rl method="}).stdout
    assert "method=dpok" in completion and "_finetune" not in completion, completion
    assert not list((CONF_DIR / "method").glob("_*.yaml"))
    assert compose_config(["method=ddpo"]).method.iterations_per_epoch == 50  # the shared base's value


def test_default_run_folders_differ_between_processes():
    """Two runs started in the same second do not share ``single/<time>`` (the second would
    continue the first's weights): the default folders end in the starting process's id."""
    script = ("import diffusion_rl.cli\n"
              "from hydra import compose, initialize_config_dir\n"
              "with initialize_config_dir(version_base='1.3', config_dir=str(diffusion_rl.cli.CONFIG_DIR)):\n"
              "    cfg = compose('config', return_hydra_config=True)\n"
              "    print(cfg.hydra.run.dir, cfg.hydra.sweep.dir)\n")
    procs = [subprocess.Popen([PYTHON, "-c", script], cwd=REPO_ROOT, env=cli_env(), text=True,
                              stdout=subprocess.PIPE) for _ in range(2)]
    folders = [(proc.pid, proc.communicate(timeout=CLI_TIMEOUT_S)[0].split()) for proc in procs]
    for pid, (run_dir, sweep_dir) in folders:
        assert run_dir.endswith(f"_{pid}") and "/single/" in run_dir, run_dir
        assert sweep_dir.endswith(f"_{pid}") and "/multirun/" in sweep_dir, sweep_dir
    assert folders[0][1][0] != folders[1][1][0]
