"""Benchmarks: ``python scripts/bench.py [--only chain_memory|pg_memory|tables|diversity|elegant_table3]`` → ``outputs/bench/*.json``.

* ``chain_memory``: memory and time of backpropagating a reward through a 5- vs 50-step
  Euler–Maruyama chain, with and without per-step gradient checkpointing. Memory is the
  bytes of the unique storages autograd saves during the forward (parameters excluded: they
  are held anyway), counted with ``saved_tensors_hooks``; on a GPU also the peak allocated
  memory above the baseline. (With checkpointing, the ops inside a step save through the
  checkpoint's own hooks, so they are — rightly — not counted: they are recomputed; what each
  checkpoint keeps, its input state ``[B, d]``, is small.)
* ``pg_memory``: peak memory of one DDPO and one DPOK update (rollout, PPO steps, backward)
  on the ELEGANT TFBind8 transformer backbone at 50 vs 5 steps, with the whole chain
  backpropagated at once (``steps_per_backward: null``) and one step at a time (``1``; goal
  50/5 <= 1.5x). Memory is the peak of the bytes autograd holds alive (unique storages saved
  for backward, freed when the graph is) plus the recorded trajectory; on a GPU also the peak
  allocated memory above the baseline.
* ``tables``: wall time of the full ``qlearning_table3`` and ``qlearning_table4`` runs from
  empty run and cache folders (roughly an hour on 2 cores since q-learning runs 1,200 iterations).
* ``diversity``: seconds to compute ELEGANT's Div (mean pairwise Levenshtein distance, rapidfuzz)
  of 1,000 GFP sequences (237 aa): rows of the GFP proxy table and uniformly random proteins
  (goal: <= 5 s).
* ``elegant_table3``: wall time of ``elegant_table3`` (6 methods x 3 seeds + pretrained) from an
  empty run folder with the pretrained model and the oracles already cached (goal: <= 30 min
  on the CPU); the caches are filled first, untimed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch

from diffusion_rl.backbones.mlp import MLPBackbone
from diffusion_rl.core.processes import OUProcess
from diffusion_rl.core.samplers import EulerMaruyama, GradWindow
from diffusion_rl.seeding import seeded_draws

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "bench"
TABLES = ("qlearning_table3", "qlearning_table4")


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    return {"device": device_description(device), "device_type": device.type, "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version()}


def write_json(name: str, payload: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


# --- (a) chain memory -------------------------------------------------------------------------
def saved_bytes_counter(exclude: set[int]):
    """``(pack, unpack, storages)``: hooks recording each unique storage autograd saves."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    return pack, (lambda t: t), storages


def chain_backprop(backbone, steps: int, checkpoint: bool, batch: int, device: torch.device) -> dict:
    sampler = EulerMaruyama(OUProcess(T=5.0, theta=1.0, sigma=math.sqrt(2.0)), steps)
    backbone.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    params = {p.untyped_storage().data_ptr() for p in backbone.parameters()}
    pack, unpack, storages = saved_bytes_counter(params)
    generator = torch.Generator(device=device).manual_seed(0)
    start = time.perf_counter()
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        traj = sampler.rollout(backbone, batch, generator=generator, event_shape=backbone.event_shape,
                               grad_window=GradWindow("all"), checkpoint_steps=checkpoint, device=device)
        loss = -((traj.final - 1.0) ** 2).sum(-1).mean()  # any differentiable terminal reward
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result = {"steps": steps, "checkpoint_steps": checkpoint, "wall_seconds": time.perf_counter() - start,
              "saved_tensor_bytes": sum(storages.values()), "saved_tensor_storages": len(storages)}
    if device.type == "cuda":
        result["cuda_peak_bytes_above_baseline"] = torch.cuda.max_memory_allocated(device) - base
    del traj, loss
    return result


