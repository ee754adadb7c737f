#!/usr/bin/env bash
# The Raft benchmark: three `mesh server`s (127.79.0.1-3, default --raft-multiplier 1.0) against
# a three-member etcd 3.4 (127.79.1.1-3, default settings, fsync on), both on loopback, both
# running for the whole run. Prints Markdown tables:
#   - replicated KV writes sent to each leader at concurrency 1, 16, 64 and 256 by the same load
#     generator (benches/raft/loadgen.rs: one keep-alive HTTP/1.1 connection per client, written
#     by hand on one thread): mesh `PUT /v1/kv/bench/<n>`, etcd `POST /v3/kv/put` through its
#     JSON gateway, 100-byte values cycling over 100 keys; writes/s, p50/p99/max latency, and
#     the CPU of the load generator, the leader and all three members during each window;
#   - failover: SIGKILL of the leader, seconds until a write through a surviving member is
#     accepted (the client retries), over KILLS kills (the killed member is restarted on its data
#     dir in between, and all three must name the same leader again); median and max.
#
#   bash benches/raft/run.sh                     # everything, ~4 min on 2 cores
#   bash benches/raft/run.sh writes              # one part: writes | failover
#   CONCURRENCY=1,16,64,256 DURATION=10 WARMUP=2 KEYS=100 KILLS=5 KEEP=1 bash benches/raft/run.sh
#     (DURATION/WARMUP in seconds per point; KEEP=1 keeps the data dirs and logs; ETCD=path)
#
# No timed assertions: it only measures. Installs etcd-server from Debian when missing. Every
# process it starts is killed when it ends, fails or is interrupted (and dies with the driver).
set -euo pipefail
cd "$(dirname "$0")/../.."
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v "${ETCD:-etcd}" >/dev/null; then
  echo "installing etcd-server" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo build --release -q -p mesh-server --bin mesh --example raft_loadgen
target="${CARGO_TARGET_DIR:-target}"
driver=""
cleanup() {
  if [ -n "$driver" ] && kill -0 "$driver" 2>/dev/null; then
    kill -TERM "$driver" 2>/dev/null || true
    wait "$driver" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM
python3 benches/raft/bench.py "$target/release/mesh" "$target/release/examples/raft_loadgen" "$@" &
driver=$!
wait "$driver"
