ÿlocal kvm = kvmesh
local m = kvm.model("mock:echo")
local g = kvm.graph{ name = "scored", state = { answer = kvm.reduce.replace } }
g:agent("echo", { model = m, template = "{input.n}", max_tokens = 2, writes = "answer" })
g:edge(kvm.START, "echo")
g:dataset(function(seed) return { n = tostring(seed * 7 % 10) } end)
g:score(function(result, inputs) return result.state.answer == inputs.n end)
return g
