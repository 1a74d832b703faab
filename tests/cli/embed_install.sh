#!/usr/bin/env bash
# embed_install.sh - the public API from outside the tree: `cmake --install` the build into a temporary
# prefix, build examples/embed against that installed tree only (CMake package and pkg-config), run it.
# Args: kvmesh binary (its folder is the build to install), shared data dir (unused).
# Skipped (77) under the sanitizers: the ASan build's library needs the sanitizer runtime at link time;
# the release build runs this test.
set -u
bin="$1"
build="$(cd "$(dirname "$bin")" && pwd)"
here="$(cd "$(dirname "$0")/../.." && pwd)"
if [ -n "${KVM_SANITIZED:-}" ]; then echo "SKIP embed_install: sanitizer build (the release build runs it)"; exit 77; fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
fails=0
ok() { echo "ok   $1"; }
bad() { echo "FAIL $1"; fails=$((fails + 1)); }

cmake --install "$build" --prefix "$tmp/prefix" > "$tmp/install.log" 2>&1 && ok "cmake --install" || { cat "$tmp/install.log"; bad "cmake --install"; }
for f in include/kvmesh.h include/kvmesh_lab.h lib/libkvmesh.a lib/pkgconfig/kvmesh.pc lib/cmake/kvmesh/kvmeshConfig.cmake; do
  [ -f "$tmp/prefix/$f" ] && ok "installed $f" || bad "installed $f"
done
# the public header and its research companion are the only ones: nothing of the source tree is reachable from
# the example's build
[ "$(cd "$tmp/prefix/include" && find . -name '*.h' | sort | tr '\n' ' ')" == "./kvmesh.h ./kvmesh_lab.h " ] &&
  ok "only kvmesh.h and kvmesh_lab.h installed" || bad "only kvmesh.h and kvmesh_lab.h installed"

# 1. CMake package: examples/embed, and the program of docs/api.md (tour.c, step 2) as a second target of the same
# project with embed's rules, so that one configure (which probes the CUDA toolchain on a CUDA build) serves both
cp -r "$here/examples/embed" "$tmp/src"
python3 - "$here/docs/api.md" "$tmp/src/tour.c" <<'PY'
import re, sys
doc = open(sys.argv[1]).read()
blocks = [b for b in re.findall(r"```c\n(.*?)```", doc, re.S) if b.startswith("/* compiled: tour.c */")]
assert len(blocks) == 1, "docs/api.md: expected one /* compiled: tour.c */ block"
open(sys.argv[2], "w").write(blocks[0])
PY
sed -n '/^add_executable(embed/,$p' "$tmp/src/CMakeLists.txt" | sed 's/embed/tour/g' >> "$tmp/src/CMakeLists.txt"
cmake -S "$tmp/src" -B "$tmp/b" -DCMAKE_PREFIX_PATH="$tmp/prefix" > "$tmp/cfg.log" 2>&1
cfg=$?
if [ $cfg = 0 ] && cmake --build "$tmp/b" --target embed > "$tmp/build.log" 2>&1; then
  ok "examples/embed builds with find_package(kvmesh)"
  out="$("$tmp/b/embed" 2>&1)"
  grep -q '^run .*: ok$' <<< "$out" && grep -q '"writer"' <<< "$out" && ok "embed runs a workflow" || { echo "$out"; bad "embed runs a workflow"; }
  out="$("$tmp/b/embed" --model "$here/models/minillama-2m" 2>&1)"
  grep -q '^generated [0-9]* tokens' <<< "$out" && grep -q 'backend cpu' <<< "$out" && ok "embed on models/minillama-2m" || { echo "$out"; bad "embed on models/minillama-2m"; }
else
  cat "$tmp/cfg.log" "$tmp/build.log"; bad "examples/embed builds with find_package(kvmesh)"
fi

# 2. the program of docs/api.md, built the same way (its target in the project above)
if [ $cfg = 0 ] && cmake --build "$tmp/b" --target tour > "$tmp/tbuild.log" 2>&1; then
  ok "docs/api.md's program builds"
  (cd "$here" && "$tmp/b/tour" mock:echo) | grep -q '^ok {' && ok "docs/api.md's program runs (mock)" || bad "docs/api.md's program runs (mock)"
  out="$(cd "$here" && "$tmp/b/tour" 2>&1)"
  grep -q '^checker: [0-9]* prompt tokens' <<< "$out" && ok "docs/api.md's program runs (minillama-2m)" || { echo "$out"; bad "docs/api.md's program runs (minillama-2m)"; }
else
  cat "$tmp/cfg.log" "$tmp/tbuild.log"; bad "docs/api.md's program builds"
fi

# 3. pkg-config (C only; a CUDA build needs the CUDA linker, which the CMake package supplies)
if ! grep -q cudart "$tmp/prefix/lib/pkgconfig/kvmesh.pc"; then
  flags="$(PKG_CONFIG_PATH="$tmp/prefix/lib/pkgconfig" pkg-config --static --cflags --libs kvmesh)"
  if cc -std=c11 -Wall -Wextra -Werror -o "$tmp/embed-pc" "$here/examples/embed/embed.c" $flags > "$tmp/pc.log" 2>&1; then
    "$tmp/embed-pc" | grep -q '^run .*: ok$' && ok "embed built with pkg-config runs" || bad "embed built with pkg-config runs"
  else
    cat "$tmp/pc.log"; bad "embed builds with pkg-config"
  fi
else
  echo "SKIP pkg-config build: this library has the CUDA backend (link it through the CMake package)"
fi
[ "$fails" -eq 0 ] || { echo "$fails check(s) failed"; exit 1; }
