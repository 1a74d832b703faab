#!/usr/bin/env python3
"""kvcomm_curve.py - the accuracy-vs-reuse curve of the KVCOMM policies (docs/kvcomm.md §5.2).

Runs `kvmesh bench kvcomm` once per (model, workload) with the modes dense, spec (the paper's policy) and the
blended policy at several recompute fractions (blend@F, without the guard of the default), then writes

  OUT/curve.md   a table per cell: accuracy over the roles that are not degenerate under dense (named), its
                 difference to dense, the worst role's difference, greedy agreement, calls reused, and the share of
                 the tokens past the exact prefix that keep another agent's KV (tok-reuse)
  OUT/curve.svg  accuracy difference to dense against tok-reuse, one line per cell (matplotlib when installed,
                 else an SVG written here)
  OUT/curve.txt  the same curve as ASCII (for docs/kvcomm.md)

usage: scripts/bench/kvcomm_curve.py [--kvmesh build/kvmesh] [--models models/minillama-2m,...]
           [--workloads team,...] [--requests 300] [--fracs 0.1,0.3,0.5,0.7,0.9] [--out results/kvcomm-curve]
       scripts/bench/kvcomm_curve.py --from OUT     (redraw from the JSON files of an earlier run)
"""
import argparse
import glob
import json
import os
import subprocess
import sys


def run_cell(a, model, wl):
    out = os.path.join(a.out, "%s-%s" % (os.path.basename(model.rstrip("/")), wl))
    modes = ["dense", "spec"] + ["blend@%g" % f for f in a.fracs]
    cmd = [a.kvmesh, "bench", "kvcomm", "--model", model, "--backend", "cpu", "--workload", wl,
           "--requests", str(a.requests), "--cos-samples", "0", "--modes", ",".join(modes), "--out", out]
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    with open(out + ".txt", "w") as log:
        log.write(r.stdout)
    sys.stdout.write(r.stdout)
    if r.returncode:
        raise SystemExit("kvmesh bench kvcomm failed (%d): %s" % (r.returncode, " ".join(cmd)))
    return os.path.join(out, "kvcomm_team.json")


def load(path):
    d = json.load(open(path))
    modes = {m["mode"]: m for m in d["modes"]}
    dense = modes["dense"]
    degen = [x["role"] for x in d.get("degenerate_roles", [])]
    roles = d.get("roles", [])
    rows = []
    for name, m in modes.items():
        per = [m["accuracy_per_role"][k] - dense["accuracy_per_role"][k]
               for k in range(len(roles)) if roles[k] not in degen]
        rows.append({"mode": name, "acc": m["accuracy"], "diff": m["accuracy"] - dense["accuracy"],
                     "worst": min(per) if per else 0.0, "agree": 100 * m.get("greedy_agreement_with_dense", 0),
                     "reuse": 100 * m["reuse_rate"], "tok": 100 * m["token_reuse_beyond_prefix"]})
    return {"cell": "%s / %s" % (d["model"], d.get("workload", "team")), "requests": d["requests"],
            "degen": [x["role"] + " (" + x["why"] + ")" for x in d.get("degenerate_roles", [])], "rows": rows}


