"""``trainer=ddp`` on the CPU: two processes (gloo) run one iteration of a method with one
backward (reward backprop), one with several minibatch backwards and steps (DDPO) and one with
a critic trained beside the policy (CTRL); the result is compared with a single-process
reference of the same two ranks run in lockstep in threads, whose "all-reduce" is the plain
mean of the two replicas' tensors.

What must hold: the two ranks simulate different chains (their own seeds, derived from the
run's seed and the rank); each rank's local gradient is exactly the single-process gradient of
its own half of the chains; the gradient every optimiser step applies is the mean of the two,
the same on both ranks; afterwards both ranks hold the same weights — the reference's — and the
logged curves are the ranks' means. Without the gradient averaging the ranks' gradients (and
weights) differ and this test fails."""

from __future__ import annotations

import subprocess
import threading

import pytest
import torch

from conftest import PYTHON, REPO_ROOT, cli_env, describe
from ddp_worker import SEED, Recorder, build, trainable

METHODS = ["reward_backprop", "ddpo", "ctrl"]
WORLD = 2
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    proc = subprocess.run([PYTHON, str(REPO_ROOT / "tests" / "ddp_worker.py"), str(out), *METHODS], cwd=REPO_ROOT,
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, describe(proc)
    return {m: [torch.load(out / m / f"rank{r}.pt", weights_only=False) for r in range(WORLD)] for m in METHODS}, out


class Lockstep:
    """The two replicas' all-reduce in one process: each thread hands in its tensor, both get
    the mean back (a barrier on each side; a timeout instead of a hang if they part ways)."""

    def __init__(self):
        self.barrier, self.slots = threading.Barrier(WORLD, timeout=60), [None] * WORLD

    def mean(self, rank: int, tensor: torch.Tensor) -> torch.Tensor:
        self.slots[rank] = tensor.detach().clone()
        self.barrier.wait()
        mean = torch.stack(self.slots).mean(0)
        self.barrier.wait()
        return mean


def reference(method_name: str, cache_dir) -> tuple[list, list]:
    """Both ranks' iteration in this process: replica r draws rank r's streams (the seeds the
    DDP ranks reported are checked separately), optimisers stepped by hand."""
    from diffusion_rl.seeding import chain_seed, derive_seed

    lockstep, replicas, recorders = Lockstep(), [], []
    for rank in range(WORLD):
        _, method = build(method_name, cache_dir)
        method._generator = torch.Generator().manual_seed(chain_seed(SEED, rank))
        method._data_generator = torch.Generator().manual_seed(derive_seed(SEED, "data", rank))
        opts = method.configure_optimizers()
        opts = list(opts) if isinstance(opts, (list, tuple)) else [opts]
        method.optimizers = lambda opts=opts: opts[0] if len(opts) == 1 else opts
        method.manual_backward = lambda loss, *a, **kw: loss.backward(*a, **kw)
        method.world_size = lambda: WORLD
        method.mean_over_ranks = lambda t, rank=rank: lockstep.mean(rank, t)
        replicas.append(method)
        recorders.append(Recorder(method))
    errors = []

    def run(method):
        try:
            method.backbone.train()
            method.update()
        except BaseException as err:  # surfaced below, not lost in the thread
            errors.append(err)
            lockstep.barrier.abort()
    threads = [threading.Thread(target=run, args=(m,)) for m in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return replicas, recorders


def close(a: dict, b: dict, atol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=atol) for k in a)


def largest_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("name", METHODS)
def test_ddp_averages_the_ranks_gradients(ddp_results, name):
    results, out = ddp_results
    ranks = results[name]
    from diffusion_rl.seeding import chain_seed, derive_seed

    assert [r["world_size"] for r in ranks] == [WORLD, WORLD]
    # own streams per rank, derived from (seed, rank); rank 1's are not another seed's rank 0's
    assert [r["chain_seed"] for r in ranks] == [chain_seed(SEED, 0), chain_seed(SEED, 1)]
    assert [r["data_seed"] for r in ranks] == [derive_seed(SEED, "data", 0), derive_seed(SEED, "data", 1)]
    assert ranks[1]["chain_seed"] not in {chain_seed(s, 0) for s in range(100)}

    after = [r["after"] for r in ranks]
    assert all(torch.equal(after[0][k], after[1][k]) for k in after[0]), "the ranks' weights differ"

    replicas, recorders = reference(name, out / "cache")
    steps = [r["steps"] for r in ranks]
    assert len(steps[0]) == len(steps[1]) == len(recorders[0].steps) >= 1, "no averaged optimiser step recorded"
    for i, ((local0, synced0), (local1, synced1)) in enumerate(zip(*steps)):
        ref_local = [rec.steps[i][0] for rec in recorders]
        # each rank computed exactly the single-process gradient of its own chains ...
        assert close(local0, ref_local[0]) and close(local1, ref_local[1]), f"step {i}: local gradients"
        # ... on different chains ...
        assert largest_difference(local0, local1) > 1e-4, f"step {i}: the two ranks computed the same gradient"
        # ... and stepped with the mean of the two, the same on both ranks
        mean = {k: (ref_local[0][k] + ref_local[1][k]) / 2 for k in ref_local[0]}
        assert synced0.keys() == synced1.keys() == mean.keys()
        assert all(torch.equal(synced0[k], synced1[k]) for k in synced0), f"step {i}: ranks applied different gradients"
        assert close(synced0, mean), f"step {i}: the applied gradient is not the ranks' mean"

    # the same weights on both ranks (above), the reference's, and every trainable one moved (CTRL's critic too)
    assert close(after[0], trainable(replicas[0]), atol=1e-6)
    moved = {k for k in after[0] if not torch.equal(after[0][k], ranks[0]["before"][k])}
    assert moved == set(after[0]), f"not stepped: {set(after[0]) - moved}"
    if name == "ctrl":
        assert any(k.startswith("critic.") for k in moved)

    # the logged curves are the ranks' means, the same on both ranks
    raw = [r["updates"][0] for r in ranks]
    logged = [r["logged"][0] for r in ranks]
    assert logged[0] == logged[1]
    for key in raw[0]:
        assert logged[0][f"train/{key}"] == pytest.approx((raw[0][key] + raw[1][key]) / 2, rel=1e-6, abs=1e-9)


def test_ddp_run_through_the_cli_and_its_resume(tmp_path):
    """``trainer=ddp`` end to end: every rank runs every iteration (no DistributedSampler split
    of the iteration indices), the reward queries are summed over the ranks, rank 0 writes the
    outputs; the checkpoint holds each rank's streams, so a run stopped after 2 iterations and
    extended to 4 writes the curves and metrics of a straight 4-iteration run."""
    import json

    from conftest import path_overrides, run_cli, run_cli_many

    batch = 16

    def command(name, iterations):
        return ["debug=smoke", "dataset=gaussian1d", "method=ddpo", f"method.iterations={iterations}",
                "method.iterations_per_epoch=1", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                f"hydra.run.dir={tmp_path / name}", *path_overrides(tmp_path)]
    for proc in run_cli_many([command("straight", 4), command("resumed", 2)], workers=2):
        assert proc.returncode == 0, describe(proc)
    states = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=True)["generator_states_by_rank"]
    assert states.shape[0] == WORLD and not torch.equal(states[0], states[1])
    proc = run_cli(command("resumed", 4))
    assert proc.returncode == 0, describe(proc)

    def outputs(name):
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        metrics.pop("overrides")
        return metrics, (tmp_path / name / "metrics.csv").read_text()
    metrics, curves = outputs("straight")
    assert metrics["train_reward_queries"] == WORLD * 4 * batch
    assert len(curves.strip().splitlines()) == 1 + 4
    assert outputs("resumed") == (metrics, curves)


