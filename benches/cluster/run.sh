#!/usr/bin/env bash
# The cluster benchmark (issue 12): real `mesh server` and `mesh agent` processes on loopback
# addresses of this machine (127.77.x.y). Prints Markdown tables:
#   - failure of one agent (SIGKILL) among 3 and among 30: seconds to serfHealth critical, to its
#     instances leaving DNS on the other nodes, to TASK_UNREACHABLE and to replacement; with the
#     tests' gossip timing (probe 200 ms) and the default one (probe 1 s), the 3-agent run as the
#     reference for the 30-agent one;
#   - placement of one app with 1,000 instances on 30 agents (time to all RUNNING, to the last
#     agent's replica, tasks per agent), against the same app on `mesh dev`;
#   - DNS queries/s answered by an agent from its replica against `mesh dev` with the same
#     catalog (benches/dns/gen.py: 1,000 services x 3) and the same dnsperf query file.
#
#   bash benches/cluster/run.sh                  # everything, ~5 min on 2 cores
#   bash benches/cluster/run.sh failure          # one part: failure | placement | dns
#   AGENTS=3,30 TASKS=1000 DURATION=10 ROUNDS=3 KEEP=1 bash benches/cluster/run.sh
#     (KEEP=1 keeps the nodes' data dirs and logs)
#
# Agents run `--runtime memory` (tasks that run nowhere), so what is measured is the cluster,
# not process spawning: mesh is built with `--features memory-runtime`. Installs dnsperf and dig
# from Debian when missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
need=()
command -v dnsperf >/dev/null || need+=(dnsperf)
command -v dig >/dev/null || need+=(bind9-dnsutils)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# 30 nodes with their listeners, connections and state files need more than 1,024 open files.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo build --release -q -p mesh-server --features memory-runtime --bin mesh
# bench.py kills every node it started, also when it fails or is interrupted.
exec python3 benches/cluster/bench.py target/release/mesh "$@"
