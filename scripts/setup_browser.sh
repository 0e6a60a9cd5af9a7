#!/usr/bin/env bash
# Optional: a real headless browser for the report check (tests/test_report_html.py and
# scripts/check_report_html.py): Debian's Chromium and the playwright package that drives it through
# its executable path (playwright never downloads a browser here). Idempotent; run after setup.sh.
# CI runs it, so the browser test runs there; without it that test skips.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  fi
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! .venv/bin/python -c "import playwright" >/dev/null 2>&1; then
  .venv/bin/pip install -q -c constraints.txt "playwright==1.65.2"
fi
