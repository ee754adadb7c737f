#!/usr/bin/env bash
# Install what tests/python needs: tests/python/requirements.txt, where lines marked `no-deps`
# are installed with --no-deps (pymesos), plus the pure-Python part of http-parser 0.9.0, which
# pymesos imports and whose C extension does not build on Python >= 3.11.
# Usage: tests/python/install.sh [extra pip args, e.g. --break-system-packages]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
pip=(python3 -m pip install -q "$@")
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

grep -v 'no-deps' "$here/requirements.txt" > "$tmp/with-deps.txt"
"${pip[@]}" -r "$tmp/with-deps.txt"
grep 'no-deps' "$here/requirements.txt" | sed 's/#.*//' | grep -v '^\s*$' > "$tmp/no-deps.txt" || true
if [ -s "$tmp/no-deps.txt" ]; then
  "${pip[@]}" --no-deps -r "$tmp/no-deps.txt"
fi

if ! python3 -c 'import http_parser.http' >/dev/null 2>&1; then
  python3 -m pip download -q --no-deps --no-binary :all: -d "$tmp" http-parser==0.9.0
  tar -xzf "$tmp"/http-parser-0.9.0.tar.gz -C "$tmp"
  site="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  mkdir -p "$site/http_parser"
  cp "$tmp"/http-parser-0.9.0/http_parser/*.py "$site/http_parser/"
fi
python3 -c 'import pymesos, http_parser.http, marathon, pytest' 
echo "tests/python: requirements installed (pymesos with the pure-Python http-parser)"
