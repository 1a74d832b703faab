/* cli_tools.h - `--tool NAME=COMMAND` / `--tool-schema NAME=FILE`: host tools of the command line (cli_tools.c). */
#ifndef KVM_CLI_TOOLS_H
#define KVM_CLI_TOOLS_H

#include <stdbool.h>

#include <kvmesh.h>

typedef struct cli_tools cli_tools_t;

/* Adds a --tool (schema false: spec NAME=COMMAND) or --tool-schema (NAME=FILE) option to *ts (made on first use).
 * 0; 2 after printing a usage error (who: "kvmesh run"); 1 out of memory. */
int cli_tools_add(cli_tools_t **ts, const char *spec, bool schema, const char *who);
/* Registers every tool of ts (NULL: none) with rt. 0, or 2 after printing what is wrong (a schema file that cannot
 * be read, a schema the library refuses, a schema without its tool). ts must outlive rt's runs. */
int cli_tools_register(cli_tools_t *ts, kvm_runtime_t *rt, const char *who);
void cli_tools_free(cli_tools_t *ts);

#endif
