"""Report features for the ELEGANT tables, on fake finished runs: run selection by recorded
overrides, seeds per cell, training-curve PNGs and reward histograms; the exact-optimum method."""

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
from diffusion_rl.report.experiments import aggregate_seeds, collect_runs, group_command, select_runs
from diffusion_rl.report.figures import histogram_data, write_figure
from diffusion_rl.report.tables import render_table, write_report

PNG = b"\x89PNG\r\n\x1a\n"
T_975_DF2 = 4.302652729749464  # Student t quantile 0.975 with 2 dof (statistical tables)


def make_run(runs_dir: Path, table: str, group: str, name: str, config: dict, metrics: dict,
             csv_rows: list[dict] | None = None, rewards: np.ndarray | None = None,
             overrides: list[str] | None = None) -> Path:
    """A finished run; it records ``overrides`` (default: its folder name, as Hydra's
    ``override_dirname`` writes it)."""
    folder = runs_dir / table / group / name
    folder.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config), folder / "config.yaml")
    recorded = [f"experiment={table}", *(name.split(",") if overrides is None else overrides)]
    (folder / "metrics.json").write_text(json.dumps({**metrics, "overrides": recorded}))
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


# ELEGANT group: kl_weight in {0.01, 0.3} x seeds 0, 1, 2; 0.3 is recorded as "0.30" (matched as a number)
WEIGHTS = [0.01, 0.3]
WRITTEN = ["0.01", "0.30"]
REWARD = {(0, 0): 0.50, (0, 1): 0.56, (0, 2): 0.47, (1, 0): 0.81, (1, 1): 0.90, (1, 2): 0.84}
DIV = {(0, 0): 4.0, (0, 1): 3.0, (0, 2): 3.5, (1, 0): 2.0, (1, 1): 2.6, (1, 2): 2.3}


def elegant_runs(runs_dir: Path, table: str) -> None:
    rng = np.random.default_rng(0)
    for (w, seed), reward in REWARD.items():
        csv_rows = [{"epoch": 0, "step": s, "train/reward": reward * s / 20, "train/kl_path": 0.1 * s + seed,
                     **({"train/diversity": DIV[w, seed]} if seed != 2 else {})} for s in (9, 19)]
        csv_rows.insert(1, {"epoch": 0, "step": 9, "train/reward": None, "train/kl_path": None, "val/x": 1.0})
        make_run(runs_dir, table, "elegant", f"method.kl_weight={WRITTEN[w]},seed={seed}",
                 {"seed": seed, "method": {"kl_weight": WEIGHTS[w]}},
                 {"reward_mean": reward, "reward_ci95": 0.01, "diversity": DIV[w, seed], "kl_div": 1.0 + seed + w,
                  "kl_div_ci95": 0.05, "method.kl_weight": WEIGHTS[w], "wall_seconds": 10},
                 csv_rows, rng.normal(reward, 0.1, 500), ["method=elegant", f"method.kl_weight={WRITTEN[w]}", f"seed={seed}"])
    make_run(runs_dir, table, "pretrained", "seed=0", {"seed": 0, "method": {"kl_weight": 0.0}},
             {"reward_mean": 0.3, "reward_ci95": 0.02, "diversity": 5.0, "kl_div": 0.0, "wall_seconds": 1},
             [{"step": 0, "train/reward": 0.3}], rng.normal(0.3, 0.1, 500), ["method=pretrained", "seed=0"])


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


def test_where_selects_by_recorded_overrides(tmp_path):
    """A row's `where` (and its group's overrides) select by what a run was launched with, as
    parsed values — not by its config.yaml, not by its folder name."""
    runs_dir = tmp_path / "runs"
    # config.yaml says 0.5 for every run: only the recorded overrides tell them apart
    for name, overrides, reward in (("a", ["method=ppo_kl", "method.kl_weight=5e-2", "seed=0"], 0.1),
                                    ("b", ["method=ppo_kl", "method.kl_weight=0.005", "seed=0"], 0.2),
                                    ("c", ["method=dpok", "method.kl_weight=0.05", "seed=0"], 0.3),
                                    ("d", ["method=ppo_kl", "seed=0"], 0.4),
                                    ("e", ["method=ppo_kl", "method.kl_weight=0.05", "seed=0", "+flag=1"], 0.5)):
        make_run(runs_dir, "t", "ppo", name, {"seed": 0, "method": {"kl_weight": 0.5}}, {"reward_mean": reward},
                 overrides=overrides)
    cfg = base_cfg(tmp_path, {"name": "t", "groups": {"ppo": {"overrides": ["method=ppo_kl"],
                                                              "sweep": {"method.kl_weight": [0.05, 0.005]}}}})
    runs = collect_runs(cfg, "ppo")

    def chosen(where):
        row = OmegaConf.create({"label": "r", "group": "ppo", "where": where})
        return sorted(r.metrics["reward_mean"] for r in select_runs(cfg, runs, row))
    assert chosen({"method.kl_weight": 0.05, "flag": 1}) == [0.5]  # "5e-2" is 0.05; run c is dpok
    assert chosen({"method.kl_weight": 0.005}) == [0.2]
    assert chosen({"method.kl_weight": 0.5}) == []  # the config value is not what selects
    assert chosen({"flag": True}) == []  # a boolean is not the number 1
    with pytest.raises(ValueError, match="where"):  # three settings of kl_weight (0.05, 0.005, none)
        chosen({})
    (runs_dir / "t" / "ppo" / "b" / "metrics.json").write_text(json.dumps({"reward_mean": 0.2}))
    with pytest.raises(ValueError, match="no overrides"):  # finished before runs recorded them
        collect_runs(cfg, "ppo")


