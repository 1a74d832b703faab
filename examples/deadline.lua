-- deadline.lua - a per-agent timeout with retries, and a fallback when the time is up (runs on the bundled
-- tiny model).
--
-- The 'writer' may talk for 2,000 tokens, but each call has 30 ms: generation stops at the next token once
-- the time is up, its KV goes back to the pool, and the call is retried twice (after 20 ms, then 40 ms).
-- When the last attempt times out too, the on_error edge hands over to 'fallback', a short answer.
--
--   kvmesh run examples/deadline.lua --input input="a cat who learns to fly"
local kvm = kvmesh
local model = kvm.model("../models/minillama-2m")   -- relative to this file; --model PATH overrides
local g = kvm.graph{ name = "deadline", state = { note = kvm.reduce.replace } }
g:agent("writer", { model = model, template = "Tell a very long story about {input}.",
                    max_tokens = 2000, ignore_eos = true,
                    timeout_ms = 30, retry = { max = 2, backoff_ms = 20, on = { "timeout" } } })
g:agent("fallback", { model = model, template = "In one line: {input}.", max_tokens = 16, stop = "\n" })
g:func("why", function(state, last) return { note = last.writer and last.writer.error } end)
g:edge(kvm.START, "writer")
g:edge("writer", "why", { on_error = true })
g:edge("why", "fallback")
g:output(function(state, last) return { note = state.note, answer = last.fallback } end)
return g
