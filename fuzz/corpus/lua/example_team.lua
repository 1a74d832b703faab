ÿ-- team.lua - the KVCOMM topology on the minitasks "team" workload (runs on the bundled tiny models).
--
-- Four agents with different roles read the same facts and question; the finder answers first, and
-- the checker, reverser and neighbour also read the finder's answer. Every agent puts the shared
-- text behind its own role prompt: with kv = "kvcomm" the facts and the finder's answer are reused
-- across agents with offsets instead of being prefilled again.
--
--   kvmesh run examples/team.lua --n 100 --seed 1 --kv dense
--   kvmesh run examples/team.lua --n 100 --seed 1 --kv kvcomm
--   kvmesh run examples/team.lua --mock --n 5          (no model: a dry run of the graph)
local kvm = kvmesh
local model = kvm.model("../models/minillama-2m")   -- relative to this file; --model PATH overrides

local function role(name) return kvm.minitasks.item{ task = "team", role = name }.system end

local g = kvm.graph{ name = "team", state = { answers = kvm.reduce.merge } }

g:agent("finder",    { model = model, role = role("finder"),    max_tokens = 8, stop = "\n",
                       template = "{input.facts}\nAsk: {input.ask}" })
for _, r in ipairs({ "checker", "reverser", "neighbour" }) do
  g:agent(r, { model = model, role = role(r), max_tokens = 8, stop = "\n",
               template = "{input.facts}\nAsk: {input.ask}\nFinder: {agent.finder}" })
end
g:func("collect", function(state, last)           -- last = the outputs of the joined agents
  return { answers = { checker = last.checker, reverser = last.reverser, neighbour = last.neighbour } }
end)

g:edge(kvm.START, "finder")
g:edge("finder", { "checker", "reverser", "neighbour" })        -- fan-out: one batch
g:join({ "checker", "reverser", "neighbour" }, "collect", { mode = "all" })

-- seeded inputs: item <seed> of the held-out team split
g:dataset(function(seed)
  local it = kvm.minitasks.item{ task = "team", index = seed, role = "finder" }
  local facts, ask = it.user:match("^(.*)\nAsk: (.-)$")
  local nb = kvm.minitasks.item{ task = "team", index = seed, role = "neighbour" }
  return { facts = facts, ask = ask, value = it.answer, neighbour = nb.answer }
end)

-- accuracy over the four agents; the checker's and reverser's right answers depend on what the
-- finder actually said
g:score(function(result, inputs)
  local msgs, out = result.state.msgs or {}, {}
  for _, m in ipairs(msgs) do out[m.node] = (m.text or ""):match("^%s*(.-)%s*$") end
  local x = out.finder or ""
  local ok = 0
  if x == inputs.value then ok = ok + 1 end
  if out.checker == (x == inputs.value and "yes" or "no") then ok = ok + 1 end
  if out.reverser == x:reverse() then ok = ok + 1 end
  if out.neighbour == inputs.neighbour then ok = ok + 1 end
  return ok / 4
end)

return g
