/* fuzz_util.h - what the libFuzzer targets of fuzz/ share (not part of the library).
 *
 * The loaders take paths, so a target writes its input to files of a private temporary directory
 * (under /dev/shm when it exists: tmpfs keeps an execution in microseconds) that is removed at exit.
 * An input may hold several files: fz_split cuts it at the separator FZ_SEP ("\n@@\n"), which the
 * dictionaries (fuzz/dict/) and the seed corpora (fuzz/corpus/) use. */
#ifndef KVM_FUZZ_UTIL_H
#define KVM_FUZZ_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define FZ_SEP "\n@@\n"

/* Aborts (a crash libFuzzer reports and saves) when an invariant of the code under test is broken. */
#define FZ_CHECK(target, cond)                                                                          \
    do {                                                                                                \
        if (!(cond)) {                                                                                  \
            fprintf(stderr, "%s: invariant broken: %s (%s:%d)\n", target, #cond, __FILE__, __LINE__); \
            abort();                                                                                    \
        }                                                                                               \
    } while (0)
#define FZ_MAX_PARTS 4

typedef struct fz_part {
    const uint8_t *data;
    size_t size;
} fz_part_t;

/* Cuts data[0..size) at FZ_SEP into at most max parts (the last one keeps any further separators).
 * Returns the number of parts (>= 1). */
int fz_split(const uint8_t *data, size_t size, fz_part_t *parts, int max);
/* The private directory (created on first use, removed with its files at exit). */
const char *fz_dir(void);
/* Writes data to fz_dir()/name (sub-directories of fz_dir() must exist: fz_mkdir) and puts its path in
 * path[cap]; aborts on an I/O error (the harness, not the code under test, failed). */
void fz_write(const char *name, const void *data, size_t size, char *path, size_t cap);
/* Creates fz_dir()/name (if missing) and puts its path in path[cap]. */
void fz_mkdir(const char *name, char *path, size_t cap);
/* Removes fz_dir()/name (a file), if present. */
void fz_unlink(const char *name);
/* The library's log off (the targets check behaviour, not warnings) and its one-time set-up done. */
void fz_init_library(void);
/* With FZ_VERBOSE=1 in the environment, prints "what: rc message" (to see what the seeds reach). */
void fz_report(const char *what, int rc);
/* A NUL-terminated copy of data[0..size) from malloc (the caller frees it with free()). */
char *fz_cstr(const uint8_t *data, size_t size);

#endif
