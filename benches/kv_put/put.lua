-- Run: KEYS=100 wrk -t4 -c16 -d15s -s benches/kv_put/put.lua http://127.0.0.1:8500 (wrk from Debian)
-- PUT /v1/kv/bench/<n> with a 100-byte body; keys cycle through KEYS (env), offset per thread.
local keys = tonumber(os.getenv("KEYS") or "100")
local counter = 0
local tid = 0
local threads = {}
function setup(thread)
  thread:set("tid", tid)
  tid = tid + 1
end
function init(args)
  counter = tid * 7919
end
local body = string.rep("v", 100)
function request()
  counter = counter + 1
  return wrk.format("PUT", "/v1/kv/bench/" .. (counter % keys), nil, body)
end
function done(summary, latency, requests)
  io.write(string.format("p50 %.2f ms  p90 %.2f ms  p99 %.2f ms  p99.9 %.2f ms  max %.2f ms  req/s %.0f  errors %d\n",
    latency:percentile(50)/1000, latency:percentile(90)/1000, latency:percentile(99)/1000,
    latency:percentile(99.9)/1000, latency.max/1000,
    summary.requests / (summary.duration/1e6), summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
