ÿlocal m = kvmesh.model("mock:echo")
local g = kvmesh.graph{ name = "r", limit = { memory_mb = 1e300 } }
g:agent("a", { model = m, template = "x", seed = -1, top_k = 1e300, budget = 1e300 })
g:edge(kvmesh.START, "a")
return g
