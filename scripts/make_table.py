"""Regenerate one paper table or figure: ``python scripts/make_table.py <experiment> [override ...]``.

Runs every group of ``conf/experiment/<experiment>.yaml`` as a Hydra multirun (finished
runs are reused), then writes ``outputs/report/<experiment>.md`` (and PNGs for figures)
and prints the report. ``--report-only`` skips the runs.
"""

import argparse

from diffusion_rl.report.experiments import load_experiment, run_groups
from diffusion_rl.report.figures import write_figure
from diffusion_rl.report.tables import write_report

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("experiment")
parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run, e.g. paths.runs_dir=…")
parser.add_argument("--report-only", action="store_true")
args = parser.parse_intermixed_args()  # options may sit between the overrides

cfg = load_experiment(args.experiment, args.overrides)
if not args.report_only:
    run_groups(cfg, args.overrides)
path = write_figure(cfg) if cfg.table.get("figure") else write_report(cfg)
print(path.read_text() if path.suffix == ".md" else f"wrote {path}")
