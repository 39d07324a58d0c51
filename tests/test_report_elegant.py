"""Report features for the ELEGANT tables, on fake finished runs: seeds per cell, exact-optimum
rows, training-curve PNGs and reward histograms."""

import itertools
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from diffusion_rl.report.curves import aggregate_curves, read_curves
from diffusion_rl.report.exact_rows import exact_optimum_row
from diffusion_rl.report.experiments import (aggregate_seeds, collect_runs, group_command, select_runs,
                                             values_match)
from diffusion_rl.report.figures import histogram_data, write_figure
from diffusion_rl.report.tables import render_table, write_report

PNG = b"\x89PNG\r\n\x1a\n"
T_975_DF2 = 4.302652729749464  # Student t quantile 0.975 with 2 dof (statistical tables)


def make_run(runs_dir: Path, table: str, group: str, name: str, config: dict, metrics: dict,
             csv_rows: list[dict] | None = None, rewards: np.ndarray | None = None) -> Path:
    folder = runs_dir / table / group / name
    folder.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config), folder / "config.yaml")
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if csv_rows is not None:
        cols = list(dict.fromkeys(k for row in csv_rows for k in row))
        lines = [",".join(cols)] + [",".join("" if row.get(c) is None else str(row[c]) for c in cols) for row in csv_rows]
        (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    if rewards is not None:
        np.save(folder / "rewards.npy", rewards.astype(np.float32))
    return folder


def base_cfg(tmp_path: Path, table: dict):
    return OmegaConf.create({"seed": 0, "paths": {"runs_dir": str(tmp_path / "runs"), "report_dir": str(tmp_path / "report")},
                             "table": table})


# ELEGANT group: kl_weight in {0.01, 0.1 + 0.2} x seeds 0, 1, 2; the float 0.1 + 0.2 is matched by where 0.3
WEIGHTS = [0.01, 0.1 + 0.2]
REWARD = {(0, 0): 0.50, (0, 1): 0.56, (0, 2): 0.47, (1, 0): 0.81, (1, 1): 0.90, (1, 2): 0.84}
DIV = {(0, 0): 4.0, (0, 1): 3.0, (0, 2): 3.5, (1, 0): 2.0, (1, 1): 2.6, (1, 2): 2.3}


def elegant_runs(runs_dir: Path, table: str) -> None:
    rng = np.random.default_rng(0)
    for (w, seed), reward in REWARD.items():
        csv_rows = [{"epoch": 0, "step": s, "train/reward": reward * s / 20, "train/kl_path": 0.1 * s + seed,
                     **({"train/diversity": DIV[w, seed]} if seed != 2 else {})} for s in (9, 19)]
        csv_rows.insert(1, {"epoch": 0, "step": 9, "train/reward": None, "train/kl_path": None, "val/x": 1.0})
        make_run(runs_dir, table, "elegant", f"method.kl_weight={WEIGHTS[w]},seed={seed}",
                 {"seed": seed, "method": {"kl_weight": WEIGHTS[w]}},
                 {"reward_mean": reward, "reward_ci95": 0.01, "diversity": DIV[w, seed], "kl_div": 1.0 + seed + w,
                  "kl_div_ci95": 0.05, "method.kl_weight": WEIGHTS[w], "wall_seconds": 10},
                 csv_rows, rng.normal(reward, 0.1, 500))
    make_run(runs_dir, table, "pretrained", "seed=0", {"seed": 0, "method": {"kl_weight": 0.0}},
             {"reward_mean": 0.3, "reward_ci95": 0.02, "diversity": 5.0, "kl_div": 0.0, "wall_seconds": 1},
             [{"step": 0, "train/reward": 0.3}], rng.normal(0.3, 0.1, 500))


def elegant_table(**extra) -> dict:
    return {"name": "elegant_fake", "title": "Fake ELEGANT table", "source": "Uehara et al. 2024, Table X",
            "columns": {"reward_mean": "r̂", "diversity": "Div", "kl_div": "KL-Div"}, "paper_columns": ["r̂"],
            "show_config": ["method.kl_weight"],
            "groups": {"pretrained": {"overrides": ["method=pretrained"]},
                       "elegant": {"overrides": ["method=elegant"],
                                   "sweep": {"method.kl_weight": WEIGHTS, "seed": [0, 1, 2]}}},
            "rows": [{"label": "Pretrained", "group": "pretrained", "paper": {"r̂": "0.29"}},
                     {"label": "ELEGANT", "group": "elegant", "where": {"method.kl_weight": 0.3}},
                     {"label": "ELEGANT seed 1", "group": "elegant", "where": {"method.kl_weight": 0.01, "seed": 1}},
                     {"label": "ELEGANT matched", "group": "elegant", "target_reward": 0.6}],
            **extra}


def t_ci(values):
    x = np.asarray(values, dtype=float)
    return x.mean(), T_975_DF2 * x.std(ddof=1) / math.sqrt(len(x))


def test_group_command_seed_sweep():
    cfg = OmegaConf.create({"seed": 7, "paths": {"runs_dir": "runs"}, "table": elegant_table()})
    swept = group_command(cfg, "elegant")
    assert "seed=0,1,2" in swept and not any(a.startswith("seed=") and a != "seed=0,1,2" for a in swept)
    single = group_command(cfg, "pretrained")
    assert [a for a in single if a.startswith("seed=")] == ["seed=7"]


def test_values_match():
    assert values_match(0.1 + 0.2, 0.3) and values_match(0.001, "1e-3") and values_match(2, 2.0)
    assert not values_match(0.01, 0.011) and not values_match("a", "b") and values_match("a", "a")
    assert not values_match(True, 1) and values_match(False, False) and not values_match(None, 0)


def test_seed_aggregation(tmp_path):
    cfg = base_cfg(tmp_path, elegant_table())
    elegant_runs(tmp_path / "runs", cfg.table.name)
    runs = collect_runs(cfg, "elegant")
    chosen = select_runs(runs, cfg.table.rows[1], ["method.kl_weight"])
    assert sorted(r.config.seed for r in chosen) == [0, 1, 2]
    agg = aggregate_seeds(chosen)
    mean, ci = t_ci([REWARD[1, s] for s in range(3)])
    assert agg["reward_mean"] == pytest.approx(mean, abs=1e-12) and agg["reward_ci95"] == pytest.approx(ci, rel=1e-9)
    dmean, dci = t_ci([DIV[1, s] for s in range(3)])
    assert agg["diversity"] == pytest.approx(dmean) and agg["diversity_ci95"] == pytest.approx(dci, rel=1e-9)
    kmean, kci = t_ci([2.0, 3.0, 4.0])
    assert agg["kl_div"] == pytest.approx(kmean) and agg["kl_div_ci95"] == pytest.approx(kci, rel=1e-9)
    assert agg["n_seeds"] == 3 and agg["seeds"] == [0, 1, 2]

    text = render_table(cfg)
    lines = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert f"{mean:.2f} ± {ci:.3f}" in lines["ELEGANT (n=3)"] and f"{kmean:.2f} ± {kci:.3f}" in lines["ELEGANT (n=3)"]
    # one run: as before, its own evaluation CI
    assert "0.56 ± 0.010" in lines["ELEGANT seed 1"] and "(n=" not in lines["ELEGANT seed 1"]
    assert "0.30 ± 0.020" in lines["Pretrained"] and lines["Pretrained"].endswith("| 0.29 |")
    # target 0.6: the kl_weight=0.01 cell (seed mean 0.51) beats 0.3 (seed mean 0.85), all three seeds
    m01, ci01 = t_ci([REWARD[0, s] for s in range(3)])
    assert f"{m01:.2f} ± {ci01:.3f}" in lines["ELEGANT matched (target 0.60) (n=3)"]
    assert "Student-t" in text
    assert "## All runs of group elegant" in text  # every seed listed


def test_exact_row_matches_brute_force():
    V, L, alpha, smoothing = 3, 3, 0.4, 0.2
    rng = np.random.default_rng(1)
    space = np.array(list(itertools.product(range(V), repeat=L)))
    train = space[rng.integers(0, len(space), 40)]  # with repeats and missing sequences
    r_hat, r_true = rng.normal(size=len(space)), rng.normal(size=len(space))
    row = exact_optimum_row(torch.from_numpy(train), torch.from_numpy(space), r_hat, r_true, alpha, smoothing)

    counts = Counter(map(tuple, train))
    p_data = np.array([(counts[tuple(x)] + smoothing) / (len(train) + smoothing * len(space)) for x in space])
    w = np.exp(r_hat / alpha) * p_data
    p = w / w.sum()

    def lev(a, b):
        d = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            prev, d[0] = d[0], i
            for j, cb in enumerate(b, 1):
                prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (ca != cb))
        return d[-1]

    div = sum(p[i] * p[j] * lev(space[i], space[j]) for i in range(len(space)) for j in range(len(space)))
    assert row["reward_mean"] == pytest.approx(float(p @ r_hat), rel=1e-9)
    assert row["reward_true_mean"] == pytest.approx(float(p @ r_true), rel=1e-9)
    assert row["kl_div"] == pytest.approx(float(np.sum(p * np.log(p / p_data))), rel=1e-9)
    assert row["diversity"] == pytest.approx(div, rel=1e-9) and row["diversity_exact"]
    assert row["n_sequences"] == V**L and row["alpha"] == alpha

    no_true = exact_optimum_row(train, space, r_hat, None, alpha, smoothing)
    assert no_true["reward_true_mean"] is None
    # alpha -> 0: all mass on the best sequence
    greedy = exact_optimum_row(train, space, r_hat, r_true, 0.0, smoothing)
    assert greedy["reward_mean"] == pytest.approx(r_hat.max()) and greedy["diversity"] == 0.0


