# shellcheck shell=bash
# A real browser for the dashboard test, sourced by scripts/test (set -euo pipefail is on).
#
# Installs Debian's chromium when it is missing (as root, through apt), then exports its path as
# COMFYFLEET_TEST_CHROMIUM for Playwright's executable_path. Playwright's own browser downloads are never
# used. Without root and without chromium the browser tests skip (they fail under CI=true).

browser_dir="${run_dir:?}/browser"
mkdir -p "$browser_dir"

_cf_find_chromium() {
  local candidate
  for candidate in chromium chromium-browser; do
    if command -v "$candidate" >/dev/null 2>&1; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

if ! _cf_find_chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[browser.sh] installing chromium" >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends chromium >"$browser_dir/apt.log" 2>&1; then
    # A fresh machine has no package lists yet.
    apt-get update -qq >>"$browser_dir/apt.log" 2>&1
    apt-get install -y -qq --no-install-recommends chromium >>"$browser_dir/apt.log" 2>&1 \
      || { echo "[browser.sh] installing chromium failed; see $browser_dir/apt.log" >&2; tail -n 20 "$browser_dir/apt.log" >&2; }
  fi
fi

if _cf_chromium_path=$(_cf_find_chromium); then
  export COMFYFLEET_TEST_CHROMIUM="${COMFYFLEET_TEST_CHROMIUM:-$_cf_chromium_path}"
fi
# Playwright must never try to download its own browsers during the test run.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
