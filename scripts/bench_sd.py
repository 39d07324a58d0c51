"""Stable Diffusion benchmarks: ``python scripts/bench_sd.py [--size tiny|sd15]`` → ``outputs/bench/sd_*.json``.

One reward-backpropagation step: prompts → CFG DDIM (eta = 1) chain of 50 steps with LoRA,
gradient through every step → VAE decode → CLIP → aesthetic head → backward → AdamW step.

* ``--size tiny`` (the CPU, issue 11 §8a): a tiny SD (tests/tiny_sd.py at the benchmark's
  size) and a tiny CLIP, batch 4, 50 steps, with and without per-step checkpointing: time and
  peak memory ratios; and the plain diffusers loop (checkpointed) beside ours. Peak memory on
  the CPU is the rise of the process's peak RSS over its level after loading (each
  configuration in a fresh process).
* ``--size sd15`` (a GPU, §8b): the full-size SD 1.5 UNet, VAE and a CLIP ViT-L/14 vision tower
  built from their configs with random weights (time and memory do not depend on the values),
  LoRA rank 4, batch 4, bf16 autocast; ours (the project's backbone + sampler, as the method
  runs them) at 50 and 5 steps, and the same loop written plainly with diffusers' pieces
  (DDIMScheduler.step, torch.utils.checkpoint around each CFG UNet call) side by side in the
  same run. Peak memory: ``torch.cuda.max_memory_allocated`` above the loaded models.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny SD builder the tests use
sys.path.insert(0, str(ROOT / "scripts"))

from bench import environment, write_json  # noqa: E402
from diffusion_rl.seeding import seeded_draws  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
PROMPTS = (["cat", "dog", "horse", "monkey"], ["panda"])

#: SD 1.5's UNet, VAE and CLIP ViT-L/14 vision tower (their published configs' architecture keys)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215)
CLIP_L14 = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                image_size=224, patch_size=14, projection_dim=768)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 max_position_embeddings=77)


def write_weights(folder: Path, size: str) -> tuple[Path, Path]:
    """Random-weight model folders in the layouts the backbone and the reward load."""
    from tiny_sd import write_tiny_clip, write_tiny_sd, write_tokenizer

    if size == "tiny":  # METHODS_SPEC §6's tiny chain: channels 32/64, 2 layers, 16x16 latents
        return (write_tiny_sd(folder / "sd", latent_size=16, channels=(32, 64), layers_per_block=2, cross_dim=32),
                write_tiny_clip(folder / "clip"))
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    sd = folder / "sd"
    write_tokenizer(sd / "tokenizer")
    vocab = len(json.loads((sd / "tokenizer" / "vocab.json").read_text()))
    with seeded_draws(0, "bench_weights"):  # random full-size weights from a generator of their own
        UNet2DConditionModel(**SD15_UNET).save_pretrained(str(sd / "unet"))
        AutoencoderKL(**SD15_VAE).save_pretrained(str(sd / "vae"))
        CLIPTextModel(CLIPTextConfig(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                     **SD15_TEXT)).save_pretrained(str(sd / "text_encoder"))
        CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L14)).save_pretrained(str(folder / "clip"))
    return sd, folder / "clip"


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def one_run(spec: dict) -> dict:
    """One configuration in this process: build, one warm-up step, ``repeats`` timed steps."""
    from diffusion_rl.backbones.stable_diffusion import StableDiffusionBackbone
    from diffusion_rl.core.processes import DiscreteVPProcess
    from diffusion_rl.core.samplers import DDIM, GradWindow
    from diffusion_rl.rewards.aesthetic import LaionAesthetic

    device = torch.device(spec["device"])
    with seeded_draws(0, "bench_backbone"):  # LoRA's initial weights, as the runner builds them
        backbone = StableDiffusionBackbone(spec["sd"], *PROMPTS, guidance_scale=7.5).to(device)
        reward = LaionAesthetic(spec["clip"], DATA).to(device)
    process = DiscreteVPProcess()
    sampler = DDIM(process, spec["steps"], eta=1.0)
    opt = torch.optim.AdamW(list(backbone.trainable_parameters()), lr=1e-4, weight_decay=0.1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["bf16"])
    batch = spec["batch"]
    generator = torch.Generator(device=device).manual_seed(0)
    cond = {"prompt": torch.arange(batch, device=device) % len(PROMPTS[0])}
    step = plain_step if spec["loop"] == "plain" else None

    def ours():
        traj = sampler.rollout(backbone, batch, generator=generator, event_shape=backbone.event_shape, cond=cond,
                               reference=backbone.frozen_reference() if spec["kl"] else None,
                               grad_window=GradWindow("all"), checkpoint_steps=spec["checkpoint"], device=device)
        loss = -reward(backbone.render(traj.final)).mean()
        if spec["kl"]:
            loss = loss + 1e-3 * traj.path_kl().mean()
        return loss

    def one_step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = ours() if step is None else step(backbone, reward, spec["steps"], batch, cond, generator,
                                                    spec["checkpoint"])
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    loaded = peak_memory(device) if device.type == "cpu" else torch.cuda.memory_allocated(device)
    one_step()  # warm-up (allocator, kernels)
    start = time.perf_counter()
    for _ in range(spec["repeats"]):
        one_step()
    seconds = (time.perf_counter() - start) / spec["repeats"]
    return {**{k: v for k, v in spec.items() if k not in ("sd", "clip")}, "seconds_per_step": seconds,
            "peak_bytes_above_loaded": peak_memory(device) - loaded}


def plain_step(backbone, reward, steps, batch, cond, generator, checkpointed):
    """The same step written plainly with diffusers' pieces: DDIMScheduler (SD 1.5's settings),
    ``scheduler.step(eta=1)``, a CFG UNet call per step (checkpointed), the VAE decode."""
    from diffusers import DDIMScheduler
    from torch.utils.checkpoint import checkpoint

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(steps)
    unet, text = backbone.unet, backbone.prompt_embeds[cond["prompt"]]
    both = torch.cat([backbone.negative_embeds.expand(batch, -1, -1), text])
    device = text.device
    latents = torch.randn((batch, *backbone.event_shape), generator=generator, device=device)

    def cfg(z, t):
        eps_u, eps_c = unet(torch.cat([z, z]), t, encoder_hidden_states=both).sample.chunk(2)
        return eps_u + 7.5 * (eps_c - eps_u)

    for t in scheduler.timesteps:
        eps = checkpoint(cfg, latents, t, use_reentrant=False) if checkpointed else cfg(latents, t)
        latents = scheduler.step(eps, t, latents, eta=1.0, generator=generator).prev_sample
    return -reward(backbone.decode(latents)).mean()


def run_isolated(spec: dict) -> dict:
    """``one_run`` in a fresh process: its peak memory is its own."""
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("auto", "tiny", "sd15"), default="auto",
                        help="auto: tiny, and sd15 too where a GPU is found")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(json.loads(args.one))))
        return 0
    sizes = [args.size] if args.size != "auto" else ["tiny", *(["sd15"] if torch.cuda.is_available() else [])]
    for size in sizes:
        bench(size, args.repeats)
    return 0


def bench(size: str, repeats: int) -> None:
    device = "cuda" if size == "sd15" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_sd --size sd15 needs a GPU")
    with tempfile.TemporaryDirectory() as tmp:
        sd, clip = write_weights(Path(tmp), size)
        base = dict(sd=str(sd), clip=str(clip), device=device, batch=4, repeats=repeats, kl=False,
                    bf16=device == "cuda")
        if size == "tiny":  # checkpointing's cost, and the plain loop beside ours at the same settings
            configs = [dict(loop="ours", steps=50, checkpoint=c) for c in (False, True)]
            configs.append(dict(loop="plain", steps=50, checkpoint=True))
        else:
            configs = [dict(loop=loop, steps=n, checkpoint=True) for loop in ("ours", "plain") for n in (50, 5)]
            configs.append(dict(loop="ours", steps=50, checkpoint=True, kl=True))
        runs = [run_isolated({**base, **c}) for c in configs]
    by = {(r["loop"], r["steps"], r["checkpoint"], r["kl"]): r for r in runs}
    result = {**environment(torch.device(device)), "size": size, "runs": runs}
    if size == "tiny":
        plain, ckpt = by[("ours", 50, False, False)], by[("ours", 50, True, False)]
        result["memory_ratio_checkpointed_over_not"] = ckpt["peak_bytes_above_loaded"] / plain["peak_bytes_above_loaded"]
        result["time_ratio_checkpointed_over_not"] = ckpt["seconds_per_step"] / plain["seconds_per_step"]
        loop = by[("plain", 50, True, False)]
        result["time_ratio_ours_over_plain_loop_50"] = ckpt["seconds_per_step"] / loop["seconds_per_step"]
    else:
        ours50, ours5, plain50 = by[("ours", 50, True, False)], by[("ours", 5, True, False)], by[("plain", 50, True, False)]
        result["time_ratio_ours_over_plain_50"] = ours50["seconds_per_step"] / plain50["seconds_per_step"]
        result["memory_ratio_50_over_5_steps"] = ours50["peak_bytes_above_loaded"] / ours5["peak_bytes_above_loaded"]
        result["goals"] = {"ours no slower than the plain loop": result["time_ratio_ours_over_plain_50"] <= 1.05,
                           "memory at 50 steps <= 1.3 x memory at 5": result["memory_ratio_50_over_5_steps"] <= 1.3}
    path = write_json(f"sd_{size}", result)
    for r in runs:
        print(f"{r['loop']:>5} {r['steps']:>2} steps checkpoint={r['checkpoint']!s:<5} kl={r['kl']!s:<5}: "
              f"{r['seconds_per_step']:.2f} s/step, peak +{r['peak_bytes_above_loaded'] / 2**20:.0f} MiB")
    print({k: v for k, v in result.items() if "ratio" in k or k == "goals"}, "->", path)


if __name__ == "__main__":
    sys.exit(main())
