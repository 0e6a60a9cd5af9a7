"""Open a report.html in a real headless browser and check it: it renders, every image loads, and the
page makes no request outside itself (everything is embedded).

    python scripts/check_report_html.py results/report.html [--screenshot shot.png]

Needs Debian's Chromium (`apt-get install chromium`) and the `playwright` Python package (driving that
Chromium through `executable_path`; no browser download). Exit code 0 when every check passes, 1
otherwise, 2 when a tool is missing. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def check(page_path: Path, screenshot: Path | None = None) -> dict:
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or "/usr/bin/chromium"
    url = page_path.resolve().as_uri()
    requests, failed, console_errors = [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("request", lambda r: requests.append(r.url))
        page.on("requestfailed", lambda r: failed.append(r.url))
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        page.goto(url, wait_until="load")
        images = page.evaluate("""() => Array.from(document.images).map(i => ({
            alt: i.alt, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}))""")
        tables = page.evaluate("() => document.querySelectorAll('table').length")
        headings = page.evaluate("() => Array.from(document.querySelectorAll('h1,h2')).map(h => h.textContent)")
        if screenshot:
            page.screenshot(path=str(screenshot), full_page=False)
        browser.close()
    external = [u for u in requests if not (u == url or u.startswith("data:"))]
    broken = [i["alt"] for i in images if not i["complete"] or i["width"] == 0]
    return {"page": str(page_path), "images": len(images), "broken_images": broken, "tables": tables,
            "headings": len(headings), "external_requests": external, "failed_requests": failed,
            "console_errors": console_errors,
            "ok": bool(images) and not broken and not external and not failed and tables > 0}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("page")
    ap.add_argument("--screenshot", default=None)
    args = ap.parse_args()
    try:
        import playwright  # noqa: F401
    except ImportError:
        print("error: the playwright package is missing; pip install playwright (it drives Debian's chromium)")
        return 2
    if not (shutil.which("chromium") or Path("/usr/bin/chromium").exists()):
        print("error: chromium is missing; apt-get install chromium")
        return 2
    res = check(Path(args.page), Path(args.screenshot) if args.screenshot else None)
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
