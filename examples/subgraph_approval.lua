-- subgraph_approval.lua - a person approves inside a subgraph: kvmesh.interrupt in a node of the graph `review`,
-- used as the node "review" of the main graph, parks the whole run (runs on the bundled tiny model).
--
-- `review` drafts a line, asks whether to publish it (its second super-step), then polishes it with the answer. The
-- main graph asks, reviews, and announces. `kvmesh run` asks on the terminal or takes --answer; without either the
-- run stays parked (exit status 3). A resume from the trace continues inside `review`, after its draft: the draft
-- is not made again, and the run ends as the one answered at once.
--
--   kvmesh run examples/subgraph_approval.lua --input input="a cat who learns to fly" --answer yes
--   kvmesh run examples/subgraph_approval.lua --input input="a cat who learns to fly" < /dev/null   # parked: exit 3
--   kvmesh run --resume traces/<date>/<run_id> --answer yes                                          # goes on in review
local kvm = kvmesh
local model = kvm.model("../models/minillama-2m")   -- relative to this file; --model PATH overrides

local review = kvm.graph{ name = "review",
  state = { topic = kvm.reduce.replace, draft = kvm.reduce.replace, verdict = kvm.reduce.replace, line = kvm.reduce.replace } }
review:agent("draft", { model = model, template = "Tell a short story about {state.topic}.", max_tokens = 12, writes = "draft" })
review:func("approve", function(state)
  -- the payload is what the person sees; the answer is what kvm.interrupt returns
  local answer = kvm.interrupt({ question = "Publish this line? (yes/no)", draft = state.draft })
  return { verdict = answer == "yes" and "published" or "rejected" }
end)
review:agent("polish", { model = model, template = "Once upon a time, {state.draft}", max_tokens = 8, writes = "line" })
review:edge(kvm.START, "draft")
review:edge("draft", "approve")
review:edge("approve", "polish")

local g = kvm.graph{ name = "publish",
  state = { topic = kvm.reduce.replace, verdict = kvm.reduce.replace, line = kvm.reduce.replace, news = kvm.reduce.replace } }
g:func("ask", function(state, last, ctx) return { topic = ctx.inputs.input } end)
g:subgraph("review", review, { input = { topic = "topic" }, output = { verdict = "verdict", line = "line" } })
g:agent("announce", { model = model, template = "Announce this story: {state.line}", max_tokens = 8, writes = "news" })
g:edge(kvm.START, "ask")
g:edge("ask", "review")
g:route("review", function(state) return state.verdict == "published" and "announce" or kvm.END end, { "announce", kvm.END })
g:output(function(state) return { verdict = state.verdict, line = state.line, news = state.news } end)
return g
