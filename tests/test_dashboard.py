"""The dashboards (TensorBoard's HPARAMS tab, W&B) receive each run's config and final metrics,
W&B stays offline unless asked, and ``make report``'s ``index.html`` shows every report."""

from __future__ import annotations

import json
import re
import socket
import struct
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from omegaconf import OmegaConf

from diffusion_rl.dashboard import FINAL_PREFIX, build_loggers, flat_config, record_final

CONFIG = {
    "seed": 3,
    "report_keys": ["method.kl_weight"],
    "method": {"_target_": "diffusion_rl.methods.dpok.DPOK", "kl_weight": 0.05, "iterations": 4, "lr": 1e-3,
               "milestones": [1, 2], "clip": None, "use_ema": False, "weight_ref": "${method.kl_weight}"},
    "sampler": {"num_steps": 10},
    "table": {"name": "qlearning_table3", "rows": [{"label": "DPOK", "paper": {"KL": 0.2}}]},
}
METRICS = {"reward_mean": 0.71, "reward_ci95": 0.01, "kl_data": 0.2, "diverged": float("nan"), "n_seeds": 1,
           "overrides": ["method.kl_weight=0.05"], "method.kl_weight": 0.05}
FINALS = {f"{FINAL_PREFIX}{k}": v for k, v in METRICS.items() if k in ("reward_mean", "reward_ci95", "kl_data", "n_seeds")}


def config(loggers: dict):
    return OmegaConf.create({**CONFIG, "logger": loggers})


def test_flat_config_keeps_dotted_scalars_only():
    flat = flat_config(config({}))
    assert flat["method.kl_weight"] == 0.05 and flat["seed"] == 3 and flat["method.use_ema"] is False
    assert flat["method.weight_ref"] == 0.05  # resolved
    assert flat["table.name"] == "qlearning_table3"  # the report block keeps only its name
    assert not any(k.startswith("table.rows") or k.startswith("report_keys") for k in flat)
    assert "method.milestones" not in flat and "method.clip" not in flat  # a list, a null
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


# --- TensorBoard ------------------------------------------------------------------------------

def hparams_sessions(logdir: Path) -> tuple[list, list, object]:
    """(session_start_info messages, experiment messages, the accumulator) of a TensorBoard run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    sessions, experiments = [], []
    for content in acc.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            sessions.append(data.session_start_info)
        if data.HasField("experiment"):
            experiments.append(data.experiment)
    return sessions, experiments, acc


def test_tensorboard_hparams_hold_config_and_final_metrics(tmp_path):
    spec = {"_target_": "lightning.pytorch.loggers.TensorBoardLogger", "name": "tb", "version": "",
            "default_hp_metric": False}
    cfg = config({"tensorboard": spec})
    loggers = build_loggers(cfg, tmp_path)
    loggers[0].log_hyperparams({})  # what the trainer does at the start of a fit: must add no session
    loggers[0].log_metrics({"train/reward": 0.5}, step=1)
    record_final(loggers, cfg, METRICS)

    sessions, experiments, acc = hparams_sessions(tmp_path / "tb")
    assert len(sessions) == 1, "one hparams session per run"
    hparams = sessions[0].hparams
    assert hparams["method.kl_weight"].number_value == pytest.approx(0.05)
    assert hparams["seed"].number_value == 3
    assert hparams["method._target_"].string_value == "diffusion_rl.methods.dpok.DPOK"
    assert hparams["table.name"].string_value == "qlearning_table3"
    assert "table.rows" not in hparams
    # the HPARAMS tab's metric columns, and their values: the final metrics at the last step
    assert {m.name.tag for m in experiments[0].metric_infos} == set(FINALS)
    for tag, value in FINALS.items():
        (event,) = acc.Scalars(tag)
        assert event.value == pytest.approx(value) and event.step == CONFIG["method"]["iterations"]
    assert f"{FINAL_PREFIX}diverged" not in acc.Tags()["scalars"]  # not finite
    assert f"{FINAL_PREFIX}method.kl_weight" not in acc.Tags()["scalars"]  # a report key: config
    assert acc.Scalars("train/reward")[0].value == pytest.approx(0.5)  # the curve is untouched


def test_record_final_leaves_the_csv_curves_alone(tmp_path):
    cfg = config({"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "name": "", "version": ""}})
    loggers = build_loggers(cfg, tmp_path)
    loggers[0].log_metrics({"train/reward": 0.5}, step=1)
    loggers[0].save()
    before = (tmp_path / "metrics.csv").read_text()
    record_final(loggers, cfg, METRICS)
    loggers[0].save()
    assert (tmp_path / "metrics.csv").read_text() == before


# --- W&B ---------------------------------------------------------------------------------------

WANDB_SPEC = {"_target_": "lightning.pytorch.loggers.WandbLogger", "project": "diffusion_rl",
              "group": "${oc.select:table.name,null}", "job_type": None, "name": None}


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B in offline mode with every folder it writes under ``tmp_path`` (never the home
    folder), and no credentials."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # restored afterwards (Lightning rewrites it)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path / "run"


def wandb_records(path: Path):
    """The protobuf records of an offline run's ``run-<id>.wandb``: W&B's transaction log, the
    LevelDB log layout (a 7-byte header ``:W&B`` + magic + version, then 32 KiB blocks of
    chunks, each ``crc32 u32 | length u16 | type u8`` then its bytes; type 1 = a whole
    record, 2/3/4 = its first / middle / last piece)."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", f"{path} is no W&B transaction log"
    pos, pieces = header, b""
    while pos + header <= len(data):
        room = block - pos % block
        if room < header:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if length == 0 and kind == 0:  # zero padding up to the block end
            pos += room
            continue
        pieces += data[pos + header:pos + header + length]
        pos += header + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record
            pieces = b""


