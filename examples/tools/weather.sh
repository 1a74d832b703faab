#!/bin/sh
# weather.sh - the 'weather' tool of examples/host_tool.lua as a command, for `kvmesh run --tool weather=...`:
# reads the arguments {"city": "...", "days": N} (already checked against weather.schema.json) on stdin and prints
# {"days": [{"day": 1, "sky": "...", "high_c": N}, ...]} on stdout: made up, seeded by the city's name, the same
# numbers as the C function of examples/tools/host_tool.c.
exec python3 -c '
import json, sys
a = json.load(sys.stdin)
h = 2166136261
for c in a["city"].encode():
    h = ((h ^ c) * 16777619) & 0xFFFFFFFF
skies = ["sunny", "cloudy", "rainy", "windy", "snowy"]
days = []
for d in range(1, a.get("days", 1) + 1):
    days.append({"day": d, "sky": skies[(h >> 8) % 5], "high_c": (h >> 16) % 30 - 5})
    h = (h * 1103515245 + 12345) & 0xFFFFFFFF
print(json.dumps({"days": days}))
'