def test_ambiguous_row_is_an_error(tmp_path):
    cfg = base_cfg(tmp_path, elegant_table())
    elegant_runs(tmp_path / "runs", cfg.table.name)
    runs = collect_runs(cfg, "elegant")
    with pytest.raises(ValueError, match="matches 2 settings of group 'elegant'"):
        select_runs(cfg, runs, OmegaConf.create({"label": "ELEGANT", "group": "elegant"}))
    # the same row with a target reward is a calibration, not an ambiguity
    row = OmegaConf.create({"label": "ELEGANT", "group": "elegant", "target_reward": 0.9})
    assert [r.config.method.kl_weight for r in select_runs(cfg, runs, row)] == [0.3] * 3


def test_seed_aggregation(tmp_path):
    cfg = base_cfg(tmp_path, elegant_table())
    elegant_runs(tmp_path / "runs", cfg.table.name)
    runs = collect_runs(cfg, "elegant")
    chosen = select_runs(cfg, runs, cfg.table.rows[1])
    assert sorted(r.config.seed for r in chosen) == [0, 1, 2]
    agg = aggregate_seeds(chosen)
    mean, ci = t_ci([REWARD[1, s] for s in range(3)])
    assert agg["reward_mean"] == pytest.approx(mean, abs=1e-12) and agg["reward_ci95"] == pytest.approx(ci, rel=1e-9)
    dmean, dci = t_ci([DIV[1, s] for s in range(3)])
    assert agg["diversity"] == pytest.approx(dmean) and agg["diversity_ci95"] == pytest.approx(dci, rel=1e-9)
    kmean, kci = t_ci([2.0, 3.0, 4.0])
    assert agg["kl_div"] == pytest.approx(kmean) and agg["kl_div_ci95"] == pytest.approx(kci, rel=1e-9)
    assert agg["n_seeds"] == 3 and agg["seeds"] == [0, 1, 2]

    text, _ = render_table(cfg)
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


def test_claims_are_checked_against_the_rows_intervals(tmp_path):
    claims = [
        {"text": "ELEGANT above pretrained", "left": "ELEGANT", "op": ">", "right": "Pretrained", "metric": "reward_mean"},
        {"text": "ELEGANT below pretrained", "left": "ELEGANT", "op": "<", "right": "Pretrained", "metric": "reward_mean"},
        # seed 1 at 0.56 ± 0.01 against the 0.01-cell mean 0.51 ± (t CI over seeds, ~0.11): within the intervals
        {"text": "seed 1 above the matched cell", "left": "ELEGANT seed 1", "op": ">",
         "right": "ELEGANT matched", "metric": "reward_mean"},
        {"text": "diversity above 1", "left": "ELEGANT", "op": ">", "right": 1.0, "metric": "diversity"},
    ]
    cfg = base_cfg(tmp_path, elegant_table(claims=claims))
    elegant_runs(tmp_path / "runs", cfg.table.name)
    text, records = render_table(cfg)
    assert [r["verdict"] for r in records] == ["holds", "fails", "not settled", "holds"]
    assert "## The paper's claims" in text and "| ELEGANT above pretrained |" in text
    bad = base_cfg(tmp_path, elegant_table(claims=[{**claims[0], "right": "No such row"}]))
    with pytest.raises(ValueError, match="No such row"):
        render_table(bad)


class TinyTask:
    """A sequence task over all V^L sequences (V = L = 3) with lookup rewards: the interface the
    exact-optimum method reads (train / full rows, encode)."""

    def __init__(self, train, full):
        from types import SimpleNamespace
        self.length, self.vocab_size = L_TINY, V_TINY
        self.train, self.full = SimpleNamespace(tokens=train), SimpleNamespace(tokens=full)

    def encode(self, tokens):
        return torch.nn.functional.one_hot(tokens, self.vocab_size).float()


V_TINY, L_TINY = 3, 3


def lookup(table: np.ndarray):
    powers = torch.tensor([V_TINY ** (L_TINY - 1 - i) for i in range(L_TINY)])
    return lambda tokens: torch.from_numpy(table)[(tokens.long().cpu() * powers).sum(-1)]


