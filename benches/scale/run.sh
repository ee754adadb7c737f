#!/usr/bin/env bash
# The scale benchmark (issue 11): in-memory tasks at 1k/10k/100k, real-process deploys and
# shutdown, and KV writes to 1,000,000 keys against etcd 3.4 in the same run. Prints Markdown
# tables (see benches/scale.rs for what each row measures and the environment it reads).
#
#   bash benches/scale/run.sh                       # everything, ~20 min on 2 cores
#   SCALE_SIZES=1000,10000 SCALE_KV_KEYS=100000 bash benches/scale/run.sh   # a quicker run
#
# Installs etcd-server from Debian when missing (the KV comparison is skipped without it).
set -euo pipefail
cd "$(dirname "$0")/../.."
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v etcd >/dev/null; then
  echo "installing etcd-server" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
fi
# 10,000 tasks and 1M keys need more open files than the usual 1,024 (the bench raises its own).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo bench -q -p mesh-server --features memory-runtime --bench scale
