"""tool_client.py - a client of `kvmesh serve` that gives the daemon's workflows a tool written in Python: it
registers 'weather' with a JSON Schema for its arguments, loads examples/host_tool.lua (whose nodes call
ctx:tool("weather", {...})) and runs it; the daemon sends each call to this client, which answers while it streams
the run. The forecast is made up: the point is the path from a script to this process and back.

    kvmesh serve --mock &                                   # or your models
    python3 examples/clients/python/tool_client.py --input city=Oslo [--connect tcp://127.0.0.1:5555]
"""
import argparse
import os
import sys
import zlib

from kvmesh_client import Client, KvmeshError

HERE = os.path.dirname(os.path.abspath(__file__))
WORKFLOW = os.path.join(HERE, "..", "..", "host_tool.lua")

SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 80, "description": "a city name"},
                         "days": {"type": "integer", "minimum": 1, "maximum": 7, "description": "how many days"}},
          "required": ["city"], "additionalProperties": False}


def weather(city, days=1):
    """The made-up forecast of a city: one entry per day, from a hash of its name."""
    h = zlib.crc32(city.encode())
    skies = ["sunny", "cloudy", "rainy", "windy", "snowy"]
    print("  tool weather(city=%r, days=%d)" % (city, days), flush=True)
    return {"days": [{"day": d, "sky": skies[(h >> (3 * d)) % 5], "high_c": (h >> (2 * d)) % 30 - 5} for d in range(1, days + 1)]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connect", default="tcp://127.0.0.1:5555")
    ap.add_argument("--input", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args()
    inputs = dict(kv.split("=", 1) for kv in a.input)
    with Client(a.connect) as c:
        try:
            c.hello(client="tool_client.py")
            c.register_tool("weather", SCHEMA, weather, description="The forecast of a city for the next days")
            c.workflow_load("host_tool", open(WORKFLOW).read())
            done = c.run_sync("host_tool", inputs=inputs)
        except KvmeshError as e:
            print("error: %s" % e, file=sys.stderr)
            return 1
    print("outputs: %s" % done["outputs"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
