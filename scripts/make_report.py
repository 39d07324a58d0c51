"""Write ``outputs/report/index.html`` from the reports there: ``python scripts/make_report.py [override ...]``.

Every table of the Makefile's ``TABLES`` whose ``<name>.md`` exists, in that order, on one
page (``src/diffusion_rl/report/html.py``), with links to its run folders. Nothing is run or
recomputed: ``make report`` rebuilds the markdown reports first. Overrides (e.g.
``paths.runs_dir=…``) are those a table was made with, so the links find its runs.
"""

import argparse
import re
from pathlib import Path

from diffusion_rl.report.experiments import active_groups, load_experiment, runs_folder
from diffusion_rl.report.html import write_index

ROOT = Path(__file__).resolve().parents[1]


def makefile_tables() -> list[str]:
    """The Makefile's ``TABLES`` (continued lines included): the tables ``make all`` builds."""
    text = (ROOT / "Makefile").read_text()
    block = re.search(r"^TABLES := (.*?)(?<!\\)\n", text, re.S | re.M).group(1)
    return block.replace("\\", " ").split()


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("overrides", nargs="*", help="Hydra overrides the tables were made with, e.g. paths.runs_dir=…")
args = parser.parse_args()

tables = makefile_tables()
report_dir = Path(load_experiment(tables[0], args.overrides).paths.report_dir)
groups = {}
for name in tables:
    if (report_dir / f"{name}.md").exists():  # only a present report needs its runs' folders
        cfg = load_experiment(name, args.overrides)
        groups[name] = {group: runs_folder(cfg) / group for group in active_groups(cfg)}
print(f"wrote {write_index(report_dir, tables, groups)}")
