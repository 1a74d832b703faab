/* minigen.c - a standalone `kvmesh minitasks` (the generator only, libc + status module + core PRNG) for the GPU
 * training machine, which has no kvmesh dependencies installed. Built by scripts/train/build_minigen.sh:
 *   cc -O2 -static -Iinclude -Ilab scripts/train/minigen.c lab/cmd_minitasks.c lab/minitasks.c runtime/core/rng.c
 *      runtime/core/status.c
 * Usage is that of `kvmesh minitasks` (gen / roles). */
#include "lab.h"

int main(int argc, char **argv) { return kvm_lab_cmd_minitasks(argc, argv); }