class FakeTask:
    """The sequence-task interface exact_rows relies on (the train split)."""

    def __init__(self, length: int, vocab_size: int, n: int):
        from types import SimpleNamespace
        tokens = torch.from_numpy(np.random.default_rng(2).integers(0, vocab_size, (n, length)))
        self.train = SimpleNamespace(tokens=tokens, length=length, vocab_size=vocab_size)


def test_exact_row_in_table_is_cached(tmp_path, monkeypatch):
    from diffusion_rl import runner

    calls = []

    def fake_build_reward(cfg, dataset):
        calls.append(1)
        return lambda x: (x == 0).float().mean(-1)
    monkeypatch.setattr(runner, "build_reward", fake_build_reward)
    monkeypatch.setattr(runner, "build_true_reward", lambda cfg, dataset: lambda x: x.float().sum(-1))
    table = elegant_table(rows=[{"label": "Exact optimum", "exact_optimum": {"alpha": 0.1}, "paper": {"r̂": "0.9"}}],
                          exact_optimum_smoothing=0.01,
                          columns={"reward_mean": "r̂", "reward_true_mean": "r", "kl_div": "KL-Div", "diversity": "Div"})
    cfg = base_cfg(tmp_path, table)
    cfg.dataset = {"_target_": f"{FakeTask.__module__}.FakeTask", "length": 4, "vocab_size": 3, "n": 30}
    cfg.reward = {"name": "fake"}

    text = render_table(cfg)
    assert len(calls) == 1
    space = torch.tensor(list(itertools.product(range(3), repeat=4)))
    tokens = FakeTask(4, 3, 30).train.tokens
    want = exact_optimum_row(tokens, space, (space == 0).double().mean(-1), space.double().sum(-1), 0.1, 0.01)
    line = next(line for line in text.splitlines() if line.startswith("| Exact optimum"))
    cells = line.split(" | ")
    assert cells[1] == "0.1"  # the shown KL weight is the row's alpha
    assert cells[2:6] == [f"{want[k]:.3g}" for k in ("reward_mean", "reward_true_mean", "kl_div", "diversity")]
    assert cells[-1] == "0.9 |"
    cache = tmp_path / "report" / "elegant_fake_exact_alpha0.1.json"
    assert json.loads(cache.read_text())["metrics"]["reward_mean"] == pytest.approx(want["reward_mean"])

    assert render_table(cfg) == text and len(calls) == 1  # served from the cache
    cfg.table.exact_optimum_smoothing = 0.5  # another config: recomputed
    assert render_table(cfg) != text and len(calls) == 2


