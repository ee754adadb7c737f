-- The same load against etcd 3.4's gateway: KEYS=100 wrk -t4 -c16 -d15s -s benches/kv_put/etcd.lua http://127.0.0.1:2379
-- etcd v3 gateway PUT with a 100-byte value; keys cycle through KEYS (env).
local keys = tonumber(os.getenv("KEYS") or "100")
local counter = 0
local tid = 0
function setup(thread) thread:set("tid", tid); tid = tid + 1 end
function init(args) counter = tid * 7919 end
local function b64(data)
  local b='ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'
  return ((data:gsub('.', function(x)
    local r,bb='',x:byte()
    for i=8,1,-1 do r=r..(bb%2^i-bb%2^(i-1)>0 and '1' or '0') end
    return r end)..'0000'):gsub('%d%d%d?%d?%d?%d?', function(x)
    if (#x < 6) then return '' end
    local c=0
    for i=1,6 do c=c+(x:sub(i,i)=='1' and 2^(6-i) or 0) end
    return b:sub(c+1,c+1) end)..({ '', '==', '=' })[#data%3+1])
end
local val = b64(string.rep("v", 100))
function request()
  counter = counter + 1
  local body = '{"key":"' .. b64("bench/" .. (counter % keys)) .. '","value":"' .. val .. '"}'
  return wrk.format("POST", "/v3/kv/put", {["Content-Type"]="application/json"}, body)
end
function done(summary, latency, requests)
  io.write(string.format("p50 %.2f ms  p90 %.2f ms  p99 %.2f ms  p99.9 %.2f ms  max %.2f ms  req/s %.0f  errors %d\n",
    latency:percentile(50)/1000, latency:percentile(90)/1000, latency:percentile(99)/1000,
    latency:percentile(99.9)/1000, latency.max/1000,
    summary.requests / (summary.duration/1e6), summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
