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
biggest=()
for extra in infer all; do
    venv="$work/$extra"
    "$PYTHON" -m venv "$venv"
    echo "installing .[$extra] into a fresh venv ..." >&2
    start=$(date +%s.%N)
    "$venv/bin/python" -m pip install --quiet --no-cache-dir -c constraints.txt ".[$extra]" >&2
    seconds=$("$PYTHON" -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$start" "$(date +%s.%N)")
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    megabytes=$(du -sm "$site" | cut -f1)
    # pip and setuptools come with every venv, not with tandem.
    bootstrap=$(cd "$site" && { du -smc pip pip-* setuptools setuptools-* pkg_resources _distutils_hack 2>/dev/null || true; } | tail -1 | cut -f1)
    largest=$(cd "$site" && du -sm -- * | sort -rn | awk 'NR <= 4' | awk '{printf "%s%s %s MiB", (NR > 1 ? ", " : ""), $2, $1}')
    biggest+=(".[$extra] largest: $largest")
    packages=$("$venv/bin/python" -m pip list --format=freeze 2>/dev/null | wc -l)
    if "$venv/bin/python" -c 'import torch' 2>/dev/null; then torch=yes; else torch=no; fi
    if [[ $extra == infer ]]; then infer_torch=$torch; infer_mb=$((megabytes - bootstrap)); fi
    # The command must start on either side: `tandem --help` imports nothing heavy.
    if "$venv/bin/tandem" --help >/dev/null; then cli=ok; else cli=FAILS; fi
    rows+=("$(printf '%-10s %12.0f %20s %22s %10s %14s %14s' ".[$extra]" "$seconds" "$megabytes" "$((megabytes - bootstrap))" "$packages" "$torch" "$cli")")
done

echo
echo "fresh venvs, $("$PYTHON" --version), $(uname -m), pip --no-cache-dir"
printf '%-10s %12s %20s %22s %10s %14s %14s\n' extra "install (s)" "site-packages (MiB)" "without pip+setuptools" packages "torch imports" "tandem --help"
printf '%s\n' "${rows[@]}"
printf '%s\n' "${biggest[@]}"
# 150 MB = 143 MiB; the goal is a goal, not a gate: the three packages the runtime needs weigh more.
if (( infer_mb * 1048576 <= 150000000 )); then goal=PASS; else goal=MISS; fi
echo "$goal: .[infer] takes $infer_mb MiB ($(( infer_mb * 1048576 / 1000000 )) MB) without pip+setuptools; goal <= 150 MB"
if [[ "$infer_torch" == no ]]; then
    echo "PASS: torch is not importable in the .[infer] install"
else
    echo "FAIL: torch is importable in the .[infer] install"
    exit 1
fi
