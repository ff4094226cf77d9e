-- One wrk script for every HTTP scenario, configured from the environment so the same request
-- goes to tollgate and to its reference:
--   BENCH_METHOD  GET (default) or POST
--   BENCH_AUTH    the bearer token to send (none when empty)
--   BENCH_BODY    a JSON body (sent with Content-Type: application/json)
-- At the end it prints one machine-readable line that bench/report.py reads:
--   BENCH requests=… duration_us=… rps=… p50_us=… p99_us=… non2xx=… connect_errors=… …

wrk.method = os.getenv("BENCH_METHOD") or "GET"
local auth = os.getenv("BENCH_AUTH") or ""
if auth ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. auth
end
local body = os.getenv("BENCH_BODY") or ""
if body ~= "" then
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d rps=%.1f p50_us=%d p90_us=%d p99_us=%d max_us=%d " ..
    "non2xx=%d connect_errors=%d read_errors=%d write_errors=%d timeouts=%d\n",
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.status, e.connect, e.read, e.write, e.timeout))
end
