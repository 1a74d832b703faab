/* cli_pager.h - the trace debugger's output: on a terminal in colour and through a pager ($KVMESH_PAGER, else
 * $PAGER, else "less -FRX"; "cat" or empty for none), plain when piped; --color auto|always|never (NO_COLOR
 * respected) and --no-pager (cli_pager.c). */
#ifndef KVM_CLI_PAGER_H
#define KVM_CLI_PAGER_H

#include <stdbool.h>
#include <stdio.h>

typedef enum { CLI_COLOR_AUTO = 0, CLI_COLOR_ALWAYS, CLI_COLOR_NEVER } cli_color_t;

typedef struct cli_out_opts {
    cli_color_t color;
    bool no_pager;
} cli_out_opts_t;

typedef struct cli_out {
    FILE *f;    /* where to write: stdout or the pager */
    FILE *pipe; /* the pager, or NULL */
    bool color;
} cli_out_t;

/* Removes --color WHEN / --color=WHEN / --no-pager from argv (anywhere) into *o. 0, or 2 after a usage error. */
int cli_out_strip_args(int *argc, char **argv, cli_out_opts_t *o, const char *who);
void cli_out_open(cli_out_t *out, const cli_out_opts_t *o);
/* Writes a view's text: coloured line by line when out->color (failures red, successes green, reuse yellow, heads
 * bold), else as it is. */
void cli_out_text(cli_out_t *out, const char *text);
void cli_out_close(cli_out_t *out);

#endif