def test_slurm_launcher_composes_for_ddp():
    """``-m hydra/launcher=slurm_ddp trainer=ddp``: Hydra's submitit launcher (no SLURM needed to
    compose it) with one task per GPU on each node, and the strategy of trainer=ddp builds."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from conftest import CONF_DIR
    from diffusion_rl.distributed import ManualSyncDDPStrategy

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("config", overrides=["hydra/launcher=slurm_ddp", "trainer=ddp", "trainer.devices=4",
                                           "trainer.num_nodes=2", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes, launcher.partition) == (4, 4, 2, "gpu")
    assert isinstance(instantiate(cfg.trainer.strategy), ManualSyncDDPStrategy)


def test_local_sweep_with_ddp_is_refused(tmp_path):
    """Lightning starts the other ranks by running the command line again: inside a local -m
    sweep that is the whole sweep, so such a job fails with one line instead."""
    from conftest import path_overrides, run_cli

    proc = run_cli(["-m", "debug=smoke", "dataset=gaussian1d", "method=ddpo", "trainer=ddp", "trainer.accelerator=cpu",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}", *path_overrides(tmp_path)])
    assert "cannot run inside a local -m sweep" in proc.stderr, describe(proc)
    assert not list((tmp_path / "sweep").glob("*/metrics.json"))
