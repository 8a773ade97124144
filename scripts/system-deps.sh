#!/usr/bin/env bash
# Debian packages nvmlib uses when present: PMDK's libpmem (the pmem tier), Fashion-MNIST (the OOD
# benchmark) and Chromium (the JupyterLab browser test). Installs them when run as root on
# Debian/Ubuntu; otherwise says how.
set -u
pkgs=(libpmem1 dataset-fashion-mnist chromium)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
    && exit 0
  echo "system-deps: apt-get could not install ${missing[*]}; the pmem tier / Fashion-MNIST OOD / browser test will be skipped" >&2
else
  echo "system-deps: optional packages missing: ${missing[*]}" >&2
  echo "  install them with: sudo apt-get install ${missing[*]}  (pmem tier, Fashion-MNIST OOD, browser test)" >&2
fi
exit 0
