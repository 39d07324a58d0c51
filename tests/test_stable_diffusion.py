"""The Stable Diffusion path on tiny in-memory components (tests/tiny_sd.py), saved with
``save_pretrained`` and loaded back through the backbone's and the reward's own loading code:
LoRA is all that trains, adapters-off is the base UNet (CFG included), checkpoints hold LoRA
only and resume, the LAION head is the file's affine map, and every image method runs end to
end. No weights are downloaded: a missing folder is one line naming its ``paths.*`` key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import cli_env, describe, last_error_line, run_cli, run_cli_many
from tiny_sd import write_tiny_clip, write_tiny_sd

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PROMPTS = (["cat", "dog", "horse"], ["panda", "owl"])


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny_sd")
    return write_tiny_sd(root / "sd"), write_tiny_clip(root / "clip")


@pytest.fixture
def backbone(tiny_weights):
    from diffusion_rl.backbones.stable_diffusion import StableDiffusionBackbone

    torch.manual_seed(0)  # test code: LoRA's initial draw
    return StableDiffusionBackbone(tiny_weights[0], *PROMPTS, guidance_scale=3.0)


def perturb_lora(backbone, scale: float = 0.5) -> None:
    """lora_B starts at zero (the fine-tuned chain starts equal to the reference): give it
    values, as training would, so that the adapters change the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def inputs(backbone, n: int = 3):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, *backbone.event_shape, generator=g)
    s = torch.tensor([981.0, 501.0, 21.0][:n])
    return x, s, {"prompt": torch.tensor([0, 2, 4][:n])}


