"""test_curve.py KVMESH TMP - CURVE on `kvmesh serve`: a client whose public key is in the allow-list is served,
one whose key is not (or one without CURVE) gets nothing; a secret key readable by others and a public bind
without CURVE are refused at start."""
import os
import subprocess
import sys

import zmq

from daemon import Checks, Client, Daemon

kvmesh, tmp = sys.argv[1], sys.argv[2]
t = Checks()
srv_pub, srv_sec = zmq.curve_keypair()
ok_pub, ok_sec = zmq.curve_keypair()
bad_pub, bad_sec = zmq.curve_keypair()
secret = os.path.join(tmp, "server.key")
allow = os.path.join(tmp, "clients.allow")
with open(secret, "wb") as f:
    f.write(srv_sec + b"\n")
os.chmod(secret, 0o600)
with open(allow, "wb") as f:
    f.write(b"# the clients admitted\n" + ok_pub + b"\n")

d = Daemon(kvmesh, "--mock", "--curve-secret", secret, "--curve-allow", allow)
try:
    good = Client(d.ctl, timeout_s=20, curve=(srv_pub, ok_pub, ok_sec))
    t.check(good.hello()["type"] == "hello.ok", "a client with an allowed key is served")
    for name, kw in (("a client whose key is not allowed", {"curve": (srv_pub, bad_pub, bad_sec)}), ("a client without CURVE", {})):
        c = Client(d.ctl, timeout_s=2, **kw)
        try:
            c.ping()
            t.check(False, "%s gets no reply" % name)
        except TimeoutError:
            t.check(True, "%s gets no reply" % name)
        c.close()
    t.check(good.stats()["net"]["curve_denied"] >= 1, "stats counts the refused handshakes")
    t.check(d.stop() == 0, "the daemon exits 0")
finally:
    d.kill()

os.chmod(secret, 0o644)
r = subprocess.run([kvmesh, "serve", "--mock", "--bind", "tcp://127.0.0.1:*", "--no-events", "--curve-secret", secret,
                    "--curve-allow", allow], capture_output=True, text=True, timeout=30)
t.check(r.returncode != 0 and "readable by others" in r.stderr, "a secret key readable by others is refused (%r)" % r.stderr.strip())
r = subprocess.run([kvmesh, "serve", "--mock", "--bind", "tcp://0.0.0.0:*", "--no-events"], capture_output=True, text=True, timeout=30)
t.check(r.returncode != 0 and "CURVE" in r.stderr, "a public bind without CURVE is refused (%r)" % r.stderr.strip())
sys.exit(t.done())
