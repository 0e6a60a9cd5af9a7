"""The report opens in a real headless browser (Debian's Chromium driven by playwright): it renders,
every image loads, no request leaves the page. Skips where Chromium or playwright is missing (CI has
neither; run `python scripts/check_report_html.py results/report.html` where they are)."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(shutil.which("chromium") is None or importlib.util.find_spec("playwright") is None,
                    reason="needs Debian's chromium and the playwright package")
def test_report_html_in_a_browser(tmp_path):
    from bnadapt.report import Block, to_html

    png = tmp_path / "f.png"
    from bnadapt.viz import _figure, save_png

    fig = _figure(2, 2)
    fig.add_subplot(1, 1, 1).plot([0, 1], [0, 1])
    save_png(fig, png)
    page = tmp_path / "r.html"
    page.write_text(to_html([Block("h1", "t"), Block("table", header=["a", "b"], rows=[["x", "1.0"]]),
                             Block("figure", text="f", path=png)]))
    proc = subprocess.run([sys.executable, str(HERE.parent / "scripts" / "check_report_html.py"), str(page)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
