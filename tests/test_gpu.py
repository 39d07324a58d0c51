"""Every compatible method x dataset pair, end to end under ``debug=smoke`` on CUDA.

Marked ``gpu`` and skipped without a GPU (CI has none): run on a GPU machine with
``pytest -m gpu tests/test_gpu.py``. It is the check that the project's randomness rule
(chain noise on the device, data draws on the CPU) and the evaluation on the trainer's
device hold for every method: on the CPU both kinds of draw would silently work.
"""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import CONF_DIR, describe, path_overrides, run_cli

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DATASETS = sorted(p.stem for p in (CONF_DIR / "dataset").glob("*.yaml"))
METHODS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml") if not p.stem.startswith("_"))


def compatible(dataset: str, method: str) -> bool:
    """The CLI's own pre-check (capability flags) decides which pairs are meant to run."""
    from diffusion_rl.validation import ConfigError, check_compatibility

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("config", overrides=[f"dataset={dataset}", f"method={method}", "debug=smoke"])
    try:
        check_compatibility(cfg)
    except ConfigError:
        return False
    return True


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dataset", DATASETS)
def test_smoke_on_cuda(dataset, method, tmp_path):
    if not compatible(dataset, method):
        pytest.skip(f"{method} on {dataset} is rejected by validation")
    proc = run_cli([f"dataset={dataset}", f"method={method}", "debug=smoke", "trainer=gpu",
                    f"hydra.run.dir={tmp_path / 'run'}", *path_overrides(tmp_path)])
    assert proc.returncode == 0, describe(proc)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n_samples"] > 0
