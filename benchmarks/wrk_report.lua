-- Shared by keepalive.lua and close.lua (the runner passes one of them to `wrk -s`).
--
-- done() prints one line, `BENCH_JSON {...}`, with the request count, errors and latency
-- percentiles, which the runner parses. With BENCH_TALLY=1 in the environment, response()
-- also counts answers by their X-Worker-Pid header (per wrk thread; merged in done()) to
-- measure how evenly the workers share the load. Defining response() makes wrk parse every
-- response's headers and call into Lua, which costs the load generator CPU, so the runner
-- only tallies during warmup runs, never during the measured ones.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

if os.getenv("BENCH_TALLY") == "1" then
   pids = {}
   function response(status, headers, body)
      local pid = headers["X-Worker-Pid"] or headers["x-worker-pid"] or "none"
      pids[pid] = (pids[pid] or 0) + 1
   end
end

function done(summary, latency, requests)
   local e = summary.errors
   local out = {
      string.format('"requests":%d,"duration_us":%d,"bytes":%d', summary.requests,
                    summary.duration, summary.bytes),
      string.format('"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}',
                    e.connect, e.read, e.write, e.status, e.timeout),
      string.format('"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}',
                    latency:percentile(50), latency:percentile(90), latency:percentile(99),
                    latency.max, latency.mean),
   }
   local merged = {}
   for _, thread in ipairs(threads) do
      local counts = thread:get("pids")
      if counts then
         for pid, n in pairs(counts) do
            merged[pid] = (merged[pid] or 0) + n
         end
      end
   end
   local parts = {}
   for pid, n in pairs(merged) do
      table.insert(parts, string.format('"%s":%d', pid, n))
   end
   table.insert(out, '"pids":{' .. table.concat(parts, ",") .. '}')
   io.write("BENCH_JSON {" .. table.concat(out, ",") .. "}\n")
end
