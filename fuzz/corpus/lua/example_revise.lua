ÿ-- revise.lua - generate, verify, revise: a loop with a Lua verifier and a step budget.
--
-- The solver answers an arithmetic question; a Lua verifier recomputes the result from the question
-- itself and either accepts or writes feedback; the reviser tries again (see its comment). The loop ends when the verifier accepts, or when the
-- step budget (g:limit{steps}) runs out â€” a cycle without a budget is refused at load.
--
--   kvmesh run examples/revise.lua --n 100 --kv kvcomm
--   kvmesh run examples/revise.lua --input question="What is 12 + 30?" --mock
local kvm = kvmesh
local model = kvm.model("../models/minillama-2m")
local arith = kvm.minitasks.item{ task = "arithmetic", role = 0 }

local g = kvm.graph{ name = "revise",
  state = { answer = kvm.reduce.replace, ok = kvm.reduce.replace, feedback = kvm.reduce.replace,
            tries = kvm.reduce.sum } }

g:agent("solver",  { model = model, role = arith.system, max_tokens = 8, stop = "\n", writes = "answer",
                     template = "{input.question}" })
-- The tiny bundled models only know the minitasks format, so the reviser asks the same question again
-- and samples (the verifier works as a rejection sampler; the identical prompt is an exact prefix hit).
-- With an instruct model, show it its previous attempt and the verifier's feedback instead:
--   template = "{input.question}\nPrevious: {state.answer}\nFeedback: {state.feedback}\nTry again:"
g:agent("reviser", { model = model, role = arith.system, max_tokens = 8, stop = "\n", writes = "answer",
                     temperature = 0.8, top_k = 4, template = "{input.question}" })

-- the verifier: evaluates "a + b - c" style expressions found in the question, in Lua
g:func("verify", function(state, last, ctx)
  local expr = (ctx.inputs.question or ""):match("([%d%s%+%-]+%d)")
  local total, sign = 0, 1
  for tok in (expr or ""):gmatch("%S+") do
    if tok == "+" then sign = 1 elseif tok == "-" then sign = -1
    else total = total + sign * (tonumber(tok) or 0) end
  end
  local got = tonumber(((state.answer or ""):match("%-?%d+")))
  if expr and got == total then return { ok = true, tries = 1 } end
  return { ok = false, tries = 1,
           feedback = "wrong: " .. tostring(state.answer) .. " is not right, compute again" }
end)

g:edge(kvm.START, "solver")
g:edge("solver", "verify")
g:edge("reviser", "verify")
g:route("verify", function(state, last)
  if state.ok or state.tries >= 4 then return kvm.END end   -- accepted, or out of tries
  return "reviser"
end, { "reviser", kvm.END })
g:limit{ steps = 9 }
g:output(function(state) return { answer = state.answer, accepted = state.ok, tries = state.tries } end)            -- solver + up to 4 verify/revise rounds

g:dataset(function(seed)
  local it = kvm.minitasks.item{ task = "arithmetic", index = seed, role = 0 }
  return { question = it.user, expected = it.answer }
end)
g:score(function(result, inputs)
  return ((result.state.answer or ""):match("^%s*(.-)%s*$")) == inputs.expected
end)

return g
