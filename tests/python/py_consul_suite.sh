#!/usr/bin/env bash
# Run py-consul 1.8.0's own test suite (from its PyPI sdist) against `mesh dev`.
#
# The sdist is downloaded once into a cache directory, unpacked into a temporary directory, and
# only the fixture that starts a Consul container (`start_consul_container` in its conftest.py,
# used by `consul_instance` and `acl_consul_instance`) is replaced, by
# tests/python/py_consul/mesh_fixture.py, which starts $MESH_BIN (`mesh dev`) instead; the list of
# Consul versions the fixtures run against becomes the single entry "mesh". The tests themselves
# are run unchanged. Prints pytest's report and a summary line:
#   py-consul suite: N passed, M failed ...
# and, one per line, `FAILED <test id>` for each failing test (tests/py_consul_suite.rs compares
# that set with its known list).
#
# Environment:
#   MESH_BIN            the mesh binary (default: target/debug/mesh of this repository)
#   PY_CONSUL_CACHE     where the sdist is kept (default: ${XDG_CACHE_HOME:-~/.cache}/mesh-py-consul)
#   MESH_PY_PORTS       host port range of the nodes' tasks (default 45150-45199)
# Arguments are passed to pytest (e.g. `-k test_agent`).
# Needs: python3 with pytest, pytest-asyncio, aiohttp, requests, packaging, docker (the conftest
# imports it); tests/python/install.sh installs them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
version=1.8.0
export MESH_BIN="${MESH_BIN:-$root/target/debug/mesh}"
[ -x "$MESH_BIN" ] || { echo "py_consul_suite: $MESH_BIN is not an executable (cargo build -p mesh-server)" >&2; exit 2; }
cache="${PY_CONSUL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mesh-py-consul}"
sdist="$cache/py_consul-$version.tar.gz"
if [ ! -s "$sdist" ]; then
  mkdir -p "$cache"
  python3 -m pip download -q --no-deps --no-binary :all: -d "$cache" "py-consul==$version" >&2
fi
[ -s "$sdist" ] || { echo "py_consul_suite: no $sdist after pip download" >&2; exit 2; }

work="$(mktemp -d "${TMPDIR:-/tmp}/py-consul-suite.XXXXXX")"
trap 'rm -rf "$work"' EXIT
tar -xzf "$sdist" -C "$work"
src="$work/py_consul-$version"

# Replace the container fixture, and nothing else, in the shipped conftest.py.
python3 - "$src/conftest.py" "$here/py_consul/mesh_fixture.py" <<'PY'
import re, sys
path, fixture = sys.argv[1], open(sys.argv[2]).read()
text = open(path).read()
versions = re.compile(r"^CONSUL_VERSIONS = \[[^\]]*\]$", re.M)
start = re.compile(r"^def start_consul_container\(.*?(?=^def )", re.M | re.S)
if not versions.search(text) or not start.search(text):
    sys.exit("py_consul_suite: conftest.py does not have the expected CONSUL_VERSIONS/start_consul_container")
text = versions.sub('CONSUL_VERSIONS = ["mesh"]', text, count=1)
text = start.sub(lambda _: fixture + "\n\n", text, count=1)
open(path, "w").write(text)
PY

cd "$src"
set +e
# -o addopts=: the shipped pytest options ask for pytest-cov, which the suite does not need.
python3 -m pytest -o addopts= -p no:cacheprovider -q -rfE --tb=short "$@" tests \
  2>&1 | tee "$work/pytest.out"
rc=${PIPESTATUS[0]}
set -e
echo
echo "py-consul $version suite against $MESH_BIN:"
grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed|error).* =+$' "$work/pytest.out" | tail -1 | sed 's/^=* *//; s/ *=*$//; s/^/py-consul suite: /'
grep -E '^(FAILED|ERROR) ' "$work/pytest.out" | sed -E 's/ - .*//' | sort -u
exit "$rc"
