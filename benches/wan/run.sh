#!/usr/bin/env bash
# The WAN benchmark: two datacenters on loopback, each a `mesh server` and a `mesh agent`
# (dc1: 127.81.1.1 and .10, dc2: 127.81.2.1 and .10; default WAN gossip timing). A service
# `web` runs in both (one instance each, registered through each agent). Prints Markdown tables:
#   - HTTP latency (p50, p99, max) of `GET /v1/health/service/web?dc=dc2` through dc1's agent
#     (agent -> its server -> a dc2 server over the WAN -> back) against the local
#     `GET /v1/health/service/web` on the same agent, one keep-alive connection, sequential;
#   - DNS latency of `web.service.dc2.mesh` against `web.service.mesh`, both asked of dc1's
#     agent over UDP, sequential;
#   - WAN failure detection: SIGKILL of dc2's server, seconds until dc1's server lists it as
#     failed in `/v1/agent/members?wan=1` (restarted in between), over KILLS kills; median, max.
#
#   bash benches/wan/run.sh                  # everything, ~2 min on 2 cores
#   REQUESTS=2000 KILLS=3 bash benches/wan/run.sh
#
# No timed assertions: it only measures. Every process it starts is killed when it ends.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p mesh-server --bin mesh
target="${CARGO_TARGET_DIR:-target}"
python3 -c 'import dns.resolver' 2>/dev/null || python3 -m pip install -q dnspython 2>/dev/null \
  || python3 -m pip install -q --break-system-packages dnspython
exec python3 benches/wan/bench.py "$target/release/mesh"
