"""``write_figure`` on fake finished runs: both kinds give a PNG and a markdown page."""

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from diffusion_rl.report.figures import write_figure

CONF = Path(__file__).resolve().parents[1] / "conf"


def fake_runs(runs_dir: Path, table: str, group: str, dim: int) -> None:
    rng = np.random.default_rng(0)
    for i, beta in enumerate([1.0, 0.0, 0.1]):  # unsorted on purpose
        folder = runs_dir / table / group / f"method.reward_weight={beta}"
        folder.mkdir(parents=True)
        OmegaConf.save(OmegaConf.create({"method": {"reward_weight": beta}}), folder / "config.yaml")
        metrics = {"reward_mean": -4.0 + 3 * beta, "reward_ci95": 0.05, "kl_path": beta, "kl_path_ci95": 0.01,
                   "overrides": [f"method.reward_weight={beta}"]}
        if i:
            metrics |= {"kl_data": 0.1 * i, "kl_data_ci95": 0.02}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        shift = np.r_[2 * beta, np.zeros(dim - 1)]
        np.save(folder / "samples.npy", (rng.normal(size=(1000, dim)) + shift).astype(np.float32))


@pytest.mark.parametrize("kind,dataset,dim", [("density1d", "gmm1d", 1), ("scatter2d", "swiss_roll", 2)])
def test_write_figure(tmp_path, kind, dataset, dim):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=[f"dataset={dataset}", f"paths.runs_dir={tmp_path / 'runs'}",
                                           f"paths.report_dir={tmp_path / 'report'}"])
    OmegaConf.set_struct(cfg, False)
    cfg.table = {"name": f"fig_{kind}", "title": "Fake figure", "source": "q-learning paper, Figure X",
                 "figure": {"kind": kind, "group": "sweep", "by": "method.reward_weight", "max_points": 300}}
    fake_runs(tmp_path / "runs", cfg.table.name, "sweep", dim)

    md = write_figure(cfg)
    png = tmp_path / "report" / f"fig_{kind}.png"
    assert md == tmp_path / "report" / f"fig_{kind}.md"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert "# Fake figure" in text and "Figure X" in text and f"![fig_{kind}](fig_{kind}.png)" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "reward_weight" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| 0.0", "| 0.1", "| 1.0"]  # sorted by the sweep value
    assert "-4.00 ± 0.050" in rows[0] and "—" in rows[2]  # the beta=1 run has no kl_data


def test_image_grids_draw_the_lowest_seed_of_each_panel(tmp_path):
    """``image_grids``: one panel per group from its lowest seed's samples.npy; a group
    without runs is listed with dashes, not drawn."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=[f"paths.runs_dir={tmp_path / 'runs'}", f"paths.report_dir={tmp_path / 'report'}"])
    OmegaConf.set_struct(cfg, False)
    cfg.table = {"name": "grids", "title": "Fake grids", "source": "ours",
                 "figure": {"kind": "image_grids", "max_images": 16,
                            "panels": [{"group": "a", "label": "Method A"}, {"group": "empty", "label": "Nothing"}]}}
    for seed in (1, 0):
        folder = tmp_path / "runs" / "grids" / "a" / f"seed={seed}"
        folder.mkdir(parents=True)
        OmegaConf.save(OmegaConf.create({"seed": seed}), folder / "config.yaml")
        (folder / "metrics.json").write_text(json.dumps({"reward_mean": -1.0 - seed, "reward_ci95": 0.1,
                                                         "overrides": [f"seed={seed}"]}))
        np.save(folder / "samples.npy", np.full((20, 1, 8, 8), 0.5, dtype=np.float32))
    md = write_figure(cfg)
    assert (tmp_path / "report" / "grids.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line for line in md.read_text().splitlines() if line.startswith("| Method A") or line.startswith("| Nothing")]
    assert rows[0].startswith("| Method A | 0 | -1.00") and rows[1].startswith("| Nothing | — |")
