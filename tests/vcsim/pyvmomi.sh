#!/usr/bin/env bash
# Makes pyvmomi (VMware's Python SDK, from PyPI) importable by `python3`, for
# tests/vcsim/inspect.py. Quick and silent when it already is.
set -euo pipefail
python3 -c 'import pyVmomi' 2>/dev/null && exit 0
if ! python3 -m pip --version >/dev/null 2>&1; then
    if [[ $(id -u) -ne 0 ]]; then
        echo "pyvmomi: python3 has no pip and this is not root: install python3-pip" >&2
        exit 1
    fi
    echo "pyvmomi: installing python3-pip" >&2
    { apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null; } || {
        echo "pyvmomi: could not install python3-pip" >&2
        exit 1
    }
fi
echo "pyvmomi: installing it from PyPI" >&2
install() { python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@" pyvmomi; }
# Debian's own python3 is "externally managed" (PEP 668) and needs the flag.
install 2>/dev/null || install --break-system-packages
python3 -c 'import pyVmomi' || {
    echo "pyvmomi: installed, yet python3 cannot import it" >&2
    exit 1
}
