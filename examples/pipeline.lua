-- pipeline.lua - a retrieval-style pipeline: facts -> extractor -> answerer (bundled tiny models).
--
-- A Lua tool plays the retriever (it returns the facts block for the question); the extractor reads
-- the retrieved facts and the question and answers with the value; the answerer reads the
-- extractor's answer and restates it in its own role (value + 1, or in words, ...). The retrieved
-- text is a tool placeholder ({tool.facts}): under kvcomm its KV is computed once per request and
-- reused by every agent that reads it.
--
--   kvmesh run examples/pipeline.lua --n 100 --kv dense
--   kvmesh run examples/pipeline.lua --input question="Ask: Mark" --input facts="Mark: 9442" --mock
local kvm = kvmesh
local model = kvm.model("../models/minillama-2m")

local recall = kvm.minitasks.item{ task = "recall", role = 0 }

local g = kvm.graph{ name = "pipeline", state = { answer = kvm.reduce.replace } }

g:tool("facts", function(state, last, ctx)
  -- a stand-in for a search index: the run's corpus, trimmed to the lines that look like facts
  local lines = {}
  for line in (ctx.inputs.facts or ""):gmatch("[^\n]+") do
    if line:match("^%a+: %d+$") then lines[#lines + 1] = line end
  end
  return table.concat(lines, "\n")
end)
g:agent("extractor", { model = model, role = recall.system, max_tokens = 8, stop = "\n",
                       template = "{tool.facts}\n{input.question}" })
g:agent("answerer",  { model = model, role = recall.system, max_tokens = 8, stop = "\n", writes = "answer",
                       template = "{tool.facts}\n{input.question}\nDraft: {agent.extractor}" })

g:edge(kvm.START, "facts")
g:edge("facts", "extractor")
g:edge("extractor", "answerer")

g:dataset(function(seed)
  local it = kvm.minitasks.item{ task = "recall", index = seed, role = 0 }
  local facts, q = it.user:match("^(.*)\n([^\n]*)$")
  return { facts = facts, question = q, expected = it.answer }
end)
g:score(function(result, inputs)
  return ((result.state.answer or ""):match("^%s*(.-)%s*$")) == inputs.expected
end)

return g
