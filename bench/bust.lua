-- wrk script for bench/load.sh's hostile mix: cache busting. Every request is a consumption
-- query no one asked before (a random category name), so none can be answered from the cache;
-- sent with the demo's gateway key (a principal of its own), paced by DELAY_MS per connection.
-- Environment: GATEWAY_KEY, DELAY_MS.

local key = os.getenv("GATEWAY_KEY")
local delay_ms = tonumber(os.getenv("DELAY_MS") or "40")

function init(args)
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
end

function request()
  local path = string.format(
    "/billing/v2beta1/consumptions?page_size=10&category_name=bust-%d-%d",
    math.random(1, 1e9), math.random(1, 1e9))
  return wrk.format("GET", path, { ["X-Auth-Token"] = key })
end

function delay()
  return delay_ms
end
