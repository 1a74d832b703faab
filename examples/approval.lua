-- approval.lua - a person approves (or not) before anything is published: kvmesh.interrupt parks the run
-- until an answer comes (runs on the bundled tiny model).
--
-- The 'writer' drafts a line; 'approve' asks whether to publish it. `kvmesh run` asks on the terminal, or
-- takes --answer; without either (stdin is no terminal) the run stays parked: the command exits with status 3
-- and prints the command that resumes it from its trace with an answer, in this process or any later one.
--
--   kvmesh run examples/approval.lua --input input="a cat who learns to fly"               # asks: answer> yes
--   kvmesh run examples/approval.lua --input input="a cat who learns to fly" --answer yes  # no question
--   kvmesh run --resume traces/<date>/<run_id> --answer no                                 # a parked run
local kvm = kvmesh
local model = kvm.model("../models/minillama-2m")   -- relative to this file; --model PATH overrides
local g = kvm.graph{ name = "approval", state = { decision = kvm.reduce.replace } }
g:agent("writer", { model = model, template = "Tell a short story about {input}.", max_tokens = 16 })
g:func("approve", function(state, last)
  -- the payload is what the person sees; the answer is what kvm.interrupt returns
  local answer = kvm.interrupt({ question = "Publish this line? (yes/no)", draft = last.writer })
  return { decision = answer == "yes" and "published" or "rejected" }
end)
g:agent("publisher", { model = model, template = "Announce this story: {agent:writer}", max_tokens = 12 })
g:edge(kvm.START, "writer")
g:edge("writer", "approve")
g:route("approve", function(state) return state.decision == "published" and "publisher" or kvm.END end, { "publisher", kvm.END })
g:output(function(state, last) return { decision = state.decision, announcement = last.publisher } end)
return g
