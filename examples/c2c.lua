-- c2c.lua - Cache-to-Cache between two checkpoints (docs/c2c.md): a Qwen3 agent reads the documents, a Llama
-- agent answers, and the Llama agent's cache of the documents comes from the Qwen3 model through a C2C fuser
-- (kv_from ... via = "c2c") instead of its own prefill: the Qwen3 model prefills the answerer's prompt up to and
-- including {input.docs}, the fuser projects its K/V into the Llama cache of those rows, the rest of the prompt
-- and the answer run on the Llama model alone (spec §5-6).
--
-- The fuser here, c2c/untrained.c2c.json, is UNTRAINED (random weights, `kvmesh c2c init --receiver
-- models/minillama-2m --sharer models/miniqwen3-6m -o examples/c2c/untrained.c2c.json --seed 1 --hidden 16
-- --dtype bf16 --closed v0,k5`): it exercises the path (fused token counts, gate states, timings in the trace)
-- and carries no information from the reader, so the answer is no better than the Llama model's own. The trained
-- fuser of the pair (models/c2c-miniqwen3-to-minillama) is trained for spec §9's blinded receiver, whose own rows
-- of the facts hide the digits: `kvmesh bench c2c` measures it (docs/c2c.md). On rows the receiver computed from
-- the real facts, as here, it adds a correction the receiver does not need and its answers are garbled.
-- A fuser made with `--align longest` runs the same graph in aligned mode (two tokenizers, spec §4; docs/c2c.md).
--
--   kvmesh run examples/c2c.lua --input docs="Mark: 9442" --input q="Mark" --trace /tmp/c2c-trace
--   kvmesh trace steps /tmp/c2c-trace/<run>     (the answerer's step: "c2c: ... tokens fused ...")
local kvm = kvmesh
local qwen = kvm.model("../models/miniqwen3-6m")
local llama = kvm.model("../models/minillama-2m")

local g = kvm.graph{ name = "c2c", state = { notes = kvm.reduce.replace, answer = kvm.reduce.replace } }

g:agent("reader", { model = qwen, max_tokens = 8, stop = "\n", writes = "notes",
                    template = "{input.docs}\nAsk: {input.q}" })
g:agent("answerer", { model = llama, max_tokens = 8, stop = "\n", writes = "answer",
                      template = "{input.docs}\nAsk: {input.q}",
                      kv_from = { agent = "reader", via = "c2c", fuser = "c2c/untrained.c2c.json",
                                  section = "input.docs" } })

g:edge(kvm.START, "reader")
g:edge("reader", "answerer")

return g