def table(cells):
    lines = []
    for c in cells:
        lines.append("**%s**, %d requests; degenerate roles left out: %s\n" % (c["cell"], c["requests"],
                                                                             ", ".join(c["degen"]) or "none"))
        lines.append("| mode | acc % | vs dense | worst role vs dense | agreement | calls reused | tok-reuse |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in c["rows"]:
            lines.append("| %s | %.1f | %+.1f | %+.1f | %.1f%% | %.1f%% | %.1f%% |" % (
                r["mode"], r["acc"], r["diff"], r["worst"], r["agree"], r["reuse"], r["tok"]))
        lines.append("")
    return "\n".join(lines)


def curve_points(c):
    return sorted([(r["tok"], r["diff"], r["mode"]) for r in c["rows"] if r["mode"] != "dense"])


def ascii_plot(cells, w=60, ylo=-8.0, yhi=1.0, step=0.5):
    """Accuracy difference to dense (rows, yhi down to ylo) against tok-reuse (columns, 0-100%); a point below ylo
    sits on the bottom row in upper case."""
    h = int(round((yhi - ylo) / step))
    grid = [[" "] * (w + 1) for _ in range(h + 1)]
    for i, c in enumerate(cells):
        for x, y, _ in curve_points(c):
            col = max(0, min(w, int(round(x / 100.0 * w))))
            ch = chr(ord("a") + i)
            if y < ylo:
                row, ch = h, ch.upper()
            else:
                row = max(0, min(h, int(round((yhi - y) / step))))
            grid[row][col] = ch
    out = ["accuracy vs dense (points, over the roles that are not degenerate) against the tokens past the exact",
           "prefix that keep another agent's KV (%%); one letter per cell, UPPER CASE = below %g points" % ylo]
    for r in range(h + 1):
        yv = yhi - r * step
        out.append("%6.1f %s|%s" % (yv, "-" if abs(yv + 1) < 1e-9 else " ", "".join(grid[r])))
    out.append("        +" + "-" * (w + 1))
    out.append("         0%" + " " * (w // 2 - 4) + "50%" + " " * (w // 2 - 4) + "100%")
    for i, c in enumerate(cells):
        pts = ", ".join("%s %.1f%%/%+.1f" % (m, x, y) for x, y, m in curve_points(c))
        out.append("  %s = %s: %s" % (chr(ord("a") + i), c["cell"], pts))
    return "\n".join(out)


YCLIP = -12.0  # the plot's lowest difference to dense; lower points are drawn on its bottom edge, labelled


def svg_plot(cells, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for c in cells:
            p = curve_points(c)
            ax.plot([x for x, _, _ in p], [y for _, y, _ in p], marker="o", label=c["cell"])
        ax.axhline(-1, ls="--", c="gray")
        ax.set_ylim(bottom=max(YCLIP, min([y for c in cells for _, y, _ in curve_points(c)] + [-2.0])) - 0.5, top=1)
        ax.set_xlabel("tokens past the exact prefix keeping another agent's KV (%)")
        ax.set_ylabel("accuracy vs dense (points)")
        ax.legend(fontsize=7)
        fig.savefig(path)
        return
    except ImportError:
        pass
    W, H, L, B = 640, 400, 60, 40
    pts = [(x, y) for c in cells for x, y, _ in curve_points(c)]
    ylo = max(min([y for _, y in pts] + [-2.0]), YCLIP)  # points below YCLIP sit on the bottom edge
    sx = lambda x: L + x / 100.0 * (W - L - 20)
    sy = lambda y: 20 + (1 - max(y, ylo)) / (1 - ylo) * (H - B - 20)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    s = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="11">' % (W, H),
         '<rect width="100%" height="100%" fill="white"/>',
         '<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="black"/>' % (L, H - B, W - 20, H - B),
         '<line x1="%d" y1="20" x2="%d" y2="%d" stroke="black"/>' % (L, L, H - B),
         '<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="gray" stroke-dasharray="4"/>' % (L, sy(-1), W - 20, sy(-1)),
         '<text x="%d" y="%d">tokens past the exact prefix keeping another agent\'s KV (%%)</text>' % (L + 60, H - 8),
         '<text x="12" y="14">accuracy vs dense (points)</text>']
    for t in range(0, 101, 20):
        s.append('<text x="%.1f" y="%d" text-anchor="middle">%d</text>' % (sx(t), H - B + 14, t))
    ystep = max(1, int(-ylo / 5))
    for t in range(0, int(ylo) - 1, -ystep):  # ticks from 0 down
        s.append('<text x="%d" y="%.1f" text-anchor="end">%d</text>' % (L - 4, sy(t) + 4, t))
    for i, c in enumerate(cells):
        p = curve_points(c)
        col = colors[i % len(colors)]
        s.append('<polyline fill="none" stroke="%s" points="%s"/>' % (col, " ".join("%.1f,%.1f" % (sx(x), sy(y)) for x, y, _ in p)))
        for x, y, m in p:
            s.append('<circle cx="%.1f" cy="%.1f" r="3" fill="%s"><title>%s: %s (%.1f%%, %+.1f)</title></circle>' % (
                sx(x), sy(y), col, c["cell"], m, x, y))
            if y < ylo:
                s.append('<text x="%.1f" y="%.1f" fill="%s">%s %+.1f</text>' % (sx(x) + 4, sy(y) - 4, col, m, y))
        s.append('<text x="%d" y="%d" fill="%s">%s</text>' % (W - 260, 34 + 14 * i, col, c["cell"]))
    s.append("</svg>")
    open(path, "w").write("\n".join(s) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvmesh", default="build/kvmesh")
    ap.add_argument("--models", default="models/minillama-2m,models/miniqwen3-6m")
    ap.add_argument("--workloads", default="team,pipeline,revise,arith")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--fracs", default="0.1,0.3,0.5,0.7,0.9",
                    help="recompute fractions of the blended policy without the guard (the default starts its guard at 0.5)")
    ap.add_argument("--out", default="results/kvcomm-curve")
    ap.add_argument("--from", dest="frm", default=None, help="redraw from the JSON files under this folder")
    a = ap.parse_args()
    a.fracs = [float(f) for f in a.fracs.split(",") if f]
    if a.frm:
        a.out = a.frm
        paths = sorted(glob.glob(os.path.join(a.frm, "*", "kvcomm_team.json")))
    else:
        os.makedirs(a.out, exist_ok=True)
        paths = [run_cell(a, m, w) for m in a.models.split(",") for w in a.workloads.split(",")]
    cells = [load(p) for p in paths]
    md = table(cells)
    open(os.path.join(a.out, "curve.md"), "w").write(md + "\n")
    txt = ascii_plot(cells)
    open(os.path.join(a.out, "curve.txt"), "w").write(txt + "\n")
    svg_plot(cells, os.path.join(a.out, "curve.svg"))
    print(md)
    print(txt)
    print("wrote %s/curve.md, curve.txt, curve.svg" % a.out, file=sys.stderr)


if __name__ == "__main__":
    main()
