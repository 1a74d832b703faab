"""test_slow_subscriber.py KVMESH TMP - event subscribers that never read do not slow the daemon down or grow its
memory (issue 12): three subscribers connect to the event stream with tiny receive queues and never read, while a
client makes 500 runs (4 events each, plus heartbeats) after 500 without them; every run completes, pings stay fast,
the subscribers cost the daemon no memory beyond the baseline, and a new subscriber still gets the events of a new run."""
import json
import statistics
import struct
import sys
import time

import zmq

from daemon import PAIR, Checks, Daemon, Events

kvmesh, tmp = sys.argv[1], sys.argv[2]
t = Checks()


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


# a small queue per subscriber (--hwm 50) on a unix socket (small kernel buffers): the deaf subscribers fill up
# after a few hundred events
d = Daemon(kvmesh, "--mock", "--trace", tmp + "/traces", "--hwm", "50", events="ipc://%s/events.sock" % tmp)
LONG_TEXT = "word " * 800
try:
    c = d.client()
    c.workflow_load("pair", PAIR)
    for _ in range(20):  # warm up: the runtime's one-time allocations come first
        c.run_sync("pair", inputs={"input": "warm"})

    def phase(n, tag):
        """n runs; returns (failed, ping ms list, RSS growth KiB, seconds)."""
        r0, pings, failed, t0 = rss_kib(d.proc.pid), [], 0, time.time()
        for i in range(n):
            done = c.run_sync("pair", inputs={"input": "%s run %d %s" % (tag, i, LONG_TEXT)})
            failed += done.get("type") != "done"
            if i % 10 == 0:
                p0 = time.time()
                c.ping()
                pings.append((time.time() - p0) * 1000)
        return failed, pings, rss_kib(d.proc.pid) - r0, time.time() - t0

    # the daemon keeps the records of ended runs (run.status): a phase without subscribers is the baseline
    _, _, base_growth, base_s = phase(500, "alone")
    ctx = zmq.Context.instance()
    deaf = []
    for _ in range(3):
        s = ctx.socket(zmq.SUB)
        s.setsockopt(zmq.RCVHWM, 2)
        s.setsockopt(zmq.RCVBUF, 4096)
        s.setsockopt(zmq.SUBSCRIBE, b"")
        s.setsockopt(zmq.LINGER, 0)
        s.connect(d.events)
        deaf.append(s)
    reader = ctx.socket(zmq.SUB)  # a subscriber that reads: it must miss nothing
    reader.setsockopt(zmq.SUBSCRIBE, b"run.")
    reader.setsockopt(zmq.LINGER, 0)
    reader.connect(d.events)
    got = {"ends": 0, "seqs": []}

    def read_all():
        while reader.poll(0):
            topic, seq, body = reader.recv_multipart()
            got["seqs"].append(struct.unpack(">Q", seq)[0])
            got["ends"] += json.loads(body)["type"] == "end"

    time.sleep(0.3)  # the subscriptions reach the daemon
    orig_ping = c.ping

    def ping_and_read():
        read_all()
        return orig_ping()

    c.ping = ping_and_read  # the reader drains every ten runs, from the test's one thread
    failed, pings, growth, wall = phase(500, "deaf")
    time.sleep(0.3)
    read_all()
    # >= : the end event of the last run before it subscribed may still reach it (published just after that run's reply)
    t.check(got["ends"] >= 500, "a subscriber that reads gets the end of every run beside the deaf ones (%d of 500)" % got["ends"])
    t.check(failed == 0, "500 runs complete while three subscribers never read (%d failed, %.1f s; %.1f s alone)" % (failed, wall, base_s))
    t.check(statistics.median(pings) < 50, "pings stay fast: median %.1f ms, max %.1f ms" % (statistics.median(pings), max(pings)))
    t.check(growth - base_growth < 8 * 1024, "the deaf subscribers cost the daemon %d KiB of RSS (%d KiB with, %d without)"
            % (growth - base_growth, growth, base_growth))
    # (the daemon's queue per subscriber is bounded by --hwm, 10,000 events by default: ZeroMQ drops beyond it)
    ev = Events(d.events)
    time.sleep(0.3)
    c.run_sync("pair", inputs={"input": "after"})
    seen = []
    t1 = time.time()
    while time.time() - t1 < 5 and "end" not in seen:
        topic, seq, body = ev.recv()
        if topic.startswith("run."):
            seen.append(body["type"])
    t.check("end" in seen, "a new subscriber still gets the events of a new run (%s)" % seen)
    for s in deaf:
        s.close(0)
    ev.close()
    t.check(d.stop() == 0, "the daemon exits 0 on SIGTERM")
finally:
    d.kill()
sys.exit(t.done())
