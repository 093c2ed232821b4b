-- wrk script: money movements, each with a unique idempotency key, authenticated as the
-- paying user. Reads "token wallet_id" lines from BENCH_WALLETS; BENCH_KIND is transfer,
-- deposit or withdraw.
local kind = os.getenv("BENCH_KIND") or "transfer"
local users = {}
local counter = 0
local thread_id = 0

function setup(thread)
  thread_id = thread_id + 1
  thread:set("tid", thread_id)
end

function init(args)
  for line in io.lines(os.getenv("BENCH_WALLETS")) do
    local token, wallet = line:match("(%S+) (%d+)")
    users[#users + 1] = {token = token, wallet = tonumber(wallet)}
  end
  math.randomseed(os.time() + (tid or 0) * 7919)
end

function request()
  counter = counter + 1
  local payer = users[math.random(#users)]
  local body
  if kind == "transfer" then
    local payee = payer
    while payee == payer do payee = users[math.random(#users)] end
    body = string.format('{"to_account_id":%d,"amount":%d,"currency":"USD"}', payee.wallet, math.random(1, 100))
  else
    body = string.format('{"amount":%d,"currency":"USD"}', math.random(1, 100))
  end
  local headers = {
    ["Authorization"] = "Bearer " .. payer.token,
    ["Idempotency-Key"] = string.format("bench-%d-%d-%d-%d", tid or 0, counter, os.time(), math.random(1e9)),
    ["Content-Type"] = "application/json",
  }
  return wrk.format("PATCH", "/transaction/" .. kind, headers, body)
end