def offline_run(run_dir: Path) -> dict:
    """What an offline run recorded: its run record, config and summary items."""
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    out = {"run": None, "config": {}, "summary": {}}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
            out["config"].update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind in ("config", "summary"):
            for item in getattr(record, kind).update:
                key = item.key or "/".join(item.nested_key)
                out[kind][key] = json.loads(item.value_json)
    return out


def test_wandb_offline_run_holds_config_summary_and_group(wandb_offline):
    cfg = config({"wandb": WANDB_SPEC})
    loggers = build_loggers(cfg, wandb_offline)
    assert loggers[0]._offline
    loggers[0].log_metrics({"train/reward": 0.5}, step=1)
    record_final(loggers, cfg, METRICS)

    run = offline_run(wandb_offline)
    assert run["run"].run_group == "qlearning_table3"  # the table's runs side by side
    assert run["run"].display_name == wandb_offline.name  # named after its folder
    config_values = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in run["config"].items()}
    assert config_values["method.kl_weight"] == pytest.approx(0.05) and config_values["seed"] == 3
    assert config_values["table.name"] == "qlearning_table3"
    for key, value in FINALS.items():
        assert run["summary"][key] == pytest.approx(value), key
    assert f"{FINAL_PREFIX}diverged" not in run["summary"]


