#!/usr/bin/env bash
# What the dashboard's browser test needs, installed by `make test` (nobody needs to run this by hand):
# - Playwright's Python package (only the package: its own browser download is not used);
# - Debian's `chromium` at /usr/bin/chromium, installed with apt when it is missing and we are root
#   (as in CI). Elsewhere a missing chromium is reported, and the browser test skips saying why.
# Set SWARM_CHROMIUM to use another Chromium binary.
set -euo pipefail
VENV=${1:-.venv}
CHROMIUM=${SWARM_CHROMIUM:-/usr/bin/chromium}

if ! "$VENV/bin/python" -c "import playwright.sync_api" >/dev/null 2>&1; then
  echo "install_browser: installing the playwright Python package"
  "$VENV/bin/python" -m pip --disable-pip-version-check -q install "playwright>=1.45"
fi

if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: installing Debian's chromium (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >/dev/null
  if [ ! -x "$CHROMIUM" ]; then
    echo "install_browser: apt installed chromium but $CHROMIUM is missing" >&2
    exit 1
  fi
else
  echo "install_browser: $CHROMIUM is missing and this is not a root Debian shell;" \
       "run 'sudo apt-get install chromium' to enable the dashboard's browser test (it skips until then)"
fi
