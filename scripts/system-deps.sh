#!/usr/bin/env bash
# What the tests need from the system, not from PyPI: Chromium (the web page's browser test, driven by
# Playwright; never `playwright install`), PostgreSQL 15 (the store's tests start a real server) and
# iproute2 (`ip netns`: the two-machine training test joins two network namespaces by a veth pair) and a
# C++ compiler (compile=inductor: torch.compile writes and builds C++ kernels on the CPU).
# Installs what is missing with apt-get when run as root on Debian/Ubuntu; otherwise says what to install
# (those tests are then skipped, each with its reason).
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/lib/postgresql/15/bin/initdb ] || missing+=(postgresql)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} (apt-get)"
    apt-get install -y -q "${missing[@]}" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
else
    echo "note: ${missing[*]} missing; the tests that need them will be skipped (install: sudo apt-get install ${missing[*]})"
fi
