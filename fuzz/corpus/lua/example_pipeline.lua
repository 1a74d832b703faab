ÿ-- pipeline.lua - a retrieval-style pipeline: facts -> extractor -> answerer (bundled tiny models).
--
-- A Lua tool plays the retriever (it returns the fact lines of the run's corpus); the extractor reads
-- the retrieved facts and the question and answers with the asked value; the answerer reads the same
-- facts, the question and the extractor's answer, and gives the final answer in its own role (the
-- value's digits reversed, the minitasks "reverser"). The retrieved text is a tool placeholder
-- ({tool.facts}): under kvcomm its KV is computed once per request and reused by both agents behind
-- their different role prompts, and the extractor's answer is reused by the answerer.
--
--   kvmesh run examples/pipeline.lua --n 100 --kv dense
--   kvmesh run examples/pipeline.lua --n 100 --kv kvcomm
--   kvmesh run examples/pipeline.lua --input name=Mark --input corpus="Mark: 9442" --mock
local kvm = kvmesh
local model = kvm.model("../models/minillama-2m")    -- --model PATH overrides

local function role(name) return kvm.minitasks.item{ task = "team", role = name }.system end

local g = kvm.graph{ name = "pipeline", state = { answer = kvm.reduce.replace } }

g:tool("facts", function(state, last, ctx)
  -- a stand-in for a search index: the lines of the corpus that look like facts
  local lines = {}
  for line in (ctx.inputs.corpus or ""):gmatch("[^\n]+") do
    if line:match("^%a+: %d+$") then lines[#lines + 1] = line end
  end
  return table.concat(lines, "\n")
end)
g:agent("extractor", { model = model, role = role("finder"), max_tokens = 8, stop = "\n",
                       template = "{tool.facts}\nAsk: {input.name}" })
g:agent("answerer",  { model = model, role = role("reverser"), max_tokens = 8, stop = "\n", writes = "answer",
                       template = "{tool.facts}\nAsk: {input.name}\nFinder: {agent.extractor}" })

g:edge(kvm.START, "facts")
g:edge("facts", "extractor")
g:edge("extractor", "answerer")

g:dataset(function(seed)
  local it = kvm.minitasks.item{ task = "team", index = seed, role = "finder" }
  local corpus, name = it.user:match("^(.*)\nAsk: (.-)$")
  return { corpus = corpus .. "\n(end of the search results)", name = name, value = it.answer }
end)
-- right when the final answer is the asked value reversed (both agents must be right)
g:score(function(result, inputs)
  return ((result.state.answer or ""):match("^%s*(.-)%s*$")) == inputs.value:reverse()
end)

return g
