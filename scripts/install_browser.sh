#!/usr/bin/env bash
# Debian's chromium for the dashboard's Playwright test (tests/test_dashboard.py).
# Idempotent: does nothing when /usr/bin/chromium is already there. Needs root (or sudo) and apt.
# Where it cannot install one, it warns and succeeds (the test is then skipped), except under
# BLIP3O_RL_REQUIRE_BROWSER=1 (CI, .ci/run), where that is an error.
set -euo pipefail
cannot_install() {
  echo "install_browser: $1; install chromium yourself (the browser test is skipped)" >&2
  [[ "${BLIP3O_RL_REQUIRE_BROWSER:-0}" != 1 ]] || { echo "install_browser: BLIP3O_RL_REQUIRE_BROWSER=1: failing" >&2; exit 1; }
  exit 0
}
if [[ -x /usr/bin/chromium ]]; then
  echo "install_browser: chromium is already installed"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  cannot_install "apt-get not found"
fi
SUDO=""
if [[ "$(id -u)" != 0 ]]; then
  if ! command -v sudo >/dev/null; then
    cannot_install "not root and no sudo"
  fi
  SUDO="sudo"
fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium
echo "install_browser: installed $(/usr/bin/chromium --version)"
