"""The README's results section is generated from the reports (scripts/readme_results.py)."""

from __future__ import annotations

import importlib.util

from conftest import REPO_ROOT


def load_script():
    spec = importlib.util.spec_from_file_location("readme_results", REPO_ROOT / "scripts" / "readme_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_section_comes_from_the_reports(tmp_path):
    script = load_script()
    assert "elegant_table3" in script.tables() and "qlearning_table4" in script.tables()
    (tmp_path / "elegant_table3.md").write_text(
        "# ELEGANT Table 3 — fake\n\nPaper: x\n\n| Row | r |\n|---|---|\n| NO KL | 0.53 ± 0.010 |\n\n"
        "## The paper's claims\n\n| claim | left | right | verdict |\n|---|---|---|---|\n| c | 1 | 2 | **fails** |\n\n"
        "## All runs of group nokl\n\n| seed | r |\n|---|---|\n| 0 | 0.5 |\n")
    (tmp_path / "qlearning_fig1.png").write_bytes(b"png")
    body = script.render(tmp_path)
    assert "#### ELEGANT Table 3 — fake" in body and "| NO KL | 0.53 ± 0.010 |" in body
    assert "| c | 1 | 2 | **fails** |" in body
    assert "| 0 | 0.5 |" not in body  # only the main table and the claims, not the run listings
    assert "outputs/report/qlearning_fig1.png" in body
    assert "Not run on this checkout:" in body and "qlearning_table3" in body


def test_the_readme_has_the_markers():
    text = (REPO_ROOT / "README.md").read_text()
    script = load_script()
    assert text.count(script.BEGIN) == 1 and text.count(script.END) == 1


def test_a_table_without_a_report_keeps_its_previous_section_marked(tmp_path):
    script = load_script()
    earlier = script.render(tmp_path)  # nothing yet: everything "not run"
    (tmp_path / "elegant_table3.md").write_text("# ELEGANT Table 3 — fake\n\n| Row | r |\n|---|---|\n| X | 1 |\n")
    earlier = script.render(tmp_path)
    (tmp_path / "elegant_table3.md").unlink()
    body = script.render(tmp_path, script.previous_sections(earlier))
    assert "| X | 1 |" in body and script.KEPT_PREFIX in body
    again = script.render(tmp_path, script.previous_sections(body))  # the mark is not repeated
    assert again.count(script.KEPT_PREFIX) == 1
    assert again == body, "a kept section is the same at every generation (no blank line added)"
    assert "elegant_table3" not in body.split("Not run on this checkout:")[-1]