def test_read_and_aggregate_curves(tmp_path):
    elegant_runs(tmp_path / "runs", "t")
    folders = sorted((tmp_path / "runs" / "t" / "elegant").glob("method.kl_weight=0.01,*"))
    curves = [read_curves(f / "metrics.csv") for f in folders]
    assert curves[0]["train/reward"] == {9.0: REWARD[0, 0] * 9 / 20, 19.0: REWARD[0, 0] * 19 / 20}
    assert "train/diversity" not in curves[2]  # seed 2 never logged it
    agg = aggregate_curves([c["train/kl_path"] for c in curves])
    assert agg["step"].tolist() == [9.0, 19.0]
    assert agg["mean"] == pytest.approx([0.9 + 1, 1.9 + 1]) and agg["min"] == pytest.approx([0.9, 1.9])
    assert agg["max"] == pytest.approx([2.9, 3.9]) and agg["n"].tolist() == [3, 3]
    div = aggregate_curves([c.get("train/diversity", {}) for c in curves])
    assert div["mean"] == pytest.approx([3.5, 3.5]) and div["n"].tolist() == [2, 2]


def test_curves_png_linked(tmp_path):
    cfg = base_cfg(tmp_path, elegant_table(curves={
        "metrics": {"train/reward": "r̂", "train/kl_path": "path KL", "train/diversity": "Div", "train/none": "x"},
        "groups": ["pretrained", "elegant", {"group": "elegant", "where": {"method.kl_weight": 0.01}}]}))
    elegant_runs(tmp_path / "runs", cfg.table.name)
    md = write_report(cfg)
    png = tmp_path / "report" / "elegant_fake_curves.png"
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000
    assert "![curves](elegant_fake_curves.png)" in md.read_text()


