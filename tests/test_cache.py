"""The load-or-fit cache (``diffusion_rl.cache``): keys, atomic entries, loading instead of
fitting; the pretraining key's defining parts; ``pretrain=null``."""

from __future__ import annotations

import hashlib
import json

import pytest
from hydra import compose, initialize_config_dir

from diffusion_rl import cache
from diffusion_rl.cache import cache_key, cached
from diffusion_rl.runner import pretrain_config

from conftest import CONF_DIR, describe, path_overrides, run_cli

CONFIG = {"net": {"hidden": [32, 32], "activation": "relu"}, "epochs": 3, "lr": 1e-3, "data": "toy"}


class Counter:
    """A fit writing ``value`` to ``artefact.txt`` (counting its calls) and the matching load."""

    def __init__(self, value: str = "fitted"):
        self.value, self.fits = value, 0

    def fit(self, folder):
        self.fits += 1
        (folder / "artefact.txt").write_text(self.value)

    @staticmethod
    def load(folder):
        return (folder / "artefact.txt").read_text()


def entries(root, kind="oracle"):
    """Everything under the kind's folder, hidden temporary folders included."""
    folder = root / kind
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------ keys


def test_same_config_same_key_whatever_the_key_order():
    reordered = {"data": "toy", "lr": 1e-3, "epochs": 3, "net": {"activation": "relu", "hidden": [32, 32]}}
    assert cache_key("oracle", CONFIG) == cache_key("oracle", dict(CONFIG)) == cache_key("oracle", reordered)


@pytest.mark.parametrize("change", [
    {"epochs": 4}, {"lr": 2e-3}, {"data": "other"}, {"net": {"hidden": [32, 64], "activation": "relu"}},
    {"net": {"hidden": [32, 32], "activation": "tanh"}}, {"extra": None}])
def test_any_defining_field_changes_the_key(change):
    assert cache_key("oracle", {**CONFIG, **change}) != cache_key("oracle", CONFIG)


def test_code_version_and_kind_salt_the_key(monkeypatch):
    before = cache_key("oracle", CONFIG)
    assert cache_key("pretrain", CONFIG) != before
    monkeypatch.setitem(cache.CODE_VERSION, "oracle", cache.CODE_VERSION["oracle"] + 1)
    assert cache_key("oracle", CONFIG) != before


def test_unknown_kind_needs_a_code_version():
    with pytest.raises(KeyError, match="CODE_VERSION"):
        cache_key("surely_not_a_kind", CONFIG)


# ------------------------------------------------------------------ entries


def test_first_call_fits_second_loads(tmp_path):
    counter = Counter()
    assert cached("oracle", CONFIG, tmp_path, counter.fit, counter.load) == "fitted"
    assert cached("oracle", CONFIG, tmp_path, counter.fit, counter.load) == "fitted"
    assert counter.fits == 1
    key = cache_key("oracle", CONFIG)
    assert entries(tmp_path) == [key]  # no temporary folder left behind
    entry = tmp_path / "oracle" / key
    assert sorted(p.name for p in entry.iterdir()) == ["artefact.txt", "config.yaml", "meta.json"]
    # config.yaml is exactly the hashed text: the key can be recomputed from the entry alone
    text = (entry / "config.yaml").read_text()
    salted = f"oracle:{cache.CODE_VERSION['oracle']}\n{text}"
    assert hashlib.sha256(salted.encode()).hexdigest()[:12] == key
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["code_version"] == cache.CODE_VERSION["oracle"] and meta["key"] == key
    assert meta["fit_seconds"] >= 0 and meta["created"]
    # another config is another entry
    cached("oracle", {**CONFIG, "epochs": 9}, tmp_path, counter.fit, counter.load)
    assert counter.fits == 2 and len(entries(tmp_path)) == 2


def test_a_fit_that_raises_after_partial_writes_leaves_no_entry(tmp_path):
    """A crash mid-fit (files half written): nothing is published, and the next call fits afresh."""

    def crashing_fit(folder):
        (folder / "artefact.txt").write_text("half")
        (folder / "weights.pt").write_bytes(b"\0" * 10)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        cached("oracle", CONFIG, tmp_path, crashing_fit, Counter.load)
    assert entries(tmp_path) == []
    counter = Counter()
    assert cached("oracle", CONFIG, tmp_path, counter.fit, counter.load) == "fitted"
    assert counter.fits == 1 and entries(tmp_path) == [cache_key("oracle", CONFIG)]


def test_a_failing_load_is_not_hidden(tmp_path):
    def bad_load(folder):
        raise FileNotFoundError(folder / "missing.pt")

    with pytest.raises(FileNotFoundError):
        cached("oracle", CONFIG, tmp_path, Counter().fit, bad_load)


def test_two_writers_of_one_entry_both_end_with_the_first_valid_entry(tmp_path):
    """Another process publishes the entry while this one is still fitting: this one's rename
    loses, its copy is discarded, and it loads the published entry (so a sweep shares one)."""
    winner, loser = Counter("first"), Counter("second")

    def slow_fit(folder):
        cached("oracle", CONFIG, tmp_path, winner.fit, winner.load)  # the other process finishes first
        loser.fit(folder)

    assert cached("oracle", CONFIG, tmp_path, slow_fit, Counter.load) == "first"
    assert winner.fits == loser.fits == 1
    assert entries(tmp_path) == [cache_key("oracle", CONFIG)]
    assert cached("oracle", CONFIG, tmp_path, loser.fit, loser.load) == "first" and loser.fits == 1


# ------------------------------------------------------------------ the pretraining key


def pretrain_key(*overrides: str) -> str:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("config", overrides=list(overrides))
    return cache_key("pretrain", pretrain_config(cfg))


def test_pretraining_key_ignores_what_does_not_make_the_backbone():
    base = pretrain_key()
    for unrelated in (["method=ddpo"], ["method.lr=0.5"], ["seed=7"], ["eval.seed=3"], ["reward=near_six"],
                      ["sampler.num_steps=7"], ["trainer.enable_progress_bar=false"], ["trainer.log_every_n_steps=1"],
                      ["paths.runs_dir=/elsewhere"]):
        assert pretrain_key(*unrelated) == base, unrelated


def test_pretraining_key_changes_with_what_makes_the_backbone():
    base = pretrain_key()
    for defining in (["pretrain.iterations=7"], ["pretrain.lr=0.01"], ["backbone.hidden=32"], ["process.theta=2.0"],
                     ["dataset.noise=0.5"], ["dataset=gmm1d", "backbone.dim=1"], ["trainer.precision=bf16-mixed"],
                     ["trainer.accumulate_grad_batches=2"]):
        assert pretrain_key(*defining) != base, defining


# ------------------------------------------------------------------ pretrain=null


def test_pretrain_null_runs_the_backbone_as_instantiated(tmp_path):
    proc = run_cli(["debug=smoke", "pretrain=null", "method=pretrained", f"hydra.run.dir={tmp_path / 'run'}",
                    *path_overrides(tmp_path)])
    assert proc.returncode == 0, describe(proc)
    assert "pretrain: none" in proc.stdout + proc.stderr
    assert (tmp_path / "run" / "metrics.json").exists()
    assert not (tmp_path / "cache" / "pretrain").exists()  # nothing pretrained, nothing cached
