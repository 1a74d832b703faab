ÿ-- stories.lua - a fan-out on stories260K (llama2.c, shared models folder): a teller starts a story,
-- three agents continue it behind their own prefixes. Runs on the CPU in seconds; with --n the
-- teller's story and the input are reused across agents by KVCOMM once anchors exist (from the
-- third run on).
--
--   kvmesh run examples/stories.lua --input input="a girl named Lily"
--   kvmesh run examples/stories.lua --n 12 --kv kvcomm      (reuse rate, batch sizes)
local kvm = kvmesh
local m = kvm.model("../../shared/models/stories260K/stories260K.bin")   -- --model PATH overrides

local g = kvm.graph{ name = "stories" }
g:agent("teller", { model = m, template = "Once upon a time, {input}. One day,", max_tokens = 24 })
g:agent("dog",    { model = m, template = "Story: {agent.teller} The dog", max_tokens = 16 })
g:agent("cat",    { model = m, template = "Tale: {agent.teller} The cat", max_tokens = 16 })
g:agent("bird",   { model = m, template = "Note: {input}. {agent.teller} The bird", max_tokens = 16 })
g:edge(kvm.START, "teller")
g:edge("teller", { "dog", "cat", "bird" })          -- three agents, one forward pass per step

local names = { "Lily", "Tom", "Sue", "Max", "Ben", "Amy", "Tim", "Sam" }
g:dataset(function(seed) return { input = "a child named " .. names[seed % #names + 1] } end)
return g
