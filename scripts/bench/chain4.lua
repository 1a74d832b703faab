-- chain4.lua - the baseline of fanout4.lua: the same lead and four agents, run one by one.
local kvm = kvmesh
local m = kvm.model("../../../shared/models/stories260K/stories260K.bin")   -- --model PATH overrides
local N = 64
local g = kvm.graph{ name = "chain4" }
g:agent("lead", { model = m, template = "Task: {input}. Plan:", max_tokens = N, ignore_eos = true, kv = "dense" })
g:edge(kvm.START, "lead")
for i = 1, 4 do
  g:agent("w" .. i, { model = m, template = "Worker " .. i .. " on: {input}. Plan: {agent.lead} Work:",
                      max_tokens = N, ignore_eos = true, kv = "dense" })
  g:edge(i == 1 and "lead" or "w" .. (i - 1), "w" .. i)   -- lead -> w1 -> w2 -> w3 -> w4
end
return g
