-- wrk script for bench/load.sh: a paced mix of the calls internal teams make.
-- Environment: READ_ONLY, MANAGER (tokens), INVOICE (an invoice id), DELAY_MS (pause between
-- one connection's requests, which sets the rate: connections * 1000 / DELAY_MS per second).

local read_only = os.getenv("READ_ONLY")
local manager = os.getenv("MANAGER")
local invoice = os.getenv("INVOICE")
local delay_ms = tonumber(os.getenv("DELAY_MS") or "250")

-- Half consumption queries (the read-only principal), a quarter invoice reads and a quarter
-- PDF downloads (the manager). Distinct pages, so each is a distinct upstream request.
local mix = {
  { read_only, "/billing/v2beta1/consumptions?page_size=10&page=1" },
  { manager, "/billing/v2beta1/invoices/" .. invoice },
  { read_only, "/billing/v2beta1/consumptions?page_size=10&page=2" },
  { manager, "/billing/v2beta1/invoices/" .. invoice .. "/download?dl=1" },
}

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  i = 0
  statuses = {}
end

function request()
  i = i % #mix + 1
  local call = mix[i]
  return wrk.format("GET", call[2], { ["Authorization"] = "Bearer " .. call[1] })
end

function delay()
  return delay_ms
end

function response(status, headers, body)
  local key = "s" .. status
  statuses[key] = (statuses[key] or 0) + 1
end

function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    for key, n in pairs(thread:get("statuses")) do
      counts[key] = (counts[key] or 0) + n
    end
  end
  local line = ""
  for key, n in pairs(counts) do
    line = line .. " " .. key:sub(2) .. "=" .. n
  end
  local e = summary.errors
  io.write(string.format("RESULT requests=%d socket_errors=%d non_2xx=%d statuses:%s\n",
    summary.requests, e.connect + e.read + e.write + e.timeout, e.status, line))
  io.write(string.format("RESULT latency_ms p50=%.1f p99=%.1f max=%.1f\n",
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
