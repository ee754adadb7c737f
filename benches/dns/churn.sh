#!/usr/bin/env bash
# DNS under catalog churn: saturation queries/s of mesh quiet and while 100 catalog changes per
# second run, at 1,000, 10,000 and 100,000 services x 3 instances.
#
#   bash benches/dns/churn.sh     # SIZES="1000 10000 100000" DURATION=10 ROUNDS=3 CHURN=100
#
# For each size: a fresh `mesh dev` (pinned to CPU 1 when there are 2 CPUs or more), every
# instance registered with `PUT /v1/catalog/register` over CONNECTIONS keep-alive connections at
# once (the load time is printed), then ROUNDS times: a dnsperf saturation run of DURATION s (A and
# SRV queries for random services, dnsperf pinned to CPU 0) with nothing else going on, and one
# while `gen.py churn` (also on CPU 0) registers and deregisters other services (`churn-k`, on the
# same node as every instance) at CHURN changes/s. The table shows the best round of each, their
# ratio, and the change rate the driver had. Needs dnsperf (installed from Debian when missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
here=benches/dns
SIZES=${SIZES:-1000 10000 100000}
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CHURN=${CHURN:-100}
MESH=${MESH:-target/release/mesh}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v dnsperf >/dev/null || ! command -v dig >/dev/null; then
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dnsperf bind9-dnsutils >/dev/null
fi
[ "$MESH" != target/release/mesh ] || cargo build --release -q -p mesh-server --bin mesh

work=$(mktemp -d /tmp/mesh-dns-churn.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

pin_server=() pin_client=()
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
  pin_server=(taskset -c 1) pin_client=(taskset -c 0)
fi

saturate() { # port -> queries/s
  "${pin_client[@]}" dnsperf -s 127.0.0.1 -p "$1" -d "$work/queries.txt" -l "$DURATION" 2>&1 \
    | sed -n 's/.*Queries per second: *\([0-9.]*\).*/\1/p'
}

for n in $SIZES; do
  port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  rm -rf "$work/data"
  "${pin_server[@]}" "$MESH" dev --http 127.0.0.1:0 --dns "127.0.0.1:$port" --data-dir "$work/data" \
    --runtime process --no-registrator --node bench >"$work/mesh.out" 2>"$work/mesh.log" &
  mesh_pid=$!
  pids+=($mesh_pid)
  for _ in $(seq 600); do grep -qs "mesh dev ready" "$work/mesh.out" && break; sleep 0.1; done
  ready=$(grep "mesh dev ready" "$work/mesh.out") || { echo "mesh did not start:"; tail "$work/mesh.log"; exit 1; }
  http=$(sed -n 's/.*http=\([^ ,]*\).*/\1/p' <<<"$ready")
  echo "$n services: registering $((n * 3)) instances" >&2
  t0=$(date +%s.%N)
  "${pin_client[@]}" env SERVICES="$n" python3 $here/gen.py register "$http"
  load=$(python3 -c "print(round($(date +%s.%N) - $t0, 1))")
  echo "registered in $load s" >&2
  last=$((n - 1))
  got=$(dig @127.0.0.1 -p "$port" +short +time=2 +tries=1 "svc-$last.service.mesh" A | wc -l)
  [ "$got" = 3 ] || { echo "mesh does not answer svc-$last (got $got records)" >&2; exit 1; }
  SERVICES="$n" python3 $here/gen.py queries "$work/queries.txt" 100000
  for r in $(seq "$ROUNDS"); do
    quiet=$(saturate "$port")
    "${pin_client[@]}" python3 $here/gen.py churn "$http" "$CHURN" $((DURATION + 2)) >"$work/churn.rate" &
    churn_pid=$!
    sleep 1
    busy=$(saturate "$port")
    wait "$churn_pid"
    rate=$(cat "$work/churn.rate")
    echo "  round $r: quiet $quiet q/s, churn $busy q/s at $rate changes/s" >&2
    echo "$n $load $quiet $busy $rate" >>"$work/results"
  done
  kill "$mesh_pid"
  wait "$mesh_pid" 2>/dev/null || true
done

python3 - "$work/results" "$DURATION" "$CHURN" <<'EOF2'
import sys
rows = [l.split() for l in open(sys.argv[1])]
sizes = {}
for n, load, quiet, busy, rate in rows:
    sizes.setdefault(int(n), []).append((float(load), float(quiet), float(busy), float(rate)))
print(f"\nDNS under catalog churn: saturation queries/s ({sys.argv[2]} s dnsperf runs, A+SRV for random "
      f"services), quiet and during {sys.argv[3]} register/deregister per second of other services; "
      f"best of {len(next(iter(sizes.values())))} rounds\n")
print("| services x 3 | load time (s) | quiet queries/s | churn queries/s | churn/quiet | changes/s had |")
print("|---:|---:|---:|---:|---:|---:|")
for n, v in sorted(sizes.items()):
    q, b = max(r[1] for r in v), max(r[2] for r in v)
    print(f"| {n:,} | {v[0][0]:.1f} | {q:,.0f} | {b:,.0f} | {b / q:.2f} | {min(r[3] for r in v):.0f} |")
print("\nevery round (services, load s, quiet q/s, churn q/s, changes/s):")
for r in rows:
    print("  " + " ".join(r))
EOF2
