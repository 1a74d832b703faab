ÿlocal kvm = kvmesh
local m = kvm.model("mock:echo")
local summarize = kvm.agent{ name = "summarize", model = m, template = "Summarize: {input}", max_tokens = 8 }
local g = kvm.graph{ name = "map", state = { summaries = kvm.reduce.append } }
g:func("split", function(state, last, ctx)
  local parts = {}
  for p in ctx.inputs.input:gmatch("[^;]+") do parts[#parts + 1] = p end
  return { summaries = ctx:map(summarize, parts) }   -- all parts at once, in order
end)
g:edge(kvm.START, "split")
return g
