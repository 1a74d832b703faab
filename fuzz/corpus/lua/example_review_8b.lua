ÿ-- review_8b.lua - a code-review team written for an 8B instruct model (Llama-3.1-8B-Instruct class).
--
-- NOT for the bundled tiny models: it needs a chat model that follows instructions. Run it with a
-- real checkpoint, or with the synthetic 8B shapes for timing (outputs are then meaningless):
--
--   kvmesh run examples/review_8b.lua --model /path/to/Llama-3.1-8B-Instruct --input input="Write is_prime(n)"
--   kvmesh run examples/review_8b.lua --model synthetic:llama-3.1-8b --input input="x" --backend cuda
--   kvmesh run examples/review_8b.lua --mock --input input="Write is_prime(n)"      (dry run)
--
-- Planner -> coder -> {tester, critic} (fan-out, one batch) -> decide (join all) -> coder again
-- until the critic says OK or the step budget runs out. All agents read the task; coder, tester and
-- critic read each other's latest outputs, so with kv = "kvcomm" those segments are reused.
local kvm = kvmesh
local llama = kvm.model("meta-llama/Llama-3.1-8B-Instruct")   -- --model PATH overrides

local g = kvm.graph{ name = "review",
  state = { verdict = kvm.reduce.replace, rounds = kvm.reduce.sum } }

local sys = "You are a careful member of a small software team. Be concise."
g:agent("planner", { model = llama, role = sys, max_tokens = 256,
  template = "Task: {input}\nWrite a short numbered plan." })
g:agent("coder",   { model = llama, role = sys, max_tokens = 512, kv = "kvcomm",
  template = "Task: {input}\nPlan:\n{agent:planner}\nPrevious review:\n{agent:critic}\nWrite the code." })
g:agent("tester",  { model = llama, role = sys, max_tokens = 256, kv = "kvcomm",
  template = "Task: {input}\nCode:\n{agent:coder}\nList failing cases, or say NONE." })
g:agent("critic",  { model = llama, role = sys, max_tokens = 128, kv = "kvcomm",
  template = "Task: {input}\nCode:\n{agent:coder}\nAnswer OK if the code is correct, else REVISE and why." })
g:func("decide", function(state, last)
  local ok = (last.critic or ""):match("^%s*OK") ~= nil
  return { verdict = ok and "ok" or "revise", rounds = 1 }
end)

g:edge(kvm.START, "planner")
g:edge("planner", "coder")
g:edge("coder", { "tester", "critic" })
g:join({ "tester", "critic" }, "decide", { mode = "all" })
g:route("decide", function(state)
  if state.verdict == "ok" or state.rounds >= 3 then return kvm.END end
  return "coder"
end, { "coder", kvm.END })
g:limit{ steps = 16, tokens = 40000 }
g:output(function(state)
  local code
  for _, m in ipairs(state.msgs) do if m.node == "coder" then code = m.text end end
  return { verdict = state.verdict, rounds = state.rounds, code = code }
end)
return g
