-- debate.lua - two debaters take turns for a bounded number of rounds, then a judge decides; run it with
-- --stream to watch every agent's tokens as they come. Written for an instruct model (the tiny bundled
-- models only know the minitasks format: their words make no sense here, but the graph runs the same).
--
--   kvmesh run examples/debate.lua --stream --input input="Cats make better pets than dogs."
--   kvmesh run examples/debate.lua --stream --mock --input input="Cats make better pets than dogs."
--
-- Each debater reads the motion and the other side's last turn ({agent.con} / {agent.pro}: KVCOMM reuses
-- their KV across agents); the loop is a conditional edge with a round counter and a step budget.
local kvm = kvmesh
local model = kvm.model("../models/minillama-2m")   -- relative to this file; --model PATH overrides
local g = kvm.graph{ name = "debate", state = { rounds = kvm.reduce.sum } }

g:agent("pro", { model = model, max_tokens = 48, stop = "\n",
                 role = "You argue FOR the motion. One short paragraph.",
                 template = "Motion: {input}\nYour opponent said: {agent.con}\nYour turn:" })
g:agent("con", { model = model, max_tokens = 48, stop = "\n",
                 role = "You argue AGAINST the motion. One short paragraph.",
                 template = "Motion: {input}\nYour opponent said: {agent.pro}\nYour turn:" })
g:agent("judge", { model = model, max_tokens = 32, stop = "\n",
                   role = "You judge a debate. Name the winner (pro or con) and say why in one sentence.",
                   template = "Motion: {input}\nFor: {agent.pro}\nAgainst: {agent.con}\nVerdict:" })
g:func("count", function() return { rounds = 1 } end)

g:edge(kvm.START, "pro")
g:edge("pro", "con")
g:edge("con", "count")
g:edge("count", "pro", { when = function(state) return state.rounds < 2 end })
g:edge("count", "judge", { when = function(state) return state.rounds >= 2 end })
g:limit{ steps = 12 }
g:output(function(state, last) return { verdict = last.judge, rounds = state.rounds } end)
return g