@pytest.mark.parametrize("seeds,layout", [("first", "overlay"), ("pool", "panels")])
def test_histogram_figure(tmp_path, seeds, layout):
    cfg = base_cfg(tmp_path, elegant_table(figure={"kind": "histogram", "group": "elegant", "by": "method.kl_weight",
                                                   "by_label": "α", "extra_groups": ["pretrained"], "seeds": seeds,
                                                   "layout": layout}))
    elegant_runs(tmp_path / "runs", cfg.table.name)
    group_dir = tmp_path / "runs" / cfg.table.name / "elegant"
    (group_dir / "method.kl_weight=0.01,seed=0" / "rewards.npy").unlink()

    _, drawn, missing = histogram_data(cfg)
    assert [label for label, *_ in drawn] == ["pretrained", "α = 0.01", "α = 0.3"]
    assert [extra for _, extra, *_ in drawn] == [True, False, False]
    assert [r.folder for r in missing] == [group_dir / "method.kl_weight=0.01,seed=0"]
    seeds_drawn = [[r.config.seed for r in use] for *_, use in drawn]
    if seeds == "first":  # the lowest seed with rewards.npy
        assert seeds_drawn == [[0], [1], [0]]
        assert np.allclose(drawn[2][2], np.load(group_dir / f"method.kl_weight={0.1 + 0.2},seed=0" / "rewards.npy"))
    else:  # every seed's rewards concatenated
        assert seeds_drawn == [[0], [1, 2], [0, 1, 2]] and [x.size for _, _, x, _ in drawn] == [500, 1000, 1500]

    md = write_figure(cfg)
    assert (tmp_path / "report" / "elegant_fake.png").read_bytes()[:8] == PNG
    text = md.read_text()
    assert "![elegant_fake](elegant_fake.png)" in text
    rows = [line.split(" | ")[:3] for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    ticks = {"first": ["", "✓", ""], "pool": ["", "✓", "✓"]}[seeds]
    assert rows == [["| pretrained", "0", "✓"], *([["| α = 0.01", str(s), ticks[s]] for s in range(3)]),
                    *([["| α = 0.3", str(s), "✓" if seeds == "pool" or s == 0 else ""] for s in range(3)])]
    assert "0.30 ± 0.020" in text and "KL-Div" in text and "r (true)" not in text
    assert "No rewards.npy" in text and "method.kl_weight=0.01,seed=0" in text
    assert ("pooled" in text) == (seeds == "pool")


def test_shared_runs_folder_rows_report_their_own_group_settings(tmp_path):
    """Two tables share a runs folder: table A's group fixes kl_weight=0.05, table B adds
    kl_weight=0.005 runs to the same group folder. A's row (no `where`) reports only its own
    setting; a row matching two settings without `where` is an error, not a silent pick."""
    from diffusion_rl.report.experiments import group_settings, select_runs

    runs_dir = tmp_path / "runs"
    for kl, base in ((0.05, 0.4), (0.005, 0.8)):
        for seed in (0, 1, 2):
            make_run(runs_dir, "shared", "ppo", f"method.kl_weight={kl},seed={seed}",
                     {"seed": seed, "method": {"kl_weight": kl}}, {"reward_mean": base + 0.01 * seed})
    table = {"name": "a", "runs_name": "shared", "columns": {"reward_mean": "r"}, "paper_columns": [],
             "title": "t", "source": "s",
             "groups": {"ppo": {"overrides": ["method=ppo_kl", "method.kl_weight=0.05"], "sweep": {"seed": [0, 1, 2]}}},
             "rows": [{"label": "PPO", "group": "ppo"}]}
    cfg = base_cfg(tmp_path, table)
    assert group_settings(cfg, "ppo") == {"method.kl_weight": 0.05}
    runs = collect_runs(cfg, "ppo")
    assert len(runs) == 6
    chosen = select_runs(runs, cfg.table.rows[0], [], group_settings(cfg, "ppo"))
    assert sorted(r.metrics["reward_mean"] for r in chosen) == pytest.approx([0.40, 0.41, 0.42])
    with pytest.raises(ValueError, match="where"):
        select_runs(runs, cfg.table.rows[0], ["method.kl_weight"], {})
