/* test_dir.h - a scratch directory for one test program: <build dir>/<name>_<pid>, made by the group setup and
 * removed with everything in it by the group teardown. Include after <cmocka.h>; the test is compiled with
 * KVM_BINARY_DIR (CMakeLists.txt). */
#ifndef KVM_TEST_DIR_H
#define KVM_TEST_DIR_H

#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

/* Fills dir[cap] and makes the directory; 0, or -1 (the test group does not start). */
static inline int test_dir_make(char *dir, size_t cap, const char *name) {
    snprintf(dir, cap, "%s/%s_%d", KVM_BINARY_DIR, name, (int)getpid());
    return mkdir(dir, 0755);
}

/* Removes dir and what the tests left in it (the directory name is ours: no quote in it). */
static inline int test_dir_remove(const char *dir) {
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf -- '%s'", dir);
    return system(cmd) == 0 ? 0 : -1;
}

#endif
