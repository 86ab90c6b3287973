#!/usr/bin/env bash
# Sets up .venv (and, as root, Chromium for the HTML report test) if needed, then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# tests/test_html_report.py renders pelt report's page in headless Chromium (the Debian package chromium).
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "pelt: installing chromium with apt-get (for tests/test_html_report.py)" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 ||
    echo "pelt: apt-get install chromium failed; tests/test_html_report.py will say so" >&2
fi
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
