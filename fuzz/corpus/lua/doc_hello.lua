ÿlocal kvm = kvmesh                                  -- the only global kvmesh adds
local m = kvm.model("mock:echo")                    -- a model (shared by every agent that names it)

local g = kvm.graph{ name = "hello", state = { answer = kvm.reduce.replace } }
g:agent("planner", { model = m, role = "You plan.", template = "Task: {input}\nPlan:", max_tokens = 32 })
g:agent("writer",  { model = m, template = "Task: {input}\nPlan: {agent.planner}\nAnswer:",
                     max_tokens = 64, writes = "answer" })
g:edge(kvm.START, "planner")
g:edge("planner", "writer")
return g
