/* fuzz_util.c - see fuzz_util.h. */
#include "fuzz_util.h"

#include <kvmesh.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char g_dir[256];

int fz_split(const uint8_t *data, size_t size, fz_part_t *parts, int max) {
    const size_t sl = sizeof FZ_SEP - 1;
    int n = 0;
    size_t start = 0;
    for (size_t i = 0; n < max - 1 && i + sl <= size; i++) {
        if (memcmp(data + i, FZ_SEP, sl) == 0) {
            parts[n++] = (fz_part_t){data + start, i - start};
            start = i + sl;
            i = start - 1;
        }
    }
    parts[n++] = (fz_part_t){data + start, size - start};
    return n;
}

static void rm_tree(const char *path) {
    struct stat st;
    if (lstat(path, &st) != 0) return;
    if (S_ISDIR(st.st_mode)) {
        char cmd[512];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", path);
        if (system(cmd) != 0) fprintf(stderr, "fuzz: could not remove %s\n", path);
        return;
    }
    unlink(path);
}

static void remove_dir(void) {
    if (g_dir[0]) rm_tree(g_dir);
}

const char *fz_dir(void) {
    if (g_dir[0]) return g_dir;
    struct stat st;
    const char *base = stat("/dev/shm", &st) == 0 && access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    snprintf(g_dir, sizeof g_dir, "%s/kvmesh-fuzz-XXXXXX", base);
    if (!mkdtemp(g_dir)) {
        fprintf(stderr, "fuzz: mkdtemp %s: %s\n", g_dir, strerror(errno));
        abort();
    }
    atexit(remove_dir);
    return g_dir;
}

static void join(const char *name, char *path, size_t cap) {
    if ((size_t)snprintf(path, cap, "%s/%s", fz_dir(), name) >= cap) {
        fprintf(stderr, "fuzz: path too long: %s\n", name);
        abort();
    }
}

void fz_write(const char *name, const void *data, size_t size, char *path, size_t cap) {
    join(name, path, cap);
    FILE *f = fopen(path, "wb");
    if (!f || (size && fwrite(data, 1, size, f) != size) || fclose(f) != 0) {
        fprintf(stderr, "fuzz: cannot write %s: %s\n", path, strerror(errno));
        abort();
    }
}

void fz_mkdir(const char *name, char *path, size_t cap) {
    join(name, path, cap);
    if (mkdir(path, 0700) != 0 && errno != EEXIST) {
        fprintf(stderr, "fuzz: mkdir %s: %s\n", path, strerror(errno));
        abort();
    }
}

void fz_unlink(const char *name) {
    char path[512];
    join(name, path, sizeof path);
    unlink(path);
}

void fz_init_library(void) {
    kvm_log_set_level(KVM_LOG_OFF);
    kvm_set_threads(1);
    (void)fz_dir();
}

char *fz_cstr(const uint8_t *data, size_t size) {
    char *s = malloc(size + 1);
    if (!s) abort();
    if (size) memcpy(s, data, size);
    s[size] = 0;
    return s;
}

void fz_report(const char *what, int rc) {
    static int verbose = -1;
    if (verbose < 0) verbose = getenv("FZ_VERBOSE") && atoi(getenv("FZ_VERBOSE")) > 0;
    if (verbose) fprintf(stderr, "%s: %d %s\n", what, rc, rc ? kvm_errmsg() : "ok");
}
