#!/usr/bin/env bash
# Debian's chromium for the dashboard's Playwright test (tests/test_dashboard.py).
# Idempotent: does nothing when /usr/bin/chromium is already there. Needs root (or sudo) and apt.
set -euo pipefail
if [[ -x /usr/bin/chromium ]]; then
  echo "install_browser: chromium is already installed"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install_browser: apt-get not found; install chromium yourself (the browser test is skipped)" >&2
  exit 0
fi
SUDO=""
if [[ "$(id -u)" != 0 ]]; then
  if ! command -v sudo >/dev/null; then
    echo "install_browser: not root and no sudo; install chromium yourself (the browser test is skipped)" >&2
    exit 0
  fi
  SUDO="sudo"
fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium
echo "install_browser: installed $(/usr/bin/chromium --version)"
