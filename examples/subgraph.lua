-- subgraph.lua - a graph used as a node of another graph (runs on the bundled tiny model).
--
-- `research` is a graph of its own: two agents side by side on one question (one forward pass per step), then a
-- Lua node that keeps the shorter answer. The main graph asks, runs `research` as its node "research" (its state
-- mapped in: question -> q, and out: notes -> findings, where the main graph's append reducer applies), then writes.
-- The subgraph's steps are traced nested under its node's step: `kvmesh trace show` lists them as research/...
--
--   kvmesh run examples/subgraph.lua --input input="a cat who learns to fly"
--   kvmesh trace show traces/<date>/<run_id>
local kvm = kvmesh
local model = kvm.model("../models/minillama-2m")   -- relative to this file; --model PATH overrides

local research = kvm.graph{ name = "research",
  state = { q = kvm.reduce.replace, notes = kvm.reduce.append, best = kvm.reduce.replace } }
research:agent("plot", { model = model, template = "Tell a short story about {state.q}.", max_tokens = 12, writes = "notes" })
research:agent("hero", { model = model, template = "Once upon a time, {state.q}", max_tokens = 12, writes = "notes" })
research:func("pick", function(state, last)
  local a, b = last.plot, last.hero
  return { best = #a <= #b and a or b }
end)
research:edge(kvm.START, { "plot", "hero" })
research:join({ "plot", "hero" }, "pick", { mode = "all" })

local g = kvm.graph{ name = "story",
  state = { question = kvm.reduce.replace, findings = kvm.reduce.append, lead = kvm.reduce.replace,
            story = kvm.reduce.replace } }
g:func("ask", function(state, last, ctx) return { question = ctx.inputs.input } end)
g:subgraph("research", research, { input = { question = "q" }, output = { notes = "findings", best = "lead" } })
g:agent("write", { model = model, template = "Tell a story that starts: {state.lead}", max_tokens = 16, writes = "story" })
g:edge(kvm.START, "ask")
g:edge("ask", "research")
g:edge("research", "write")
g:output(function(state)
  return { notes = #state.findings, lead = state.lead, story = state.story }
end)
return g
