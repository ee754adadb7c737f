#!/usr/bin/env bash
# The hollow-agent benchmark (issue 15, point 6; Kubernetes' kubemark idea): real `mesh server`
# processes on loopback (127.90.0.1..) against AGENTS hollow agents (`mesh hollow-agents`: the
# real agent loop and uplink over TCP, tasks that run nowhere) in PROCS processes. It deploys
# APPS Marathon apps of INSTANCES instances each through `POST /v2/apps` and prints a Markdown
# table: time to place every task (placements/s), until every task is TASK_RUNNING and in the
# catalog, the leader's RSS and CPU, the data dir (Raft log and snapshots), and API and DNS
# latency at that size.
#
#   bash benches/hollow/run.sh                                  # 1 server, 1,000 agents x 100 tasks
#   SERVERS=3 bash benches/hollow/run.sh                        # 3 servers
#   AGENTS=200 APPS=20 INSTANCES=500 bash benches/hollow/run.sh # a quicker run
#
# Env: SERVERS (1), AGENTS (1000), PROCS (2), APPS (100), INSTANCES (1000), REQUESTS (500,
# per latency row), TIMEOUT (600 s for every task to run), KEEP=1 keeps the data dirs and logs.
# No timed assertions: it only measures. Every process it starts is killed when it ends.
set -euo pipefail
cd "$(dirname "$0")/../.."
CARGO_INCREMENTAL=0 cargo build --release -q -p mesh-server --bin mesh
target="${CARGO_TARGET_DIR:-target}"
# Each agent holds a connection to each server: more open files than the usual 1,024.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec python3 benches/hollow/bench.py "$target/release/mesh"