def test_wandb_disabled_mode_builds_no_wandb_logger(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert build_loggers(config({"wandb": WANDB_SPEC}), tmp_path) == []


def test_wandb_offline_never_opens_a_network_connection(wandb_offline, monkeypatch):
    """Building, logging to and finishing an offline W&B run connects to nothing but local
    sockets: the Python client talks to its own ``wandb-core`` process over a Unix socket."""
    attempts = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guard(real):
        def connect(self, address):
            if self.family != socket.AF_UNIX:
                attempts.append(address)
                raise OSError(f"test_dashboard: network connection to {address!r} attempted")
            return real(self, address)
        return connect

    monkeypatch.setattr(socket.socket, "connect", guard(real_connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guard(real_connect_ex))
    cfg = config({"wandb": WANDB_SPEC})
    loggers = build_loggers(cfg, wandb_offline)
    loggers[0].log_hyperparams({"extra": 1})
    loggers[0].log_metrics({"train/reward": 0.5, "train/kl": 0.1}, step=1)
    record_final(loggers, cfg, METRICS)
    assert attempts == []
    assert offline_run(wandb_offline)["summary"][f"{FINAL_PREFIX}reward_mean"] == pytest.approx(0.71)


# --- make report: index.html -------------------------------------------------------------------

class Links(HTMLParser):
    """Every ``href`` and ``src`` of a page."""

    def __init__(self):
        super().__init__()
        self.targets: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.targets += [value for name, value in attrs if name in ("href", "src") and value]


def fake_reports(root: Path) -> tuple[Path, Path]:
    """A report folder with two tables (one with claims, curves and a figure) and a figure page,
    and the runs folder their links lead to."""
    report, runs = root / "report", root / "runs"
    report.mkdir(parents=True)
    png = bytes.fromhex("89504e470d0a1a0a")  # a PNG signature is all a link check needs
    (report / "qlearning_table3.md").write_text(
        "# q-learning Table 3 — Swiss roll\n\nPaper: Gao et al. (2024), Table 3\n\n"
        "| Row | Reward (ours) | Reward (paper) |\n|---|---|---|\n"
        "| DPOK (n=3) | 0.68 ± 0.053 | 0.70 ± 0.004 |\n| q-Learning <b> | 0.79 ± 0.025 | 0.80 |\n\n"
        "## The paper's claims\n\n| claim | left | right | verdict |\n|---|---|---|---|\n"
        "| q below DPOK | 0.1 | 0.2 | **holds** |\n| DDPO over-optimises | 1 | 2 | **not settled** |\n\n"
        "![curves](qlearning_table3_curves.png)\n\n## Notes\n\nBudget: `300` iterations, **3** seeds.\n")
    (report / "qlearning_table3.claims.json").write_text(json.dumps([
        {"text": "q below DPOK", "left": [0.1, 0.01], "right": [0.2, 0.02], "verdict": "holds"},
        {"text": "DDPO over-optimises", "left": [1.0, 0.5], "right": None, "verdict": "not run"}]))
    (report / "qlearning_table3_curves.png").write_bytes(png)
    (report / "qlearning_table4.md").write_text("# Table 4\n\n| Row | Reward (ours) |\n|---|---|\n| A | — |\n")
    (report / "qlearning_table4.claims.json").write_text("[]")
    (report / "qlearning_table4.png").write_bytes(png)  # a PNG the markdown does not show
    (report / "qlearning_fig1.md").write_text("# Figure 1\n\n![qlearning_fig1](qlearning_fig1.png)\n\n"
                                              "![gone](missing.png)\n")
    (report / "qlearning_fig1.png").write_bytes(png)
    (report / "elegant_lr_sweep.md").write_text("# not a table of the Makefile\n")
    for folder in ("qlearning_table3/dpok/method.reward_weight=1.0,seed=0", "qlearning_table3/dpok/seed=1",
                   "qlearning_table3/pretrained/seed=0"):
        (runs / folder).mkdir(parents=True)
        (runs / folder / "metrics.json").write_text("{}")
    return report, runs


@pytest.fixture
def index(tmp_path):
    from diffusion_rl.report.html import write_index

    report, runs = fake_reports(tmp_path)
    groups = {"qlearning_table3": {"dpok": runs / "qlearning_table3" / "dpok",
                                   "pretrained": runs / "qlearning_table3" / "pretrained",
                                   "ddpo": runs / "qlearning_table3" / "ddpo"},  # never run: no link
              "qlearning_table4": {"dpok": runs / "qlearning_table4" / "dpok"}}
    tables = ["qlearning_table3", "qlearning_table4", "qlearning_table5", "qlearning_fig1"]
    path = write_index(report, tables, groups)
    return path, path.read_text()


def test_index_lists_every_present_report(index):
    path, page = index
    assert path.name == "index.html"
    for name in ("qlearning_table3", "qlearning_table4", "qlearning_fig1"):
        assert f'id="{name}"' in page
        assert f'href="#{name}"' in page
    assert 'id="qlearning_table5"' not in page and "qlearning_table5" in page  # listed as not built
    assert "elegant_lr_sweep" not in page  # only the Makefile's TABLES
    assert re.search(r'<th class="paper">Reward \(paper\)</th>', page)  # ours beside the paper's
    assert re.search(r'<td class="ours num">0.68 ± 0.053</td>', page)
    assert "q-Learning &lt;b&gt;" in page  # text is escaped
    assert "<code>300</code>" in page and "<strong>3</strong>" in page
    assert "<script" not in page


def test_index_shows_claim_verdicts(index):
    _, page = index
    assert re.search(r'class="verdict holds"[^>]*>holds<', page)
    assert re.search(r'class="verdict not-run"[^>]*>not run<', page)
    assert "q below DPOK" in page and "0.1 ± 0.01" in page
    assert page.count("The paper's claims") == 1  # from claims.json, not twice


def test_index_links_resolve_to_existing_files(index):
    path, page = index
    parser = Links()
    parser.feed(page)
    files = [t for t in parser.targets if not t.startswith("#")]
    assert any(t.endswith("qlearning_table3_curves.png") for t in files)
    assert any(t.endswith("qlearning_table4.png") for t in files)  # shown although the .md has no link
    assert any("method.reward_weight%3D1.0%2Cseed%3D0" in t or "method.reward_weight=1.0,seed=0" in t
               for t in files)
    for target in files:
        parts = urlsplit(target)
        assert not parts.scheme and not parts.netloc, f"not a relative link: {target}"
        assert (path.parent / unquote(parts.path)).exists(), f"broken link: {target}"
    assert "missing.png" in page and 'src="missing.png"' not in page  # named, not a broken image
    assert not any("ddpo" in t for t in files)


def test_write_index_with_no_reports(tmp_path):
    from diffusion_rl.report.html import write_index

    page = write_index(tmp_path / "report", ["qlearning_table3"], {}).read_text()
    assert "No report has been built yet" in page and "<code>qlearning_table3</code>" in page


# --- the runner --------------------------------------------------------------------------------

def test_a_run_gives_tensorboard_its_config_and_the_numbers_of_its_metrics_json(tmp_path, swiss_cache):
    """End to end: the runner calls record_final with the numbers it writes to metrics.json."""
    from conftest import describe, path_overrides, run_cli

    run_dir = tmp_path / "run"
    proc = run_cli(["method=dpok", "debug=smoke", "logger=default", "logger.wandb=null",
                    f"hydra.run.dir={run_dir}", *path_overrides(tmp_path, swiss_cache)])
    assert proc.returncode == 0, describe(proc)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    sessions, _, acc = hparams_sessions(run_dir / "tb")
    assert len(sessions) == 1
    assert sessions[0].hparams["method._target_"].string_value == "diffusion_rl.methods.dpok.DPOK"
    (event,) = acc.Scalars(f"{FINAL_PREFIX}reward_mean")
    assert event.value == pytest.approx(metrics["reward_mean"], rel=1e-6)
    assert acc.Scalars("train/reward"), "the training curves are there too"
