"""Classifier guidance (ELEGANT App. E.3): the guided score is the pretrained score plus
gamma * grad log p(y = 1 | x_s); only the classifier trains; it learns a separable top-q
labelling and its guidance moves samples towards the labelled region; end to end via the CLI."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from conftest import describe, path_overrides, run_cli_many
from diffusion_rl.backbones.base import Backbone
from diffusion_rl.backbones.mlp import MLPBackbone
from diffusion_rl.core.processes import BrownianBridgeProcess, OUProcess, VPProcess
from diffusion_rl.core.samplers import EulerMaruyama
from diffusion_rl.data.toy import GaussianMixture1D, SwissRoll
from diffusion_rl.methods.guidance import ClassifierLogLikelihood, Guidance, GuidedScore, TimeConditionedClassifier
from diffusion_rl.rewards.base import BoxIndicator, Reward

pytestmark = pytest.mark.filterwarnings("ignore:.*treespec", "ignore:.*does not have many workers",
                                        "ignore:.*LightningModule.log")


class FirstCoordinate(Reward):
    """``r(x) = x_1``: the top-q labelling of a 1-D mixture is a half-line."""

    def forward(self, x, cond=None):
        return x[..., 0]


class ExactMixtureScore(Backbone):
    """The exact score of the noised mixture under ``process`` (no parameters)."""

    def __init__(self, data: GaussianMixture1D, process):
        super().__init__()
        self.data, self.process, self.event_shape = data, process, (1,)

    def forward(self, x, s, cond=None):
        out = torch.empty_like(x)
        s = s.reshape(-1).expand(x.shape[0])
        for value in s.unique():
            rows = s == value
            alpha, sigma = self.process.marginal_coeffs(value)
            out[rows] = self.data.noised(float(alpha), float(sigma)).score(x[rows]).to(x.dtype)
        return out


def gmm():
    return GaussianMixture1D([0.5, 0.5], [-2.0, 2.0], [0.5, 0.5])


def build(backbone=None, process=None, reward=None, dataset=None, **kw):
    torch.manual_seed(0)  # network initialisation only; every draw of the method uses its generator
    process = process or OUProcess(T=1.0)
    kw = {"iterations": 1, "batch_size": 16, "lr": 1e-2, "seed": 0, "iterations_per_epoch": 1,
          "classifier_hidden": [16, 16], "label_pool": 256, **kw}
    return Guidance(backbone or MLPBackbone(2, hidden=16), EulerMaruyama(process, 8),
                    reward or BoxIndicator([-100.0, 0.0], [100.0, 100.0]),
                    dataset=dataset or SwissRoll(noise=1.0, scale=0.1), **kw)


def fit(method, tmp_path):
    trainer = L.Trainer(max_epochs=method.epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(method)
    return trainer


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_zero_guidance_is_the_pretrained_score():
    method = build(guidance_scale=0.0)
    x, s = torch.randn(32, 2), torch.rand(32)
    with torch.no_grad():
        assert torch.equal(method.eval_policy()(x, s), method.reference(x, s))
    # and a positive scale does change it (the check above can fail)
    method.guidance_scale = 2.0
    with torch.no_grad():
        assert not torch.allclose(method.eval_policy()(x, s), method.reference(x, s))


def test_guided_score_adds_gamma_times_classifier_log_gradient():
    torch.manual_seed(1)
    classifier = TimeConditionedClassifier((3, 4), hidden=[8], time_dim=8, time_scale=10.0)
    pretrained = MLPBackbone(12, hidden=8)

    def flat_pretrained(x, s, cond=None):
        return pretrained(x.flatten(1), s).reshape(x.shape)

    class Flat(torch.nn.Module):
        def forward(self, x, s, cond=None):
            return flat_pretrained(x, s)

    x, s, gamma = torch.randn(5, 3, 4), torch.rand(5), 2.5
    with torch.no_grad():  # as in the shared evaluation
        guided = GuidedScore(Flat(), ClassifierLogLikelihood(classifier), gamma, VPProcess())(x, s)
    assert not guided.requires_grad
    # independent autograd: per-sample derivative of log sigmoid(logit) (a Jacobian row each)
    expected = torch.stack([
        torch.autograd.functional.jacobian(lambda xi: torch.nn.functional.logsigmoid(classifier(xi[None], s[i:i + 1]))[0], x[i])
        for i in range(5)])
    torch.testing.assert_close(guided - flat_pretrained(x, s).detach(), gamma * expected)
    assert expected.abs().sum() > 0


def test_one_update_trains_the_classifier_only(tmp_path):
    method = build()
    before = snapshot(method)
    trainer = fit(method, tmp_path)
    after = snapshot(method)
    classifier = [k for k in before if k.startswith("classifier.")]
    assert classifier and all(not torch.equal(before[k], after[k]) for k in classifier)
    for prefix in ("backbone.", "reference."):
        keys = [k for k in before if k.startswith(prefix)]
        assert keys and all(torch.equal(before[k], after[k]) for k in keys), prefix
    assert all(p.grad is not None for p in method.classifier.parameters())
    for module in (method.backbone, method.reference):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    assert list(method.backbone.trainable_parameters()) == []
    (opt,) = trainer.optimizers
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in method.classifier.parameters()}
    # the threshold was set once and is kept in the state dict (resume)
    assert torch.isfinite(after["label_threshold"])


def test_labels_follow_the_top_fraction_with_ties():
    # box reward: about half of the roll is inside, so the top 10% tie at 1 -> y = r >= 1
    method = build(label_pool=2000)
    method.fit_threshold()
    assert method.label_threshold.item() == 1.0 and not method.label_strict
    # fewer than q rewarded (box holds a sliver): r >= quantile (= 0) would label everything
    method = build(label_pool=2000, reward=BoxIndicator([-100.0, 1.4], [100.0, 100.0]), top_fraction=0.3)
    method.fit_threshold()
    y = method.labels(method.reward(method._draw_data(2000)))
    assert method.label_strict and 0 < y.mean() < 0.3
    # continuous reward: the positive fraction is q
    method = build(backbone=MLPBackbone(1, hidden=8), reward=FirstCoordinate(), dataset=gmm(), label_pool=4000,
                   top_fraction=0.2)
    method.fit_threshold()
    y = method.labels(method.reward(method._draw_data(4000)))
    assert abs(y.mean().item() - 0.2) < 0.03 and 2.0 < method.label_threshold.item() < 2.8


def test_classifier_learns_and_guidance_moves_samples_up(tmp_path):
    data, process = gmm(), VPProcess()
    method = build(backbone=ExactMixtureScore(data, process), process=process, reward=FirstCoordinate(),
                   dataset=data, top_fraction=0.5, guidance_scale=1.0, iterations=200, iterations_per_epoch=200,
                   batch_size=128, lr=3e-3, classifier_hidden=[32, 32], label_pool=2000)
    fit(method, tmp_path)
    # the median of a symmetric mixture of two well-separated modes lies somewhere in the gap
    # between them (where the pool has almost no points, so not near 0 in particular)
    assert abs(method.label_threshold.item()) < 1.5

    g = torch.Generator().manual_seed(123)
    x0 = data.sample(2000, g)
    y = (x0[:, 0] >= method.label_threshold).float()
    s = torch.full((2000,), 0.05)  # small noise level: the modes at -2 and 2 stay apart
    alpha, sigma = process.marginal_coeffs(s)
    xs = alpha[:, None] * x0 + sigma[:, None] * torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        accuracy = ((method.classifier(xs, s) > 0).float() == y).float().mean().item()
    assert accuracy > 0.9, accuracy  # chance is 0.5 at q = 0.5

    sampler = EulerMaruyama(process, 100)
    with torch.no_grad():
        guided = sampler.rollout(method.eval_policy(), 400, generator=torch.Generator().manual_seed(7),
                                 event_shape=(1,)).final
        plain = sampler.rollout(method.reference, 400, generator=torch.Generator().manual_seed(7),
                                event_shape=(1,)).final
    assert abs(plain.mean().item()) < 0.5
    # the conditional p(x | x >= 0) has mean ~2: guidance at gamma = 1 moves most mass to the upper mode
    assert guided.mean().item() > plain.mean().item() + 1.0, (guided.mean().item(), plain.mean().item())
    assert (guided > 0).float().mean().item() > 0.8


@pytest.mark.parametrize("kw, phrase", [
    ({"guidance_scale": -1.0}, "method.guidance_scale must be >= 0 (got -1.0)"),
    ({"top_fraction": 0.0}, "method.top_fraction must be in (0, 1)"),
    ({"top_fraction": 1.0}, "method.top_fraction must be in (0, 1)"),
    ({"label_pool": 0}, "method.label_pool"),
    ({"s_min": 1.0}, "method.s_min"),
])
def test_invalid_arguments_raise(kw, phrase):
    with pytest.raises(ValueError) as err:
        build(**kw)
    assert phrase in str(err.value)


def test_needs_a_dataset_and_a_gaussian_score_process():
    with pytest.raises(ValueError, match="needs a dataset"):
        Guidance(MLPBackbone(2, hidden=8), EulerMaruyama(OUProcess(T=1.0), 4), BoxIndicator([0.0, 0.0], [1.0, 1.0]),
                 iterations=1, batch_size=4, lr=1e-3)
    with pytest.raises(ValueError, match="predicts a drift"):
        build(process=BrownianBridgeProcess())


def test_constant_reward_cannot_be_labelled():
    method = build(reward=BoxIndicator([-100.0, -100.0], [100.0, 100.0]), label_pool=100)
    with pytest.raises(ValueError, match="constant"):
        method.fit_threshold()


def test_cli_smoke_runs(tmp_path):
    runs = {
        "gmm1d": ["dataset=gmm1d", "reward=near_six", "backbone.dim=1"],
        "swiss_roll": [],  # default dataset (box reward, OU process)
    }
    cmds = [["debug=smoke", "method=guidance", *extra, f"hydra.run.dir={tmp_path / name}", *path_overrides(tmp_path)]
            for name, extra in runs.items()]
    for name, proc in zip(runs, run_cli_many(cmds, workers=2)):
        assert proc.returncode == 0, describe(proc)
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["n_samples"] == 64 and metrics["kl_path"] > 0, metrics
        iterations = OmegaConf.load(tmp_path / name / "config.yaml").method.iterations
        curves = (tmp_path / name / "metrics.csv").read_text().splitlines()
        assert "train/classifier_loss" in curves[0] and len(curves) == 1 + iterations
