#!/usr/bin/env bash
# bench_kvcomm.sh - `kvmesh bench kvcomm` on the fidelity workloads (docs/kvcomm.md §5.2) at a few requests each:
# every workload runs with its own agents, the team's degenerate checker is named and left out of acc%, the
# default/spec/blend@F/gate@S/oselect@F/aselect@F/wselect@F modes run, bad workloads and modes (and more than 8 of
# them) are refused, and scripts/bench/kvcomm_curve.py
# redraws its table, ASCII and SVG curve from the bench's JSON. Args: kvmesh binary, shared data dir (unused).
# Exits 77 when the bundled model is absent.
set -u
bin="$1"
here="$(cd "$(dirname "$0")/../.." && pwd)"
model="$here/models/minillama-2m"
fails=0
ok() { echo "ok   $1"; }
bad() { echo "FAIL $1"; fails=$((fails + 1)); }
has() { # name haystack needle
  case "$2" in *"$3"*) ok "$1" ;; *) bad "$1: no '$3' in: $2" ;; esac
}

"$bin" bench kvcomm --model "$model" --workload nope >/dev/null 2>&1
[ $? -eq 2 ] && ok "unknown workload -> 2" || bad "unknown workload did not exit 2"
[ -f "$model/config.json" ] || { echo "SKIPPED: $model not found"; exit 77; }
export KVM_THREADS=${KVM_THREADS:-2}

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
out="$("$bin" bench kvcomm --model "$model" --backend cpu --workload team --requests 6 --warm 2 --cos-samples 0 \
       --modes dense,spec,default,blend@0.9,gate@0.05,oselect@0.5,aselect@0.5,wselect@0.5 --out "$tmp/team" 2>/dev/null)"
[ $? -eq 0 ] && ok "team exits 0" || bad "team exit status"
has "team: the degenerate checker is named" "$out" "degenerate role left out of acc%: checker (dense 0.0%, always 'no')"
for m in dense spec default blend@0.9 gate@0.05 oselect@0.5 aselect@0.5 wselect@0.5; do
  printf '%s\n' "$out" | grep -q "^$m " && ok "team: mode $m" || bad "team: no line for mode $m"
done
has "team: the default's switches in the JSON" "$(cat "$tmp/team/kvcomm_team.json")" "recompute_below=32 recompute_text=64 recompute_frac=0.50 guard=on"
for x in error attention weighted; do
  has "team: the selection oracle ($x) in the JSON" "$(cat "$tmp/team/kvcomm_team.json")" "recompute_frac=0.50 oracle=0 oracle_select=$x"
done
has "team: the degenerate role in the JSON" "$(tr -d ' \t\n' <"$tmp/team/kvcomm_team.json")" '"degenerate_roles":[{"role":"checker"'
for w in pipeline:extractor:answerer revise:solver:reviser arith:result:reverse; do
  IFS=: read -r name r0 r1 <<<"$w"
  o="$("$bin" bench kvcomm --model "$model" --backend cpu --workload "$name" --requests 3 --warm 1 --cos-samples 0 \
       --modes dense,default 2>/dev/null)"
  [ $? -eq 0 ] && ok "$name exits 0" || bad "$name exit status"
  printf '%s\n' "$o" | grep -q "^mode .*$r0 .*$r1 " && ok "$name: roles $r0, $r1" || bad "$name: roles $r0, $r1 not in: $o"
done
"$bin" bench kvcomm --model "$model" --workload team --requests 2 --modes blend@2 >/dev/null 2>err.$$
[ $? -ne 0 ] && grep -q "recompute_frac" err.$$ && ok "blend@2 is refused, naming the switch" || bad "blend@2: $(cat err.$$)"
rm -f err.$$
"$bin" bench kvcomm --model "$model" --workload team --requests 2 --modes dense,spec,default,dense,spec,default,dense,spec,default \
  >/dev/null 2>err.$$
[ $? -eq 2 ] && grep -q "at most 8 modes" err.$$ && ok "nine modes are refused (not cut to eight)" || bad "nine modes: $(cat err.$$)"
rm -f err.$$

if command -v python3 >/dev/null; then
  python3 "$here/scripts/bench/kvcomm_curve.py" --from "$tmp" >"$tmp/curve.out" 2>&1
  [ $? -eq 0 ] && ok "kvcomm_curve.py --from exits 0" || bad "kvcomm_curve.py: $(cat "$tmp/curve.out")"
  has "curve table" "$(cat "$tmp/curve.md" 2>/dev/null)" "| default |"
  has "curve ASCII" "$(cat "$tmp/curve.txt" 2>/dev/null)" "minillama-2m / team: "
  python3 -c "import sys, xml.dom.minidom as m; m.parse(sys.argv[1])" "$tmp/curve.svg" && ok "curve SVG parses" ||
    bad "curve SVG"
else
  echo "SKIPPED: python3 not found (kvcomm_curve.py)"
fi

# the TTFT workload says when its measured calls were in the fidelity guard's warm-up (checked before serving), and
# not when the guard is off
t="$("$bin" bench kvcomm --synthetic tiny-llama --backend cpu --agents 2 --input 64 --prefix 32 --output 4 --warmup 2 \
     --requests 2 --set kvcomm.preset=blend 2>/dev/null)"
has "ttft: the guard's warm-up is named" "$t" "in their agent's guard warm-up"
t="$("$bin" bench kvcomm --synthetic tiny-llama --backend cpu --agents 2 --input 64 --prefix 32 --output 4 --warmup 2 \
     --requests 2 --set kvcomm.preset=blend --set kvcomm.guard=off 2>/dev/null)"
case "$t" in *"guard warm-up"*) bad "ttft: a guard line without the guard" ;; *"reuse rate"*) ok "ttft: no guard line with kvcomm.guard=off" ;;
  *) bad "ttft with kvcomm.guard=off: $t" ;; esac

[ "$fails" -eq 0 ] || { echo "$fails failure(s)"; exit 1; }
echo "all ok"