def test_gradients_reach_only_the_lora_weights(backbone):
    perturb_lora(backbone)
    x, s, cond = inputs(backbone)
    pixels = backbone.decode(backbone(x, s, cond))  # through the UNet and the VAE decoder
    pixels.square().mean().backward()
    got = {n for n, p in backbone.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got and all("lora_" in n for n in got), sorted(got)[:5]
    lora = {n for n, _ in backbone.named_parameters() if "lora_" in n}
    assert {n for n, _ in backbone.named_parameters() if _.requires_grad} == lora
    assert {id(p) for p in backbone.trainable_parameters()} == {id(p) for n, p in backbone.named_parameters() if n in lora}
    assert any("lora_A" in n for n in got) and any("lora_B" in n for n in got)


def test_adapters_off_is_the_base_unet_with_cfg_in_both_chains(backbone, tiny_weights):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = tiny_weights[0]
    x, s, cond = inputs(backbone)
    with torch.no_grad():
        at_start = backbone(x, s, cond)
        perturb_lora(backbone)
        policy, reference = backbone(x, s, cond), backbone.frozen_reference()(x, s, cond)
    # CFG by hand from freshly loaded base components: eps_u + w (eps_c - eps_u)
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder")
    prompts = [*PROMPTS[0], *PROMPTS[1]]
    with torch.no_grad():
        ids = tokenizer([prompts[i] for i in cond["prompt"]] + [""], padding="max_length", max_length=77,
                        return_tensors="pt").input_ids
        emb = text(ids)[0]
        eps_c = unet(x, s, encoder_hidden_states=emb[:-1]).sample
        eps_u = unet(x, s, encoder_hidden_states=emb[-1:].expand(len(x), -1, -1)).sample
    expected = eps_u + 3.0 * (eps_c - eps_u)
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(at_start, expected, rtol=1e-5, atol=1e-5)  # lora_B = 0 at the start
    assert (policy - reference).abs().max() > 1e-3  # the adapters act on the fine-tuned chain only
    # the toggle leaves the adapters trainable (peft's disable/enable sets requires_grad)
    assert all(p.requires_grad for p in backbone.trainable_parameters())
    # the reference holds no second UNet: nothing of it is in a state_dict
    assert not list(backbone.frozen_reference().state_dict())


def test_prompts_train_draws_and_eval_cycles(backbone):
    source = backbone.condition_source()
    train = source.sample(200, torch.Generator().manual_seed(0))["prompt"]
    assert set(train.tolist()) == {0, 1, 2}
    evaluation = source.sample(5, torch.Generator().manual_seed(0), split="eval")["prompt"]
    assert evaluation.tolist() == [3, 4, 3, 4, 3]
    # a prompt changes the output (the cross-attention reads the table row)
    x, s, _ = inputs(backbone, 1)
    with torch.no_grad():
        a = backbone(x, s, {"prompt": torch.tensor([0])})
        b = backbone(x, s, {"prompt": torch.tensor([1])})
    assert (a - b).abs().max() > 1e-4


def test_aesthetic_head_is_the_files_affine_map():
    from diffusion_rl.rewards.aesthetic import AestheticHead

    head = AestheticHead.from_data_dir(DATA)
    state = torch.load(DATA / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth", map_location="cpu", weights_only=True)
    assert sorted(state) == sorted(head.state_dict())
    g = torch.Generator().manual_seed(0)
    e1, e2 = torch.randn(2, 768, generator=g, dtype=torch.float64)
    head = head.double()
    a, b = 0.3, -1.7
    zero = head(torch.zeros(768, dtype=torch.float64))
    torch.testing.assert_close(head(a * e1 + b * e2), a * head(e1) + b * head(e2) + (1 - a - b) * zero)
    # PROVENANCE.md: 4.46-5.68 on 4 random unit vectors (its seed not given): the AVA scale's middle.
    # Over 1,000 of them the scores spread 3-7 around head(0) = 5.24 (measured)
    units = torch.nn.functional.normalize(torch.randn(1000, 768, generator=g, dtype=torch.float64), dim=-1)
    scores = head(units)
    assert 4.5 < float(scores.mean()) < 6.0 and ((scores > 2.5) & (scores < 7.5)).all(), scores.aminmax()


def test_aesthetic_reward_reads_unit_clip_embeddings_differentiably(tiny_weights):
    from diffusion_rl.rewards.aesthetic import LaionAesthetic

    reward = LaionAesthetic(tiny_weights[1], DATA)
    pixels = (torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_(True)
    torch.testing.assert_close(reward.embed(pixels).norm(dim=-1), torch.ones(2))
    r = reward(pixels)
    torch.testing.assert_close(r, reward.head(reward.embed(pixels)))
    r.sum().backward()
    assert pixels.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())


def test_kl_per_latent_dimension():
    from diffusion_rl.evaluation.evaluate import EvalConfig
    from diffusion_rl.evaluation.metrics import EvalSamples, KLDiv, KLDivPerDim

    cfg = EvalConfig(num_batches=2, batch_size=3)
    kl = torch.arange(6, dtype=torch.float32)
    s = EvalSamples(x=torch.zeros(6, 3, 4, 4), kind="images", rewards=torch.zeros(6), kl_terms={"kl_path": kl},
                    cfg=cfg, states=torch.zeros(6, 4, 2, 2))
    torch.testing.assert_close(KLDivPerDim("k").batch_values(s), KLDiv("k").batch_values(s) / 16)


def sd_args(tiny_weights, tmp_path: Path, *extra: str) -> list[str]:
    return ["experiment=sd", "trainer=default", "trainer.precision=32-true", "debug=smoke", "num_threads=1",
            f"paths.sd_model={tiny_weights[0]}", f"paths.clip_model={tiny_weights[1]}",
            f"paths.runs_dir={tmp_path}/runs", f"paths.cache_dir={tmp_path}/cache", *extra]


#: every image method, one per class (the YAML variants of a class share its code path)
IMAGE_METHODS = {
    "pretrained": [], "nokl": ["+method.micro_batch=8"], "elegant": ["method.value_fraction=0.0", "method.initial_fraction=0.0"],
    "ddpo": [], "dpok": [], "ppo_kl": [],
    # the public image PPO's per-prompt baseline and advantage clip (tiny: groups full at 2)
    "soft_ppo": ["+method.advantage_groups=prompt", "+method.group_buffer=4", "+method.group_min_count=2",
                 "+method.advantage_clip=5.0"], "rw_mle": [], "pcl": [], "ctrl": [],
    "svdd": [], "smc": [], "value_weighted": [],
    "reward_guidance": ["method.label_pool=16", "method.features=reward_embedding", "method.embed_dim=768"],
}


def test_every_image_method_end_to_end_on_tiny_sd(tiny_weights, tmp_path):
    names = list(IMAGE_METHODS)
    procs = run_cli_many([sd_args(tiny_weights, tmp_path / m, f"method={m}", *IMAGE_METHODS[m],
                                  f"hydra.run.dir={tmp_path}/{m}/run") for m in names], workers=2)
    for name, proc in zip(names, procs):
        assert proc.returncode == 0, f"{name}: {describe(proc)}"
        metrics = json.loads((tmp_path / name / "run" / "metrics.json").read_text())
        assert metrics["n_samples"] > 0 and "reward_mean" in metrics, name
        if "kl_div" in metrics:  # the paper's unit: per latent dimension (4 x 8 x 8 here)
            assert metrics["kl_div_per_dim"] == pytest.approx(metrics["kl_div"] / 256, rel=1e-6), name
        assert (tmp_path / name / "run" / "samples.png").exists()


def test_checkpoint_holds_lora_only_and_a_run_continues_from_it(tiny_weights, tmp_path):
    run = tmp_path / "run"
    args = sd_args(tiny_weights, tmp_path, "method=reward_backprop", "method.kl_weight=0.01", f"hydra.run.dir={run}")
    proc = run_cli([*args, "method.iterations=2"])
    assert proc.returncode == 0, describe(proc)
    state = torch.load(run / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert state and all("lora_" in k for k in state), [k for k in state if "lora_" not in k][:5]
    # an extension resumes from that checkpoint: the left-out weights come from the folder again
    proc = run_cli([*args, "method.iterations=3"])
    assert proc.returncode == 0, describe(proc)
    assert "resuming from" in proc.stderr + proc.stdout
    assert json.loads((run / "metrics.json").read_text())["n_samples"] > 0


def test_missing_weights_are_one_line_naming_the_key(tmp_path):
    proc = run_cli(["experiment=sd", "method=nokl", f"paths.runs_dir={tmp_path}/runs", "paths.sd_model=null",
                    "paths.clip_model=null"])
    assert proc.returncode == 2
    line = last_error_line(proc)
    assert line.index("paths.sd_model") < line.index("paths.clip_model"), line
    assert not (tmp_path / "runs").exists()
    proc = subprocess.run([sys.executable, "scripts/make_table.py", "elegant_table9", f"paths.runs_dir={tmp_path}/t",
                           "paths.sd_model=null", "paths.clip_model=null"],
                          cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, describe(proc)
    assert len(proc.stderr.strip().splitlines()) == 1 and "paths.sd_model" in proc.stderr, proc.stderr
    assert not (tmp_path / "t").exists()


def test_elegant_never_deep_copies_the_unet(tiny_weights, tmp_path):
    """The initial-distribution stage on a UNet: refused with its way out under the default
    copy of the backbone; a small network instead runs all three stages (value, initial, drift)."""
    proc = run_cli(sd_args(tiny_weights, tmp_path / "copy", "method=elegant", f"hydra.run.dir={tmp_path}/copy/run"))
    assert proc.returncode == 2 and "initial_network=small" in last_error_line(proc), describe(proc)
    run = tmp_path / "small" / "run"
    proc = run_cli(sd_args(tiny_weights, tmp_path / "small", "method=elegant", "+method.initial_network=small",
                           "+method.initial_hidden=[16]", "method.value_hidden=[16]", f"hydra.run.dir={run}"))
    assert proc.returncode == 0, describe(proc)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["kl_init"] >= 0 and metrics["trained_auxiliary_parameters"] > 0, metrics


def test_training_grids_show_decoded_images(tiny_weights, tmp_path):
    """The dashboards' grids of a latent model are its VAE-decoded RGB images, not latents."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = tmp_path / "run"
    proc = run_cli(sd_args(tiny_weights, tmp_path, "method=nokl", "logger=default", f"hydra.run.dir={run}"))
    assert proc.returncode == 0, describe(proc)
    acc = event_accumulator.EventAccumulator(str(run / "tb"), size_guidance={event_accumulator.IMAGES: 0})
    acc.Reload()
    events = acc.Images("train/samples")
    # 16 decoded 16 x 16 images: 4 x 4 tiles with 1-pixel borders (69 pixels), each drawn 4 x 4
    assert [e.step for e in events] == [1, 2, 3] and {(e.width, e.height) for e in events} == {(69 * 4, 69 * 4)}
