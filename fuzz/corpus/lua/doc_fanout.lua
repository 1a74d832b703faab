ÿlocal kvm = kvmesh
local m = kvm.model("mock:echo")
local g = kvm.graph{ name = "fanout", state = { votes = kvm.reduce.append } }
g:agent("lead", { model = m, template = "Question: {input}", max_tokens = 8 })
for _, r in ipairs({ "optimist", "pessimist", "realist", "critic" }) do
  g:agent(r, { model = m, role = "You are the " .. r .. ".", max_tokens = 8,
               template = "Question: {input}\nLead says: {agent.lead}\nYour view:" })
end
g:func("tally", function(state, last)
  local names = {}
  for name in pairs(last) do names[#names + 1] = name end
  table.sort(names)
  return { votes = names }                    -- a list extends an append key
end)
g:edge(kvm.START, "lead")
g:edge("lead", { "optimist", "pessimist", "realist", "critic" })   -- 4 agents, one forward pass per step
g:join({ "optimist", "pessimist", "realist", "critic" }, "tally", { mode = "all" })
return g