def chain_memory(batch: int, hidden: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with seeded_draws(0, "bench_backbone"):  # the backbone's initial weights, as the runner builds them
        backbone = MLPBackbone(dim=2, hidden=hidden).to(device)
    chain_backprop(backbone, 1, False, batch, device)  # warm-up (allocator, kernels)
    runs = [chain_backprop(backbone, steps, ckpt, batch, device) for steps in (5, 50) for ckpt in (False, True)]
    by = {(r["steps"], r["checkpoint_steps"]): r["saved_tensor_bytes"] for r in runs}
    return {**environment(device),
            "setup": {"backbone": f"MLPBackbone(dim=2, hidden={hidden}, tanh/relu)", "batch": batch,
                      "sampler": "EulerMaruyama on OU(T=5)", "grad_window": "all",
                      "reward": "-|x - 1|^2 mean, backpropagated through the whole chain"},
            "runs": runs,
            "ratio_50_over_5_no_checkpoint": by[(50, False)] / by[(5, False)],
            "ratio_checkpoint_over_plain_50": by[(50, True)] / by[(50, False)]}


# --- (a') policy-gradient update memory ---------------------------------------------------------
class LiveSavedBytes:
    """``saved_tensors_hooks`` that track the bytes of the storages autograd holds *alive*:
    each packed tensor is wrapped, and the wrapper's finaliser releases its storage when the
    graph that saved it is freed; ``peak`` is the maximum over the update."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.live, self.current, self.peak = exclude, {}, 0, 0

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.exclude:
            return t
        nbytes, count = self.live.get(ptr, (storage.nbytes(), 0))
        if count == 0:
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        self.live[ptr] = (nbytes, count + 1)
        holder = _Holder(t)
        weakref.finalize(holder, self._release, ptr)
        return holder

    def _release(self, ptr: int) -> None:
        nbytes, count = self.live[ptr]
        if count == 1:
            del self.live[ptr]
            self.current -= nbytes
        else:
            self.live[ptr] = (nbytes, count - 1)

    @staticmethod
    def unpack(holder):
        return holder.tensor if isinstance(holder, _Holder) else holder


class _Holder:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def pg_update_memory(method_name: str, steps: int, steps_per_backward: int | None, batch: int, device) -> dict:
    import lightning as L

    from diffusion_rl.backbones.sequence_transformer import SequenceTransformerBackbone
    from diffusion_rl.core.processes import VPProcess
    from diffusion_rl.methods.ddpo import DDPO
    from diffusion_rl.methods.dpok import DPOK

    cls = {"ddpo": DDPO, "dpok": DPOK}[method_name]
    with seeded_draws(0, "bench_backbone"):  # the backbone's initial weights, as the runner builds them
        backbone = SequenceTransformerBackbone(8, 4, d_model=64, nhead=4, num_layers=2, time_dim=64)
    reward = _SequenceReward()
    method = cls(backbone, EulerMaruyama(VPProcess(), steps), reward, iterations=1, batch_size=batch, lr=1e-4,
                 iterations_per_epoch=1, minibatches=1, steps_per_backward=steps_per_backward)
    trainer = L.Trainer(max_epochs=1, accelerator=device.type, devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    params = {p.untyped_storage().data_ptr() for p in method.parameters()}
    tracker = LiveSavedBytes(params)
    update = method.update

    def tracked_update():
        # inside training_step's own saved-tensor hooks (its saved_for_backward counter): the
        # innermost hooks are the ones autograd calls, so hooks around trainer.fit saw nothing
        with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
            return update()

    method.update = tracked_update
    start = time.perf_counter()
    trainer.fit(method)
    traj_bytes = 4 * steps * batch * 8 * 4 * 4  # states, outputs, means, noises: [K, B, 8, 4] float32
    result = {"method": method_name, "steps": steps, "steps_per_backward": steps_per_backward,
              "wall_seconds": time.perf_counter() - start, "peak_saved_tensor_bytes": tracker.peak,
              "trajectory_bytes": traj_bytes, "peak_bytes": tracker.peak + traj_bytes}
    if device.type == "cuda":
        result["cuda_peak_bytes_above_baseline"] = torch.cuda.max_memory_allocated(device)
    return result


class _SequenceReward(torch.nn.Module):
    """A cheap reward on relaxed one-hot states (the memory of the oracle is not the point)."""

    def forward(self, x):
        return x.float().flatten(1).mean(-1) if x.is_floating_point() else x.float().mean(-1)


def pg_memory(batch: int = 64) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs = [pg_update_memory(m, steps, chunk, batch, device)
            for m in ("ddpo", "dpok") for chunk in (None, 1) for steps in (5, 50)]
    by = {(r["method"], r["steps_per_backward"], r["steps"]): r["peak_bytes"] for r in runs}
    ratios = {f"{m}_{'chunk1' if c else 'whole'}": by[(m, c, 50)] / by[(m, c, 5)] for m in ("ddpo", "dpok") for c in (None, 1)}
    return {**environment(device),
            "setup": {"backbone": "SequenceTransformerBackbone(L=8, V=4, d_model=64, 2 layers) (ELEGANT TFBind8)",
                      "batch": batch, "sampler": "EulerMaruyama on VP", "minibatches": 1},
            "runs": runs, "ratio_50_over_5": ratios,
            "ok": all(v <= 1.5 for k, v in ratios.items() if k.endswith("chunk1"))}


# --- (b) tables wall time ----------------------------------------------------------------------
def tables_wall_time() -> dict:
    bench = Path("outputs/bench")
    for sub in ("runs", "cache", "report"):
        shutil.rmtree(ROOT / bench / sub, ignore_errors=True)
    overrides = [f"paths.runs_dir={bench / 'runs'}", f"paths.cache_dir={bench / 'cache'}",
                 f"paths.report_dir={bench / 'report'}"]
    tables = {}
    for name in TABLES:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "scripts/make_table.py", name, *overrides], cwd=ROOT)
        tables[name] = {"seconds": time.perf_counter() - start, "returncode": proc.returncode}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {**environment(device), "tables": tables,
            "total_seconds": sum(t["seconds"] for t in tables.values()),
            "ok": all(t["returncode"] == 0 for t in tables.values())}


# --- (c) diversity of 1,000 GFP sequences ---------------------------------------------------------
def diversity_speed(n: int = 1000, repeats: int = 3) -> dict:
    from diffusion_rl.data.gfp import GFP_ALPHABET, load_gfp
    from diffusion_rl.evaluation.diversity import mean_pairwise_levenshtein

    data = load_gfp(ROOT.parent / "shared" / "data" / "gfp")
    g = torch.Generator().manual_seed(0)
    sets = {"gfp_rows": data.tokens[torch.randperm(len(data), generator=g)[:n]],
            "uniform_random": torch.randint(0, len(GFP_ALPHABET), (n, data.length), generator=g)}
    out = {}
    for name, tokens in sets.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            div = mean_pairwise_levenshtein(tokens)
            times.append(time.perf_counter() - start)
        out[name] = {"n": n, "length": data.length, "diversity": div, "seconds_best": min(times), "seconds_all": times}
    return {**environment(torch.device("cpu")), "threads": "rapidfuzz workers=-1 (all cores)", "sets": out,
            "ok": all(v["seconds_best"] <= 5.0 for v in out.values())}


# --- (d) ELEGANT Table 3 wall time ----------------------------------------------------------------
def elegant_table3_wall_time() -> dict:
    bench = Path("outputs/bench")
    shutil.rmtree(ROOT / bench / "elegant_runs", ignore_errors=True)
    # fill the caches (pretrained backbone, r_hat), untimed: the goal assumes them cached
    warm = subprocess.run([sys.executable, "-m", "diffusion_rl", "experiment=elegant_table3", "method=pretrained",
                           f"hydra.run.dir={bench / 'elegant_warmup'}", "logger=csv"], cwd=ROOT)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "scripts/make_table.py", "elegant_table3",
                           f"paths.runs_dir={bench / 'elegant_runs'}", f"paths.report_dir={bench / 'report'}"], cwd=ROOT)
    seconds = time.perf_counter() - start
    return {**environment(torch.device("cpu")), "seconds": seconds, "minutes": seconds / 60,
            "returncode": proc.returncode, "warmup_returncode": warm.returncode,
            "ok": proc.returncode == 0 and seconds <= 30 * 60}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("chain_memory", "pg_memory", "tables", "diversity", "elegant_table3"),
                        help="run one part (default: all)")
    parser.add_argument("--batch", type=int, default=2048, help="chains per rollout (chain_memory)")
    parser.add_argument("--hidden", type=int, default=1024, help="MLP width (chain_memory)")
    args = parser.parse_args()
    summary, ok = [], True
    if args.only in (None, "chain_memory"):
        res = chain_memory(args.batch, args.hidden)
        path = write_json("chain_memory", res)
        summary.append(f"chain_memory ({res['device']}, batch {args.batch}, hidden {args.hidden}) -> {path}")
        for r in res["runs"]:
            cuda = f", cuda peak {r['cuda_peak_bytes_above_baseline'] / 2**20:8.1f} MiB" if "cuda_peak_bytes_above_baseline" in r else ""
            summary.append(f"  {r['steps']:>2} steps, checkpoint={str(r['checkpoint_steps']):<5}: saved "
                           f"{r['saved_tensor_bytes'] / 2**20:8.1f} MiB{cuda}, {r['wall_seconds']:.2f} s")
        summary.append(f"  50/5 steps (no checkpoint): x{res['ratio_50_over_5_no_checkpoint']:.1f}; "
                       f"checkpointed/plain at 50 steps: {res['ratio_checkpoint_over_plain_50']:.4f}")
    if args.only in (None, "pg_memory"):
        res = pg_memory()
        path = write_json("pg_memory", res)
        ok = ok and res["ok"]
        summary.append(f"pg_memory ({res['device']}) -> {path}")
        for r in res["runs"]:
            summary.append(f"  {r['method']} {r['steps']:>2} steps, steps_per_backward={r['steps_per_backward']}: "
                           f"peak {r['peak_bytes'] / 2**20:8.1f} MiB, {r['wall_seconds']:.2f} s")
        summary.append("  50/5 steps: " + ", ".join(f"{k} x{v:.2f}" for k, v in res["ratio_50_over_5"].items())
                       + " (goal <= 1.5 one step at a time)")
    if args.only in (None, "tables"):
        res = tables_wall_time()
        path = write_json("tables_wall_time", res)
        ok = res["ok"]
        summary.append(f"tables_wall_time ({res['device']}, {res['cpu_count']} CPUs, torch {res['torch']}) -> {path}")
        for name, t in res["tables"].items():
            summary.append(f"  {name}: {t['seconds']:.0f} s" + ("" if t["returncode"] == 0 else f" (FAILED, rc {t['returncode']})"))
        summary.append(f"  total: {res['total_seconds']:.0f} s")
    if args.only in (None, "diversity"):
        res = diversity_speed()
        path = write_json("diversity_speed", res)
        ok = ok and res["ok"]
        summary.append(f"diversity of 1,000 GFP sequences -> {path}")
        for name, r in res["sets"].items():
            summary.append(f"  {name}: Div {r['diversity']:.2f} in {r['seconds_best']:.2f} s (goal <= 5 s)")
    if args.only in (None, "elegant_table3"):
        res = elegant_table3_wall_time()
        path = write_json("elegant_table3_wall_time", res)
        ok = ok and res["ok"]
        summary.append(f"elegant_table3 (caches warm) -> {path}: {res['minutes']:.1f} min (goal <= 30 min)"
                       + ("" if res["returncode"] == 0 else f" (FAILED, rc {res['returncode']})"))
    print("\n".join(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