def tiny_exact_optimum(alpha: float, p_data: str = "train", smoothing: float = 0.2):
    from diffusion_rl.backbones.mlp import MLPBackbone
    from diffusion_rl.methods.exact_optimum import ExactOptimum

    rng = np.random.default_rng(1)
    space = np.array(list(itertools.product(range(V_TINY), repeat=L_TINY)))
    train = space[rng.integers(0, len(space), 40)]  # with repeats and missing sequences
    full = space[rng.integers(0, len(space), 60)]
    r_hat, r_true = rng.normal(size=len(space)), rng.normal(size=len(space))
    task = TinyTask(torch.from_numpy(train), torch.from_numpy(full))
    method = ExactOptimum(MLPBackbone(dim=2), None, lookup(r_hat), dataset=task, true_reward=lookup(r_true),
                          kl_weight=alpha, p_data=p_data,
                          smoothing=smoothing, iterations=5, batch_size=4, lr=1e-3, reward_weight=2.0)
    rows = train if p_data == "train" else full
    counts = Counter(map(tuple, rows))
    p_data_ = np.array([(counts[tuple(x)] + smoothing) / (len(rows) + smoothing * len(space)) for x in space])
    with np.errstate(divide="ignore", invalid="ignore"):  # alpha = 0: the brute force is not used
        w = np.exp(r_hat / alpha) * p_data_
        return method, space, r_hat, r_true, p_data_, w / w.sum()


@pytest.mark.parametrize("p_data", ["train", "full"])
def test_exact_optimum_method_matches_brute_force(p_data):
    """p_r ∝ exp(r̂/α) p_data by brute force: the method's exact expectations agree to float
    precision, and its samples (what the shared evaluation scores) within Monte-Carlo error."""
    alpha = 0.4
    method, space, r_hat, r_true, p_data_, p = tiny_exact_optimum(alpha, p_data)
    assert method.iterations == 0 and not method.fine_tunes  # a run, not a fine-tuning
    exact = method.extra_metrics()
    kl = float(np.sum(p * np.log(p / p_data_)))
    assert exact["exact_reward"] == pytest.approx(float(p @ r_hat), rel=1e-9)
    assert exact["exact_reward_true"] == pytest.approx(float(p @ r_true), rel=1e-9)
    assert exact["exact_kl_div"] == pytest.approx(kl, rel=1e-9)
    assert exact["exact_entropy"] == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-9)

    n = 20000
    gen = method.generate(n, torch.Generator().manual_seed(0))
    assert gen.states.shape == (n, L_TINY, V_TINY) and torch.equal(gen.states.sum(-1), torch.ones(n, L_TINY))
    tokens = gen.states.argmax(-1)
    rewards = lookup(r_hat)(tokens).numpy()
    kl_terms = gen.kl_terms["kl_exact"].numpy()
    assert set(gen.kl_terms) == {"kl_exact"} and kl_terms.shape == (n,)
    # 4 standard errors: fails with probability ~6e-5 for a correct sampler
    assert abs(rewards.mean() - p @ r_hat) < 4 * rewards.std() / math.sqrt(n)
    assert abs(kl_terms.mean() - kl) < 4 * kl_terms.std() / math.sqrt(n)
    freq = np.bincount((tokens.numpy() * V_TINY ** np.arange(L_TINY - 1, -1, -1)).sum(-1), minlength=len(space)) / n
    assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-12)


def test_exact_optimum_method_limits():
    method, space, r_hat, *_ = tiny_exact_optimum(0.0)  # alpha -> 0: every draw is the best sequence
    tokens = method.generate(50, torch.Generator().manual_seed(0)).states.argmax(-1)
    assert (tokens == torch.from_numpy(space[np.argmax(r_hat)])).all()
    assert method.extra_metrics()["exact_reward"] == pytest.approx(r_hat.max())
    with pytest.raises(ValueError, match="p_data"):
        tiny_exact_optimum(0.1, p_data="both")


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
        assert np.allclose(drawn[2][2], np.load(group_dir / "method.kl_weight=0.30,seed=0" / "rewards.npy"))
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
    runs_dir = tmp_path / "runs"
    for kl, base in ((0.05, 0.4), (0.005, 0.8)):
        for seed in (0, 1, 2):
            make_run(runs_dir, "shared", "ppo", f"method.kl_weight={kl},seed={seed}",
                     {"seed": seed, "method": {"kl_weight": kl}}, {"reward_mean": base + 0.01 * seed},
                     overrides=["method=ppo_kl", f"method.kl_weight={kl}", f"seed={seed}"])
    table = {"name": "a", "runs_name": "shared", "columns": {"reward_mean": "r"}, "paper_columns": [],
             "title": "t", "source": "s",
             "groups": {"ppo": {"overrides": ["method=ppo_kl", "method.kl_weight=0.05"], "sweep": {"seed": [0, 1, 2]}}},
             "rows": [{"label": "PPO", "group": "ppo"}]}
    cfg = base_cfg(tmp_path, table)
    runs = collect_runs(cfg, "ppo")
    assert len(runs) == 6
    chosen = select_runs(cfg, runs, cfg.table.rows[0])
    assert sorted(r.metrics["reward_mean"] for r in chosen) == pytest.approx([0.40, 0.41, 0.42])
    cfg.table.groups.ppo = {"overrides": ["method=ppo_kl"], "sweep": {"method.kl_weight": [0.05, 0.005]}}
    with pytest.raises(ValueError, match="where"):
        select_runs(cfg, runs, cfg.table.rows[0])
