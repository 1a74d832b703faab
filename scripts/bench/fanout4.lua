-- fanout4.lua - concurrency benchmark: one lead agent, then FOUR agents at once (one batch per step).
-- Compare with chain4.lua (the same four agents one after another). Outputs have a fixed length
-- (ignore_eos), so both do exactly the same token work; only the scheduling differs.
--   kvmesh run scripts/bench/fanout4.lua --model synthetic:llama-3.1-8b --input input="..." --kv dense
local kvm = kvmesh
local m = kvm.model("../../../shared/models/stories260K/stories260K.bin")   -- --model PATH overrides
local N = 64                                                                  -- output tokens per agent
local g = kvm.graph{ name = "fanout4" }
g:agent("lead", { model = m, template = "Task: {input}. Plan:", max_tokens = N, ignore_eos = true, kv = "dense" })
for i = 1, 4 do
  g:agent("w" .. i, { model = m, template = "Worker " .. i .. " on: {input}. Plan: {agent.lead} Work:",
                      max_tokens = N, ignore_eos = true, kv = "dense" })
end
g:edge(kvm.START, "lead")
g:edge("lead", { "w1", "w2", "w3", "w4" })
return g
