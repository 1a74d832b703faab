-- resume.lua - a resumable pipeline (runs on the bundled tiny model): outline, then a draft and a title side by
-- side, a join that counts the words, and a check before publishing.
--
-- Every super-step ends with a checkpoint in the run's trace (docs/trace-format.md): the state the reducers
-- built, the nodes due next, what the joins have received, the agents' last outputs and the random generator.
-- A run that failed or was killed continues from its last checkpoint (or a chosen one) with `--resume`; the
-- steps before it are not run again, and greedy agents end as the run would have. With WORKFLOW.lua given
-- too, the resumed run uses that script: fix the bug that made a run fail, then resume it.
--
--   kvmesh run examples/resume.lua --input input="a cat who learns to fly"
--   kvmesh run --resume traces/<date>/<run_id>                   # from the last checkpoint
--   kvmesh run --resume traces/<date>/<run_id> --from-step 2     # from the one after super-step 2
--   kvmesh run examples/resume.lua --resume traces/<date>/<run_id>   # with this (fixed) script
local kvm = kvmesh
local max_words = 200                               -- what 'check' allows
local model = kvm.model("../models/minillama-2m")   -- relative to this file; --model PATH overrides
local g = kvm.graph{ name = "resume", state = { words = kvm.reduce.sum, checked = kvm.reduce.replace } }
g:agent("outline", { model = model, template = "Tell a short story about {input}.", max_tokens = 16 })
g:agent("draft", { model = model, template = "Tell a story that starts: {agent:outline}", max_tokens = 24 })
g:agent("title", { model = model, template = "Give a name to this story: {agent:outline}", max_tokens = 6 })
g:func("count", function(state, last)
  local n = 0
  for _ in last.draft:gmatch("%S+") do n = n + 1 end
  return { words = n }
end)
g:func("check", function(state, last)
  if state.words > max_words then error(("the draft has %d words, over %d"):format(state.words, max_words)) end
  return { checked = true }
end)
g:edge(kvm.START, "outline")
g:edge("outline", { "draft", "title" })
g:join({ "draft", "title" }, "count", { mode = "all" })
g:edge("count", "check")
g:output(function(state, last)
  local m = state.msgs
  local draft, title
  for _, x in ipairs(m) do
    if x.node == "draft" then draft = x.text elseif x.node == "title" then title = x.text end
  end
  return { title = title, words = state.words, checked = state.checked, story = draft }
end)
return g
