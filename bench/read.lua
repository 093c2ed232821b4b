-- wrk script: GET one path as one user (BENCH_TOKEN, BENCH_PATH).
local token = os.getenv("BENCH_TOKEN")
local path = os.getenv("BENCH_PATH")
function request()
  return wrk.format("GET", path, {["Authorization"] = "Bearer " .. token})
end
