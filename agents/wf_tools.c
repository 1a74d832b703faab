/* wf_tools.c - host tools: functions of the embedding program registered with a JSON Schema for their arguments
 * (kvm_runtime_add_tool) and called from a func/tool node as ctx:tool(name, args). The arguments are converted to
 * JSON and validated before the call (runtime/core/jsonschema.h); the result comes back as Lua data. A call is the
 * run's: its token and wall-time budgets are checked before it, its wall-time budget after it (the callback's time
 * is wall time of the run, not Lua CPU time), and it is charged to the instruction budget like an agent call. Each
 * call leaves a log record in the run's trace ("tool NAME(ARGS) -> RESULT"). The sandbox gains no I/O: a tool is
 * the program's code, reached only by the names the program registered. */
#include "wf_internal.h"

#include <stdio.h>
#include <string.h>

#include "../runtime/core/json.h"
#include "../runtime/core/jsonschema.h"

/* ---- registration -------------------------------------------------------------------------------------------- */

static bool tool_name_ok(const char *name) {
    size_t n = name ? strlen(name) : 0;
    if (n == 0 || n > 64 || (name[0] >= '0' && name[0] <= '9')) return false;
    for (const char *c = name; *c; c++)
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') || *c == '_' || *c == '-' ||
              *c == '.'))
            return false;
    return true;
}

int wf_tool_new(const char *name, const char *description, const char *schema_json, kvm_tool_fn fn, void *ud,
                wf_tool_t **out) {
    *out = NULL;
    if (!fn) return kvm_seterr(KVM_EINVAL, "tool '%.64s': no function given", name ? name : "(null)");
    if (!tool_name_ok(name))
        return kvm_seterr(KVM_EINVAL, "tool name '%.80s': 1 to 64 letters, digits, '_', '-' or '.', not starting with a digit",
                          name ? name : "(null)");
    char what[96];
    snprintf(what, sizeof what, "tool '%s'", name);
    cJSON *schema = NULL;
    const char *text = schema_json ? schema_json : "{\"type\":\"object\"}";
    int rc = kvm_json_parse(text, strlen(text), what, &schema);
    if (rc) return kvm_errctx(rc, "%s: schema", what);
    if ((rc = kvm_jsonschema_check(schema, what))) {
        cJSON_Delete(schema);
        return rc;
    }
    wf_tool_t *t = kvm_calloc(1, sizeof *t);
    char *nm = kvm_strdup(name), *desc = kvm_strdup(description ? description : "");
    if (!t || !nm || !desc) {
        kvm_free(t);
        kvm_free(nm);
        kvm_free(desc);
        cJSON_Delete(schema);
        return kvm_seterr(KVM_ENOMEM, "%s: out of memory", what);
    }
    *t = (wf_tool_t){.name = nm, .description = desc, .schema = schema, .fn = fn, .ud = ud};
    *out = t;
    return 0;
}

void wf_tool_free(wf_tool_t *t) {
    if (!t) return;
    kvm_free(t->name);
    kvm_free(t->description);
    cJSON_Delete(t->schema);
    kvm_free(t);
}

/* ---- ctx:tool ------------------------------------------------------------------------------------------------- */

/* The tool named name, or NULL. */
static const wf_tool_t *find_tool(const kvm_workflow_t *wf, const char *name) {
    for (int i = 0; i < wf->o.n_tools; i++)
        if (!strcmp(wf->o.tools[i]->name, name)) return wf->o.tools[i];
    return NULL;
}

/* Raises "ctx:tool: no tool 'x' is registered (tools: a, b)". */
static int no_such_tool(lua_State *L, const kvm_workflow_t *wf, const char *name) {
    char list[512] = "";
    size_t n = 0;
    for (int i = 0; i < wf->o.n_tools && n < sizeof list - 80; i++)
        n += (size_t)snprintf(list + n, sizeof list - n, "%s%s", i ? ", " : "", wf->o.tools[i]->name);
    return luaL_error(L, "ctx:tool: no tool '%s' is registered (%s%s)", name, wf->o.n_tools ? "tools: " : "the program registered none",
                      list);
}

/* A trace log record of a call: "tool NAME(ARGS) -> RESULT" or "... failed: MESSAGE" (texts cut to 2,000 bytes). */
static void trace_call(wf_run_t *r, const char *name, const char *args, const char *res, int rc) {
    if (!r->trace) return;
    char msg[4200];
    snprintf(msg, sizeof msg, "tool %s(%.2000s) %s %.2000s", name, args, rc ? "failed:" : "->", res ? res : "null");
    kvm_trace_log_rec_t rec = {.level = rc ? "warn" : "info", .msg = msg, .superstep = r->superstep};
    if (kvm_trace_write_log(r->trace, &rec)) {
        KVM_LOGW("run %s: trace write failed (%s); tracing stops for this run", r->id, kvm_errmsg());
        kvm_trace_close(r->trace);
        r->trace = NULL;
    }
}

