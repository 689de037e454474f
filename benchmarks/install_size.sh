#!/usr/bin/env bash
# What each side costs to install: time and site-packages size of `.[infer]` and of `.[all]`, each in a
# fresh venv, and whether torch is importable there (the inference side must not have it).
#
#     bash benchmarks/install_size.sh            # from the repo root; PYTHON=python3.11 to choose the interpreter
#
# Installs from the package index with the repo's constraints.txt and no pip cache, as a newcomer would
# (pip's own configuration, such as a local wheel folder, still applies). Takes a few minutes.
set -euo pipefail

if [[ ! -f pyproject.toml || ! -f constraints.txt ]]; then
    echo "run this from the tandem repo root (where pyproject.toml and constraints.txt are)" >&2
    exit 2
fi
PYTHON=$(realpath "$(command -v "${PYTHON:-python3}")")  # absolute: the builds run from a copy
work=$(mktemp -d -t tandem-install-XXXXXX)
trap 'rm -rf "$work"' EXIT
# Build from a copy: setuptools builds in the source tree and would leave build/ behind in the repo.
mkdir "$work/source"
cp -r pyproject.toml README.md constraints.txt src "$work/source/"
cd "$work/source"

rows=()
for extra in infer all; do
    venv="$work/$extra"
    "$PYTHON" -m venv "$venv"
    echo "installing .[$extra] into a fresh venv ..." >&2
    start=$(date +%s.%N)
    "$venv/bin/python" -m pip install --quiet --no-cache-dir -c constraints.txt ".[$extra]" >&2
    seconds=$(echo "$(date +%s.%N) - $start" | bc)
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    megabytes=$(du -sm "$site" | cut -f1)
    packages=$("$venv/bin/python" -m pip list --format=freeze 2>/dev/null | wc -l)
    if "$venv/bin/python" -c 'import torch' 2>/dev/null; then torch=yes; else torch=no; fi
    if [[ $extra == infer ]]; then infer_torch=$torch; fi
    # The command must start on either side: `tandem --help` imports nothing heavy.
    if "$venv/bin/tandem" --help >/dev/null; then cli=ok; else cli=FAILS; fi
    rows+=("$(printf '%-10s %12.0f %18s %10s %14s %14s' ".[$extra]" "$seconds" "$megabytes" "$packages" "$torch" "$cli")")
done

echo
echo "fresh venvs, $("$PYTHON" --version), $(uname -m), pip --no-cache-dir"
printf '%-10s %12s %18s %10s %14s %14s\n' extra "install (s)" "site-packages (MiB)" packages "torch imports" "tandem --help"
printf '%s\n' "${rows[@]}"
if [[ "$infer_torch" == no ]]; then
    echo "PASS: torch is not importable in the .[infer] install"
else
    echo "FAIL: torch is importable in the .[infer] install"
    exit 1
fi
