"""One DDP iteration of each given method on the CPU (two processes, gloo), for test_ddp.py.

``python tests/ddp_worker.py OUT METHOD...``: Lightning's DDP launcher runs this script again
as rank 1 (so it must be a script, not pytest). Every rank writes ``OUT/<method>/rank<r>.pt``:
its trainable weights before and after the iteration, the gradients of each optimiser step
before and after the ranks' averaging (``FineTuneMethod.sync_gradients``), what ``update()``
returned, what was logged, and the seeds of its two generators. The test's single-process
reference uses :func:`build` and :class:`Recorder` too, so both sides build the same method.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED = 0


def overrides(method: str, cache_dir: Path, seed: int = SEED) -> list[str]:
    """The closed-form bench's tiny chain (1-D, affine policy, no pretraining): one iteration,
    16 chains per rank, 4 steps."""
    return ["debug=smoke", "dataset=gaussian1d", f"method={method}", "method.iterations=1",
            "method.iterations_per_epoch=1", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
            f"seed={seed}", f"paths.cache_dir={cache_dir}", "logger=csv"]


def build(method: str, cache_dir: Path, seed: int = SEED):
    """``(cfg, method)`` as the runner builds them (runner.build_parts)."""
    from hydra import compose, initialize_config_dir

    import diffusion_rl.cli  # noqa: F401  (registers the config's resolvers)
    from diffusion_rl.runner import build_parts

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO_ROOT / "conf")):
        cfg = compose("config", overrides=overrides(method, cache_dir, seed))
    return cfg, build_parts(cfg).method


def trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


class Recorder:
    """Wraps a method's ``sync_gradients`` and ``update`` (instance attributes): the gradients
    of each step before and after the averaging, keyed by parameter name, and update()'s logs."""

    def __init__(self, method):
        self.steps: list[tuple[dict, dict]] = []
        self.updates: list[dict[str, float]] = []
        names = {id(p): n for n, p in method.named_parameters()}
        sync, update = method.sync_gradients, method.update

        def grads(params):
            return {names[id(p)]: p.grad.detach().clone() for p in params if p.grad is not None}

        def recorded_sync(params):
            params = list(params)
            before = grads(params)
            sync(params)
            self.steps.append((before, grads(params)))

        def recorded_update():
            logs = update()
            self.updates.append({k: float(v) for k, v in logs.items()})
            return logs

        method.sync_gradients, method.update = recorded_sync, recorded_update


def main(out: Path, methods: list[str]) -> None:
    from diffusion_rl.runner import build_trainer
    from diffusion_rl.seeding import no_global_draws

    torch.set_num_threads(1)
    for name in methods:
        cfg, method = build(name, out / "cache")
        before, recorder, logged = trainable(method), Recorder(method), []
        log_dict = method.log_dict
        method.log_dict = lambda values, **kw: (logged.append(dict(values)), log_dict(values, **kw))
        trainer = build_trainer(cfg, out / name, method.epochs, [], checkpoint=False, stage="fine-tuning")
        with no_global_draws("finetune"):
            trainer.fit(method)
        rank = trainer.global_rank
        (out / name).mkdir(parents=True, exist_ok=True)
        torch.save({"world_size": trainer.world_size, "before": before, "after": trainable(method),
                    "steps": recorder.steps, "updates": recorder.updates, "logged": logged,
                    "chain_seed": method.generator.initial_seed(), "data_seed": method.data_generator.initial_seed()},
                   out / name / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