static int push_json_protected(lua_State *L) {
    wf_lua_push_json(L, lua_touserdata(L, 1));
    return 1;
}

/* ctx:tool(name [, args]) -> the tool's result as Lua data (nil for none). args: a table (nil = {}). Raises on an
 * unknown tool, arguments the schema refuses, a failed call or a result that is not JSON. Only from a node's own
 * code (the run's budgets are charged). */
int wf_ctx_tool(lua_State *L) {
    void *ud;
    lua_getallocf(L, &ud);
    kvm_workflow_t *wf = ud;
    wf_run_t *r = wf->cur_run;
    const wf_task_t *t = NULL;
    for (int i = 0; r && i < r->n_tasks; i++)
        if (r->tasks[i].co == L && r->tasks[i].status == WF_T_RUNNING) t = &r->tasks[i];
    if (!t)
        return luaL_error(L, "ctx:tool must be called from a func/tool node's own code (not from a predicate, router, "
                             "reducer or a coroutine the script created)");
    const char *name = luaL_checkstring(L, 2);
    const wf_tool_t *tool = find_tool(wf, name);
    if (!tool) return no_such_tool(L, wf, name);
    if (!lua_isnoneornil(L, 3) && !lua_istable(L, 3))
        return luaL_error(L, "ctx:tool: tool '%s': the arguments must be a table (got %s)", name, luaL_typename(L, 3));
    const wf_graph_t *g = wf->g;
    long used = r->tokens_in + r->tokens_out;
    double ms = (double)(kvm_now_ns() - r->t0_mono) / 1e6;
    if (g->lim_tokens > 0 && used >= g->lim_tokens)
        wf_budget_kill(L, "ctx:tool: graph '%.40s' used %ld tokens, over its token budget of %ld", g->name, used, g->lim_tokens);
    if (g->lim_wall_ms > 0 && ms > (double)g->lim_wall_ms)
        wf_budget_kill(L, "ctx:tool: graph '%.40s' ran past its wall-time budget of %ld ms", g->name, g->lim_wall_ms);
    wf_charge(L, WF_CALL_INSTRUCTIONS);

    cJSON *args = lua_isnoneornil(L, 3) ? cJSON_CreateObject() : wf_lua_to_json(L, 3);
    if (!args) return luaL_error(L, "ctx:tool: tool '%s': the arguments: %s", name, kvm_errmsg());
    if (kvm_jsonschema_validate(tool->schema, args, "args")) {
        cJSON_Delete(args);
        return luaL_error(L, "ctx:tool: tool '%s': %s", name, kvm_errmsg());
    }
    char *text = cJSON_PrintUnformatted(args);
    cJSON_Delete(args);
    if (!text) return luaL_error(L, "ctx:tool: tool '%s': out of memory", name);
    wf_charge(L, (double)strlen(text));

    kvm_tool_call_t call = {.tool = name, .args_json = text, .run_id = r->id, .node = g->nodes[t->node].name,
                            .ms_left = g->lim_wall_ms > 0 ? (double)g->lim_wall_ms - ms : -1};
    char *res = NULL;
    uint64_t t0 = kvm_now_ns();
    int rc = tool->fn(tool->ud, &call, &res);
    uint64_t spent = kvm_now_ns() - t0;
    if (r->budget.slice_t0) r->budget.slice_t0 += spent; /* the program's time, not the script's CPU time */
    trace_call(r, name, text, res, rc);
    cJSON_free(text);
    if (rc) { /* the message is copied before the raise: nothing C-side survives it */
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", res ? res : kvm_strerror(rc));
        kvm_free(res);
        return luaL_error(L, "ctx:tool: tool '%s': %s", name, msg);
    }
    ms = (double)(kvm_now_ns() - r->t0_mono) / 1e6;
    if (g->lim_wall_ms > 0 && ms > (double)g->lim_wall_ms) {
        kvm_free(res);
        wf_budget_kill(L, "ctx:tool: tool '%s' returned after graph '%.40s' ran past its wall-time budget of %ld ms", name,
                       g->name, g->lim_wall_ms);
    }
    if (!res) return 0;
    size_t len = strlen(res);
    wf_charge(L, (double)len);
    cJSON *j = NULL;
    rc = kvm_json_parse(res, len, "its result", &j);
    kvm_free(res);
    if (rc) return luaL_error(L, "ctx:tool: tool '%s': %s", name, kvm_errmsg());
    lua_pushcfunction(L, push_json_protected);
    lua_pushlightuserdata(L, j);
    int st = lua_pcall(L, 1, 1, 0);
    cJSON_Delete(j);
    return st == LUA_OK ? 1 : lua_error(L);
}
