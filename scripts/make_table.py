"""Regenerate one paper table or figure: ``python scripts/make_table.py <experiment> [override ...]``.

Runs every group of ``conf/experiment/<experiment>.yaml`` as a Hydra multirun (finished
runs of the same config are reused; a failing job stops nothing), then writes ``outputs/report/<experiment>.md`` (and PNGs for figures)
and prints the report; exits 1 when a job failed. ``--report-only`` skips the runs.
"""

import argparse
import sys

from hydra.errors import HydraException

from diffusion_rl.report.experiments import load_experiment, run_groups
from diffusion_rl.report.figures import write_figure
from diffusion_rl.report.tables import write_report
from diffusion_rl.validation import ConfigError, check_paths

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("experiment")
parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run, e.g. paths.runs_dir=…")
parser.add_argument("--report-only", action="store_true")
args = parser.parse_intermixed_args()  # options may sit between the overrides

try:
    cfg = load_experiment(args.experiment, args.overrides)
except HydraException as err:  # a bad override or an unknown experiment: one line, before any run
    print(f"error: {' '.join([args.experiment, *args.overrides])}: {str(err).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
if not args.report_only:
    try:  # a folder every job would fail on (weights not given: paths.sd_model): one line, before any run
        check_paths(cfg)
    except ConfigError as err:
        print(f"error: {args.experiment}: {err}", file=sys.stderr)
        sys.exit(2)
failed = [] if args.report_only else run_groups(cfg, args.overrides)
# the report is written whatever failed: it marks and lists the cells it lacks
path = write_figure(cfg) if cfg.table.get("figure") else write_report(cfg)
print(path.read_text() if path.suffix == ".md" else f"wrote {path}")
if failed:
    sys.exit(f"{cfg.table.name}: jobs failed in group(s) {', '.join(failed)} (errors above); "
             f"the report {path} lists the missing cells")
