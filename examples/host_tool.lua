-- host_tool.lua - a host tool: 'weather' is a C function of the program that runs this workflow, registered with a
-- JSON Schema for its arguments (kvm_runtime_add_tool); a node calls it with ctx:tool. The arguments are checked
-- against the schema before the call: a misspelled or missing field is an error naming it ("args.city: expected
-- string, got integer"), and the tool does not run. Scripts still have no I/O: they reach only what the program
-- registered.
--
-- Run it through the host program built beside kvmesh (examples/tools/host_tool.c), or with `kvmesh run --tool`
-- serving the tool from a command (examples/tools/weather.sh: the arguments on stdin, the result on stdout):
--
--   build/kvmesh run examples/host_tool.lua --input city=Oslo --tool weather=examples/tools/weather.sh \
--       --tool-schema weather=examples/tools/weather.schema.json
--   build/host_tool examples/host_tool.lua --input city=Oslo            # the bundled tiny model
--   build/host_tool examples/host_tool.lua --input city=Oslo --mock     # the mock model (no model files)
local kvm = kvmesh
local model = kvm.model("../models/minillama-2m")   -- relative to this file; --model PATH overrides
local g = kvm.graph{ name = "host_tool", state = { days = kvm.reduce.replace } }

-- a tool node: its result is {tool.forecast} in the templates below
g:tool("forecast", function(state, last, ctx)
  local r = ctx:tool("weather", { city = ctx.inputs.city, days = 3 })
  local lines = {}
  for _, d in ipairs(r.days) do lines[#lines + 1] = d.day .. " " .. d.sky .. " " .. d.high_c .. "C" end
  return table.concat(lines, ", ")
end, { writes = "days" })

-- a mistake caught before the call: the schema says days is an integer from 1 to 7
g:func("check", function(state, last, ctx)
  local ok, err = pcall(ctx.tool, ctx, "weather", { city = ctx.inputs.city, days = 30 })
  ctx:log("a bad call: " .. tostring(err))
end)

g:agent("reporter", { model = model, max_tokens = 24,
                      template = "Forecast for {input.city}: {tool.forecast}\nWrite one line for the radio:" })
g:edge(kvm.START, "forecast")
g:edge("forecast", { "check", "reporter" })
g:output(function(state, last) return { forecast = state.days, report = last.reporter } end)
return g
