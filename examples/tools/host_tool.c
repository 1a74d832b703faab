/* host_tool.c - a program that gives its workflows a tool: 'weather', a C function registered with a JSON Schema
 * for its arguments (kvm_runtime_add_tool), which a workflow's nodes call as ctx:tool("weather", {...}). Only the
 * public header is used.
 *
 *   host_tool WORKFLOW.lua [--input KEY=VALUE ...] [--mock | --model PATH] [--trace DIR]
 *
 * e.g. host_tool examples/host_tool.lua --input city=Oslo --mock. Prints each step, each tool call, the run's
 * outputs as JSON and its status; exits 0 when the run ended well. The forecast is made up (a hash of the city's
 * name): the point is the path from a script to the program's code and back, not the weather. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <kvmesh.h>

/* The arguments' schema: the library checks every call against it before weather() runs. */
static const char *const WEATHER_SCHEMA =
    "{\"type\": \"object\","
    " \"properties\": {"
    "   \"city\": {\"type\": \"string\", \"minLength\": 1, \"maxLength\": 80, \"description\": \"a city name\"},"
    "   \"days\": {\"type\": \"integer\", \"minimum\": 1, \"maximum\": 7, \"description\": \"how many days\"}},"
    " \"required\": [\"city\"],"
    " \"additionalProperties\": false}";

/* Finds "key": in a JSON object's text and returns the text after it (this example reads its two known fields
 * without a JSON library; the library has checked them against the schema already). */
static const char *field(const char *json, const char *key) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = strstr(json, pat);
    return p ? p + strlen(pat) : NULL;
}

static char *text_copy(const char *s) {
    char *p = kvm_malloc(strlen(s) + 1); /* the library frees results with kvm_free */
    if (p) strcpy(p, s);
    return p;
}

/* weather({city, days = 1}) -> {"days": [{"day": 1, "sky": "...", "high_c": N}, ...]} */
static int weather(void *ud, const kvm_tool_call_t *call, char **result) {
    int *n_calls = ud;
    ++*n_calls;
    printf("  tool %s%s from node '%s'\n", call->tool, call->args_json, call->node);
    const char *city = field(call->args_json, "city"), *days_at = field(call->args_json, "days");
    int days = days_at ? atoi(days_at) : 1;
    unsigned h = 2166136261u;
    for (const char *c = city ? city + 1 : ""; *c && *c != '"'; c++) h = (h ^ (unsigned char)*c) * 16777619u;
    static const char *const skies[] = {"sunny", "cloudy", "rainy", "windy", "snowy"};
    char buf[1024];
    size_t n = (size_t)snprintf(buf, sizeof buf, "{\"days\": [");
    for (int d = 1; d <= days; d++, h = h * 1103515245u + 12345u)
        n += (size_t)snprintf(buf + n, sizeof buf - n, "%s{\"day\": %d, \"sky\": \"%s\", \"high_c\": %d}", d > 1 ? ", " : "",
                              d, skies[(h >> 8) % 5], (int)((h >> 16) % 30) - 5);
    snprintf(buf + n, sizeof buf - n, "]}");
    *result = text_copy(buf);
    return *result ? 0 : KVM_ENOMEM;
}

static void on_step(void *ud, const kvm_step_event_t *e) {
    (void)ud;
    printf("  step %d %-9s %-5s %s%s%s\n", e->superstep, e->node, e->op, e->status ? kvm_errname(e->status) : "ok",
           e->text ? " | " : "", e->text ? e->text : "");
}

/* Appends "KEY": "VALUE" (VALUE escaped) to the inputs' JSON text. */
static int add_input(char *json, size_t cap, const char *kv) {
    const char *eq = strchr(kv, '=');
    if (!eq || eq == kv) return -1;
    size_t n = strlen(json);
    n += (size_t)snprintf(json + n, cap - n, "%s\"%.*s\": \"", n > 1 ? ", " : "", (int)(eq - kv), kv);
    for (const char *c = eq + 1; *c && n + 8 < cap; c++) {
        if (*c == '"' || *c == '\\') json[n++] = '\\', json[n++] = *c;
        else if ((unsigned char)*c < 0x20) n += (size_t)snprintf(json + n, cap - n, "\\u%04x", (unsigned char)*c);
        else json[n++] = *c;
    }
    json[n] = '\0';
    return snprintf(json + n, cap - n, "\"") < (int)(cap - n) ? 0 : -1;
}

static int usage(void) {
    fprintf(stderr, "usage: host_tool WORKFLOW.lua [--input KEY=VALUE ...] [--mock | --model PATH] [--trace DIR]\n");
    return 2;
}

int main(int argc, char **argv) {
    const char *script = NULL, *model = NULL, *trace = NULL;
    char inputs[4096] = "{";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--mock")) model = "mock:echo";
        else if (!strcmp(argv[i], "--model") && i + 1 < argc) model = argv[++i];
        else if (!strcmp(argv[i], "--trace") && i + 1 < argc) trace = argv[++i];
        else if (!strcmp(argv[i], "--input") && i + 1 < argc) {
            if (add_input(inputs, sizeof inputs - 2, argv[++i])) {
                fprintf(stderr, "host_tool: --input %s: not KEY=VALUE (or too long)\n", argv[i]);
                return 2;
            }
        } else if (argv[i][0] != '-' && !script) script = argv[i];
        else return usage();
    }
    if (!script) return usage();
    strcat(inputs, "}");

    kvm_runtime_params_t rp = kvm_runtime_default_params();
    rp.model.backend = "cpu";
    rp.model_override = model;
    rp.trace_root = trace;
    rp.quiet = true;
    kvm_runtime_t *rt = kvm_runtime_create(&rp);
    int calls = 0, rc = 1;
    if (!rt || kvm_runtime_add_tool(rt, "weather", "The forecast of a city for the next days", WEATHER_SCHEMA, weather, &calls)) {
        fprintf(stderr, "host_tool: %s\n", kvm_errmsg());
        kvm_runtime_free(rt);
        return 1;
    }
    kvm_workflow_params_t wp = kvm_workflow_default_params();
    wp.on_step = on_step;
    kvm_workflow_t *wf = kvm_workflow_load(rt, script, &wp);
    if (!wf) {
        fprintf(stderr, "host_tool: %s\n", kvm_errmsg());
        kvm_runtime_free(rt);
        return 1;
    }
    kvm_run_params_t run_p = kvm_run_default_params();
    run_p.inputs_json = inputs;
    kvm_run_t *run = kvm_run_start(wf, &run_p);
    if (!run || kvm_workflow_drive(wf) < 0) {
        fprintf(stderr, "host_tool: %s\n", kvm_errmsg());
    } else {
        const char *msg = NULL;
        int st = kvm_run_status(run, &msg);
        char *out = st == 0 ? kvm_run_outputs_json(run) : NULL;
        if (out) printf("outputs: %s\n", out);
        printf("status: %s (%d tool calls)\n", st == 0 ? "ok" : kvm_errname(st), calls);
        if (st) fprintf(stderr, "%s\n", msg ? msg : "");
        kvm_free(out);
        rc = st != 0;
    }
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
    return rc;
}
