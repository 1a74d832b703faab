ÿlocal m = kvmesh.model("mock:echo")
local g = kvmesh.graph{ name = "k" }
local function churn() local t = {} for i = 1, 100 do t[i] = tostring(i) .. "churn" end end
g:agent("a", setmetatable({}, { __index = function(t, k) churn() if k == "model" then return m end if k == "template" then return "T " .. "{input}" end if k == "role" then return "R " .. k end end }))
g:edge(kvmesh.START, "a")
return g
