ÿlocal kvm = kvmesh
local m = kvm.model("mock:echo")
local g = kvm.graph{ name = "loop",
  state = { draft = kvm.reduce.replace, ok = kvm.reduce.replace, tries = kvm.reduce.sum } }
g:agent("writer", { model = m, template = "Write about {input}. Last try: {state.draft}", max_tokens = 6,
                    writes = "draft" })
g:func("verify", function(state)                    -- a verifier in Lua
  return { ok = #state.draft > 20, tries = 1 }
end)
g:edge(kvm.START, "writer")
g:edge("writer", "verify")
g:route("verify", function(state)
  if state.ok or state.tries >= 3 then return kvm.END end
  return "writer"
end, { "writer", kvm.END })
g:limit{ steps = 10 }
g:output(function(state) return { draft = state.draft, tries = state.tries } end)
return g
