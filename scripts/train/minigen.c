/* minigen.c - a standalone `kvmesh minitasks` (the generator only, libc + status module + core PRNG) for the GPU
 * training machine, which has no kvmesh dependencies installed. Built by scripts/train/build_minigen.sh:
 *   cc -O2 -static -I. scripts/train/minigen.c cli/cmd_minitasks.c runtime/eval/minitasks.c runtime/core/rng.c runtime/core/status.c
 * Usage is that of `kvmesh minitasks` (gen / roles). */
int cmd_minitasks(int argc, char **argv);

int main(int argc, char **argv) { return cmd_minitasks(argc, argv); }
