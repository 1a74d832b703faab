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
#include "../runtime/core/sb.h"

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

static void tool_free(wf_tool_t *t) {
    if (!t) return;
    kvm_free(t->name);
    kvm_free(t->description);
    cJSON_Delete(t->schema);
    kvm_free(t);
}

/* The tool named name in ts, or NULL. */
static const wf_tool_t *find_tool(const wf_tools_t *ts, const char *name) {
    for (int i = 0; ts && i < ts->n; i++)
        if (!strcmp(ts->v[i]->name, name)) return ts->v[i];
    return NULL;
}

int wf_tools_add(wf_tools_t *ts, const char *name, const char *description, const char *schema_json, kvm_tool_fn fn,
                 void *ud) {
    if (!fn) return kvm_seterr(KVM_EINVAL, "tool '%.64s': no function given", name ? name : "(null)");
    if (!tool_name_ok(name))
        return kvm_seterr(KVM_EINVAL, "tool name '%.80s': 1 to 64 letters, digits, '_', '-' or '.', not starting with a digit",
                          name ? name : "(null)");
    if (find_tool(ts, name)) return kvm_seterr(KVM_EINVAL, "tool '%s': registered already", name);
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
    wf_tool_t **v = kvm_realloc(ts->v, (size_t)(ts->n + 1) * sizeof *v);
    if (v) ts->v = v;
    if (!t || !nm || !desc || !v) {
        kvm_free(t);
        kvm_free(nm);
        kvm_free(desc);
        cJSON_Delete(schema);
        return kvm_seterr(KVM_ENOMEM, "%s: out of memory", what);
    }
    *t = (wf_tool_t){.name = nm, .description = desc, .schema = schema, .fn = fn, .ud = ud};
    ts->v[ts->n++] = t;
    return 0;
}

int wf_tools_remove(wf_tools_t *ts, const char *name) {
    for (int i = 0; i < ts->n; i++)
        if (!strcmp(ts->v[i]->name, name)) {
            tool_free(ts->v[i]);
            memmove(ts->v + i, ts->v + i + 1, (size_t)(ts->n - i - 1) * sizeof *ts->v);
            ts->n--;
            return 0;
        }
    return kvm_seterr(KVM_ENOENT, "tool '%.64s': not registered", name);
}

void wf_tools_clear(wf_tools_t *ts) {
    for (int i = 0; i < ts->n; i++) tool_free(ts->v[i]);
    kvm_free(ts->v);
    *ts = (wf_tools_t){0};
}

/* ---- ctx:tool ------------------------------------------------------------------------------------------------- */

/* Raises "ctx:tool: no tool 'x' is registered (tools: a, b)". */
static int no_such_tool(lua_State *L, const wf_tools_t *ts, const char *name) {
    char list[512] = "";
    size_t n = 0;
    int count = ts ? ts->n : 0;
    for (int i = 0; i < count && n < sizeof list - 80; i++)
        n += (size_t)snprintf(list + n, sizeof list - n, "%s%s", i ? ", " : "", ts->v[i]->name);
    return luaL_error(L, "ctx:tool: no tool '%s' is registered (%s%s)", name, count ? "tools: " : "the program registered none",
                      list);
}

/* A trace log record of a call: "tool NAME(ARGS) -> RESULT" or "... failed: MESSAGE"; args NULL: the answer of a call
 * that waited, "tool NAME answered -> RESULT" (texts cut to 2,000 bytes). */
static void trace_call(wf_run_t *r, const char *name, const char *args, const char *res, int rc) {
    if (!r->trace) return;
    char msg[4200];
    if (args) snprintf(msg, sizeof msg, "tool %s(%.2000s) %s %.2000s", name, args, rc ? "failed:" : "->", res ? res : "null");
    else snprintf(msg, sizeof msg, "tool %s answered %s %.2000s", name, rc ? "with an error:" : "->", res ? res : "null");
    kvm_trace_log_rec_t rec = {.level = rc ? "warn" : "info", .msg = msg, .superstep = r->superstep};
    if (kvm_trace_write_log(r->trace, &rec)) /* the trace may be shared with the runs of subgraphs: left open */
        KVM_LOGW("run %s: a tool call's trace record could not be written (%s)", r->id, kvm_errmsg());
}

/* Milliseconds from now until the monotonic time deadline_ns (negative once passed). */
static double ms_until(uint64_t deadline_ns) { return ((double)deadline_ns - (double)kvm_now_ns()) / 1e6; }

static int push_json_protected(lua_State *L) {
    wf_lua_push_json(L, lua_touserdata(L, 1));
    return 1;
}

/* Validates a result's JSON text and pushes it (protected: a memory error must not leak j). 1 value pushed, or raises
 * "ctx:tool: tool 'x': its result: ...". Frees res. */
static int push_result(lua_State *L, const char *name, char *res) {
    if (!res) {
        lua_pushnil(L);
        return 1;
    }
    size_t len = strlen(res);
    wf_charge(L, (double)len);
    cJSON *j = NULL;
    int rc = kvm_json_parse(res, len, "its result", &j);
    kvm_free(res);
    if (rc) return luaL_error(L, "ctx:tool: tool '%s': %s", name, kvm_errmsg());
    lua_pushcfunction(L, push_json_protected);
    lua_pushlightuserdata(L, j);
    int st = lua_pcall(L, 1, 1, 0);
    cJSON_Delete(j);
    return st == LUA_OK ? 1 : lua_error(L);
}

/* Where ctx:tool goes on once a pending call is answered (kvm_wf_tool_result resumed the coroutine with ok, value):
 * the value, or the error raised at the script's line. */
static int tool_answered(lua_State *L, int status, lua_KContext kctx) {
    (void)status;
    (void)kctx;
    if (!lua_toboolean(L, -2)) return luaL_error(L, "%s", lua_tostring(L, -1));
    return 1;
}

/* ctx:tool(name [, args]) -> the tool's result as Lua data (nil for none). args: a table (nil = {}). Raises on an
 * unknown tool, arguments the schema refuses, a failed call or a result that is not JSON. Only from a node's own
 * code (the run's budgets are charged). A tool that answers later (KVM_EBUSY) suspends the node until
 * kvm_wf_tool_result. */
int wf_ctx_tool(lua_State *L) {
    void *ud;
    lua_getallocf(L, &ud);
    kvm_workflow_t *wf = ud;
    wf_run_t *r = wf->cur_run;
    wf_task_t *t = wf_running_task(wf, L);
    if (!t)
        return luaL_error(L, "ctx:tool must be called from a func/tool node's own code (not from a predicate, router, "
                             "reducer or a coroutine the script created)");
    const char *name = luaL_checkstring(L, 2);
    const wf_tool_t *tool = find_tool(wf->o.tools, name);
    if (!tool) return no_such_tool(L, wf->o.tools, name);
    if (!lua_isnoneornil(L, 3) && !lua_istable(L, 3))
        return luaL_error(L, "ctx:tool: tool '%s': the arguments must be a table (got %s)", name, luaL_typename(L, 3));
    const wf_graph_t *g = r->g; /* a subgraph's, in a subgraph's run */
    long used = r->tokens_in + r->tokens_out;
    double ms = (double)(kvm_now_ns() - r->t0_mono) / 1e6;
    if (g->lim_tokens > 0 && used >= g->lim_tokens)
        wf_budget_kill(L, "ctx:tool: graph '%.40s' used %ld tokens, over its token budget of %ld", g->name, used, g->lim_tokens);
    if (g->lim_wall_ms > 0 && ms > (double)g->lim_wall_ms)
        wf_budget_kill(L, "ctx:tool: graph '%.40s' ran past its wall-time budget of %ld ms", g->name, g->lim_wall_ms);
    char *over = NULL;
    if (r->parent && wf_subgraph_budgets(r, &over)) { /* the budgets of the graphs above a subgraph too */
        char buf[512];
        snprintf(buf, sizeof buf, "%s", over ? over : "over the budget of a graph above this subgraph");
        kvm_free(over);
        wf_budget_kill(L, "ctx:tool: %s", buf);
    }
    wf_charge(L, WF_CALL_INSTRUCTIONS);
    const uint64_t deadline = wf_run_deadline_ns(r); /* the earliest wall-time budget of its graph and those above */

    cJSON *args = lua_isnoneornil(L, 3) ? cJSON_CreateObject() : wf_lua_to_json(L, 3);
    if (!args) return luaL_error(L, "ctx:tool: tool '%s': the arguments: %s", name, kvm_errmsg());
    if (kvm_jsonschema_validate(tool->schema, args, "args")) {
        cJSON_Delete(args);
        return luaL_error(L, "ctx:tool: tool '%s': %s", name, kvm_errmsg());
    }
    char *text = cJSON_PrintUnformatted(args);
    cJSON_Delete(args);
    char *tname = text ? kvm_strdup(name) : NULL; /* kept while the call may wait */
    if (!text || !tname) {
        cJSON_free(text);
        return luaL_error(L, "ctx:tool: tool '%s': out of memory", name);
    }
    wf_charge(L, (double)strlen(text));

    wf_tools_t *ts = (wf_tools_t *)wf->o.tools; /* the call counter is the registry's */
    uint64_t id = ++ts->next_call;
    kvm_tool_call_t call = {.tool = name, .args_json = text, .run = wf_api_run(wf, r->idx), .run_id = r->id,
                            .node = g->nodes[t->node].name, .call_id = id,
                            .ms_left = deadline ? ms_until(deadline) : -1};
    char *res = NULL;
    uint64_t t0 = kvm_now_ns();
    int rc = tool->fn(tool->ud, &call, &res);
    uint64_t spent = kvm_now_ns() - t0;
    if (r->budget.slice_t0) r->budget.slice_t0 += spent; /* the program's time, not the script's CPU time */
    if (rc == KVM_EBUSY && !res) { /* answered later: the node waits, the run goes on */
        trace_call(r, tname, text, "(pending)", 0);
        cJSON_free(text);
        if (!lua_isyieldable(L)) {
            kvm_free(tname);
            return luaL_error(L, "ctx:tool: tool '%s' answers later, which needs a node that can wait: not inside a "
                                 "metamethod or a C function's callback", name);
        }
        t->tool_call = id;
        kvm_free(t->tool_name);
        t->tool_name = tname;
        return lua_yieldk(L, 0, 0, tool_answered);
    }
    kvm_free(tname);
    trace_call(r, name, text, res, rc);
    cJSON_free(text);
    if (rc) { /* the message is copied before the raise: nothing C-side survives it */
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", res ? res : kvm_strerror(rc));
        kvm_free(res);
        return luaL_error(L, "ctx:tool: tool '%s': %s", name, msg);
    }
    if (deadline && kvm_now_ns() > deadline) {
        kvm_free(res);
        if (g->lim_wall_ms > 0 && (double)(kvm_now_ns() - r->t0_mono) / 1e6 > (double)g->lim_wall_ms)
            wf_budget_kill(L, "ctx:tool: tool '%s' returned after graph '%.40s' ran past its wall-time budget of %ld ms", name,
                           g->name, g->lim_wall_ms);
        wf_budget_kill(L, "ctx:tool: tool '%s' returned after the wall-time budget of a graph above subgraph '%.40s' passed",
                       name, g->name);
    }
    return push_result(L, name, res);
}

/* ---- answers that come later ---------------------------------------------------------------------------------- */

/* Whether run r (a subgraph's too) has nothing to do until a tool answers: some tool call waits in it or in the runs
 * of its subgraph nodes, and every other open node waits for an answer too (a tool's, an interrupt's). */
bool wf_run_tool_only(const wf_run_t *r) {
    int waits = r->finished ? 0 : wf_run_tool_waits(r);
    return waits > 0 && r->n_open <= waits + wf_run_parked_tasks(r);
}

int wf_run_tool_waits(const wf_run_t *r) {
    int n = 0;
    for (int i = 0; i < r->n_tasks; i++) {
        const wf_task_t *t = &r->tasks[i];
        if (t->tool_call && t->status == WF_T_WAIT && !t->tool_answered) n++;
        else if (t->child && !t->child->finished && wf_run_tool_only(t->child)) n++; /* a subgraph node that waits */
    }
    return n;
}

/* The task of r, or of the runs of its subgraph nodes, whose tool call call_id waits for its answer; *run gets its run. */
static wf_task_t *find_tool_task(wf_run_t *r, uint64_t call_id, wf_run_t **run) {
    for (int i = 0; call_id && i < r->n_tasks; i++) {
        wf_task_t *t = &r->tasks[i];
        if (t->tool_call == call_id && t->status == WF_T_WAIT && !t->tool_answered) {
            *run = r;
            return t;
        }
        wf_task_t *c = t->child && !t->child->finished ? find_tool_task(t->child, call_id, run) : NULL;
        if (c) return c;
    }
    return NULL;
}

/* The run ends (a subgraph's run: its node fails) when a tool call waits in it past its wall-time budget or that of a
 * graph above it: the wait is the run's time. Returns whether one ended. */
static bool tool_deadline_rec(kvm_workflow_t *wf, wf_run_t *r, uint64_t now) {
    for (int i = 0; i < r->n_tasks && !r->finished; i++) {
        wf_task_t *t = &r->tasks[i];
        if (t->child && !t->child->finished && tool_deadline_rec(wf, t->child, now)) return true;
        if (!t->tool_call || t->status != WF_T_WAIT || t->tool_answered) continue;
        uint64_t d = wf_run_deadline_ns(r);
        if (!d || now <= d) continue;
        char msg[512];
        const wf_graph_t *g = r->g;
        if (g->lim_wall_ms > 0 && (double)(now - r->t0_mono) / 1e6 > (double)g->lim_wall_ms)
            snprintf(msg, sizeof msg, "%s: graph '%s' ran past its wall-time budget of %ld ms waiting for tool '%s' to answer",
                     g->where, g->name, g->lim_wall_ms, t->tool_name);
        else
            snprintf(msg, sizeof msg, "%s: a graph above subgraph '%s' ran past its wall-time budget while it waited for tool "
                     "'%s' to answer", g->where, g->name, t->tool_name);
        if (r->parent) wf_run_finish(wf, r, KVM_EBUDGET, kvm_strdup(msg));
        else kvm_wf_run_cancel(wf, r->idx, KVM_EBUDGET, msg);
        return true;
    }
    return false;
}

bool wf_run_tool_idle(kvm_workflow_t *wf, wf_run_t *r) {
    if (!r->finished && wf_run_tool_waits(r) > 0) tool_deadline_rec(wf, r, kvm_now_ns());
    return wf_run_tool_only(r);
}

int kvm_wf_tool_result(kvm_workflow_t *wf, int run, uint64_t call_id, int status, const cJSON *value, const char *msg) {
    if (run < 0 || run >= wf->n_runs) return kvm_seterr(KVM_EINVAL, "no run %d", run);
    wf_run_t *r = wf->runs[run];
    if (r->finished) return kvm_seterr(KVM_ESTALE, "run %s has ended: its tool calls are void", r->id);
    wf_run_t *in = r;
    wf_task_t *t = find_tool_task(r, call_id, &in);
    if (!t) return kvm_seterr(KVM_ENOENT, "run %s: no tool call %llu waits for an answer", r->id, (unsigned long long)call_id);
    cJSON *v = !status && value ? cJSON_Duplicate(value, 1) : NULL;
    char *m = status ? kvm_strdup(msg ? msg : kvm_strerror(status)) : NULL;
    if ((!status && value && !v) || (status && !m)) {
        cJSON_Delete(v);
        kvm_free(m);
        return kvm_seterr(KVM_ENOMEM, "run %s: out of memory keeping the answer of tool call %llu", r->id, (unsigned long long)call_id);
    }
    t->tool_answered = true;
    t->tool_status = status;
    t->tool_value = v;
    t->tool_msg = m;
    return 0;
}

/* Pushes the answer on the run's thread (protected: a memory error is caught there): true and the value, or false
 * and the message ctx:tool raises. Argument: the task. */
static int push_answer(lua_State *L) {
    const wf_task_t *t = lua_touserdata(L, 1);
    lua_settop(L, 0);
    if (t->tool_status) {
        lua_pushboolean(L, 0);
        lua_pushfstring(L, "ctx:tool: tool '%s': %s", t->tool_name, t->tool_msg);
    } else {
        lua_pushboolean(L, 1);
        if (t->tool_value) wf_lua_push_json(L, t->tool_value);
        else lua_pushnil(L);
    }
    return 2;
}

/* Resumes t, whose answer came, with it. */
static void deliver(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t) {
    char *res = !t->tool_status && t->tool_value ? cJSON_PrintUnformatted(t->tool_value) : NULL;
    trace_call(r, t->tool_name, NULL, t->tool_status ? t->tool_msg : res, t->tool_status);
    cJSON_free(res);
    lua_State *L = r->th;
    wf_book(wf, r);
    int st = LUA_ERRMEM;
    if (lua_checkstack(L, 4) && lua_checkstack(t->co, 4)) {
        lua_pushcfunction(L, push_answer);
        lua_pushlightuserdata(L, t);
        st = lua_pcall(L, 1, 2, 0);
        if (st == LUA_OK) lua_xmove(L, t->co, 2);
        else lua_pop(L, 1);
    }
    wf_unbook(wf);
    t->tool_call = 0;
    t->tool_answered = false;
    cJSON_Delete(t->tool_value);
    t->tool_value = NULL;
    kvm_free(t->tool_msg);
    t->tool_msg = NULL;
    t->status = WF_T_RUNNING;
    if (st != LUA_OK) { /* no room for the answer: the node ends with the error, as a failed ctx:tool would */
        t->err = KVM_ELUA_MEMORY;
        kvm_free(t->errmsg);
        t->errmsg = wf_strf("ctx:tool: tool '%s': no memory left for its answer (the run's Lua memory cap)", t->tool_name);
        wf_task_done(wf, r, t);
        return;
    }
    wf_task_resume(wf, r, t, 2);
}

bool wf_run_tool_deliver(kvm_workflow_t *wf, wf_run_t *r) {
    bool any = false;
    for (int i = 0; i < r->n_tasks && !r->finished; i++) {
        wf_task_t *t = &r->tasks[i];
        if (t->tool_answered && t->status == WF_T_WAIT) {
            deliver(wf, r, t);
            any = true;
        } else if (t->child && !t->child->finished && wf_run_tool_deliver(wf, t->child)) {
            any = true;
        }
    }
    return any;
}

/* ---- model-driven tool calls (Qwen / Hermes convention) ------------------------------------------------------
 * An agent with tools = {...} sees them in its system message as Qwen's chat template shows them (a <tools> block of
 * {"type": "function", "function": {name, description, parameters}} lines, then how to call one). What it writes is
 * searched for <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks; each call is checked and run as
 * ctx:tool runs one, and its result (or {"error": ...}, which the model may correct) goes back in a tool-response
 * turn (<tool_response>...</tool_response>, a user turn as Qwen's template renders it); the generation goes on
 * with the model's turn and that one appended, for tool_rounds rounds at most. */

/* JSON as Python's json.dumps writes it (", " and ": " separators, as the template's tojson does). */
static int py_json(kvm_sb_t *b, const cJSON *j) {
    if (cJSON_IsObject(j) || cJSON_IsArray(j)) {
        bool obj = cJSON_IsObject(j);
        int rc = kvm_sb_putc(b, obj ? '{' : '[');
        for (const cJSON *c = j->child; !rc && c; c = c->next) {
            if (c != j->child) rc = kvm_sb_puts(b, ", ");
            if (!rc && obj) {
                cJSON *k = cJSON_CreateString(c->string);
                char *ks = k ? cJSON_PrintUnformatted(k) : NULL;
                rc = ks ? kvm_sb_puts(b, ks) : KVM_ENOMEM;
                if (!rc) rc = kvm_sb_puts(b, ": ");
                cJSON_free(ks);
                cJSON_Delete(k);
            }
            if (!rc) rc = py_json(b, c);
        }
        return rc ? rc : kvm_sb_putc(b, obj ? '}' : ']');
    }
    char *t = cJSON_PrintUnformatted(j);
    int rc = t ? kvm_sb_puts(b, t) : KVM_ENOMEM;
    cJSON_free(t);
    return rc;
}

char *wf_tools_system(kvm_workflow_t *wf, const wf_agent_t *a) {
    kvm_sb_t b = KVM_SB_INIT;
    int rc = 0;
    if (a->role && *a->role) rc = kvm_sb_printf(&b, "%s\n\n", a->role);
    if (!rc)
        rc = kvm_sb_puts(&b, "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                             "You are provided with function signatures within <tools></tools> XML tags:\n<tools>");
    for (int i = 0; !rc && i < a->n_tools; i++) {
        const wf_tool_t *tool = find_tool(wf->o.tools, a->tools[i]);
        if (!tool) {
            kvm_sb_free(&b);
            kvm_seterr(KVM_EINVAL, "tools: no tool '%s' is registered (the agent's tools = {...} names it)", a->tools[i]);
            return NULL;
        }
        cJSON *f = cJSON_CreateObject(), *fn = cJSON_CreateObject(), *params = cJSON_Duplicate(tool->schema, 1);
        bool ok = f && fn && params && cJSON_AddStringToObject(f, "type", "function") && cJSON_AddItemToObject(f, "function", fn);
        if (!ok) cJSON_Delete(fn);
        ok = ok && cJSON_AddStringToObject(fn, "name", tool->name) && cJSON_AddStringToObject(fn, "description", tool->description) &&
             cJSON_AddItemToObject(fn, "parameters", params);
        if (!ok) cJSON_Delete(params);
        rc = ok ? kvm_sb_putc(&b, '\n') : KVM_ENOMEM;
        if (!rc) rc = py_json(&b, f);
        cJSON_Delete(f);
    }
    if (!rc)
        rc = kvm_sb_puts(&b, "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                             "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                             "\"arguments\": <args-json-object>}\n</tool_call>");
    if (rc) {
        kvm_sb_free(&b);
        kvm_seterr(KVM_ENOMEM, "out of memory showing the tools");
        return NULL;
    }
    return kvm_sb_take(&b, NULL);
}

/* The calls in text: [{name, arguments}] or, for a block that is not a call, [{error}]; 0 or KVM_ENOMEM. */
static int parse_calls(const char *text, cJSON **out) {
    static const char open_tag[] = "<tool_call>", close_tag[] = "</tool_call>";
    cJSON *calls = cJSON_CreateArray();
    if (!calls) return KVM_ENOMEM;
    for (const char *p = text ? strstr(text, open_tag) : NULL; p; p = strstr(p, open_tag)) {
        p += sizeof open_tag - 1;
        const char *end = strstr(p, close_tag);
        size_t len = end ? (size_t)(end - p) : strlen(p);
        cJSON *call = cJSON_CreateObject(), *j = NULL;
        if (!call || !cJSON_AddItemToArray(calls, call)) {
            cJSON_Delete(call);
            cJSON_Delete(calls);
            return KVM_ENOMEM;
        }
        const char *why = NULL;
        if (!end) why = "a <tool_call> block without its </tool_call>";
        else if (kvm_json_parse(p, len, "the call", &j)) why = kvm_errmsg();
        const cJSON *name = j ? cJSON_GetObjectItemCaseSensitive(j, "name") : NULL;
        cJSON *args = j ? cJSON_GetObjectItemCaseSensitive(j, "arguments") : NULL;
        cJSON *parsed = NULL;
        if (!why && (!cJSON_IsObject(j) || !cJSON_IsString(name)))
            why = "a call must be a JSON object {\"name\": <function-name>, \"arguments\": <args-json-object>}";
        if (!why && cJSON_IsString(args) && kvm_json_parse(args->valuestring, strlen(args->valuestring), "its arguments", &parsed) == 0)
            args = parsed; /* some models write the arguments as a JSON string */
        if (!why && args && !cJSON_IsObject(args)) why = "\"arguments\" must be a JSON object";
        if (why) {
            if (cJSON_IsString(name)) cJSON_AddStringToObject(call, "name", name->valuestring);
            cJSON_AddStringToObject(call, "error", why);
        } else {
            cJSON_AddStringToObject(call, "name", name->valuestring);
            cJSON_AddItemToObject(call, "arguments", args ? cJSON_Duplicate(args, 1) : cJSON_CreateObject());
        }
        cJSON_Delete(parsed);
        cJSON_Delete(j);
        if (!end) break;
        p = end + sizeof close_tag - 1;
    }
    *out = calls;
    return 0;
}

/* Runs one parsed call for agent a (the tools it may call only); the text of its response: the tool's JSON result,
 * or {"error": "..."} the model can read. New string, NULL for no memory. */
static char *run_model_call(kvm_workflow_t *wf, wf_run_t *r, const wf_task_t *t, const wf_agent_t *a, const cJSON *call) {
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(call, "name"), *err = cJSON_GetObjectItemCaseSensitive(call, "error");
    const cJSON *args = cJSON_GetObjectItemCaseSensitive(call, "arguments");
    char why[1024] = "";
    const wf_tool_t *tool = NULL;
    bool offered = false;
    for (int i = 0; cJSON_IsString(name) && i < a->n_tools; i++) offered |= !strcmp(a->tools[i], name->valuestring);
    if (err) snprintf(why, sizeof why, "%s", err->valuestring);
    else if (!offered) snprintf(why, sizeof why, "no tool '%.64s' is offered to you", name->valuestring);
    else if (!(tool = find_tool(wf->o.tools, name->valuestring))) snprintf(why, sizeof why, "tool '%.64s' is not registered now", name->valuestring);
    else if (kvm_jsonschema_validate(tool->schema, args, "arguments")) snprintf(why, sizeof why, "%s", kvm_errmsg());
    char *text = !why[0] ? cJSON_PrintUnformatted(args) : NULL;
    char *res = NULL;
    if (!why[0] && !text) snprintf(why, sizeof why, "out of memory");
    if (!why[0]) {
        const uint64_t deadline = wf_run_deadline_ns(r);
        kvm_tool_call_t c = {.tool = tool->name, .args_json = text, .run = wf_api_run(wf, r->idx), .run_id = r->id,
                             .node = r->g->nodes[t->node].name, .call_id = ++((wf_tools_t *)wf->o.tools)->next_call,
                             .ms_left = deadline ? ms_until(deadline) : -1};
        r->budget.instructions += WF_CALL_INSTRUCTIONS;
        int rc = tool->fn(tool->ud, &c, &res);
        if (rc == KVM_EBUSY && !res) snprintf(why, sizeof why, "tool '%s' answers later, which calls made by a model do not support", tool->name);
        else if (rc) snprintf(why, sizeof why, "%s", res ? res : kvm_strerror(rc));
        else if (res) { /* the result must be JSON: the model reads it as such */
            cJSON *j = NULL;
            if (kvm_json_parse(res, strlen(res), "its result", &j)) snprintf(why, sizeof why, "%s", kvm_errmsg());
            cJSON_Delete(j);
        }
        trace_call(r, tool->name, text, why[0] ? why : res ? res : "null", why[0] != 0);
    } else {
        trace_call(r, cJSON_IsString(name) ? name->valuestring : "?", text ? text : "(no arguments)", why, 1);
    }
    cJSON_free(text);
    if (!why[0]) {
        if (res) return res;
        return kvm_strdup("null");
    }
    kvm_free(res);
    cJSON *e = cJSON_CreateObject();
    cJSON_AddStringToObject(e, "error", why);
    char *et = e ? cJSON_PrintUnformatted(e) : NULL;
    cJSON_Delete(e);
    char *out = et ? kvm_strdup(et) : NULL;
    cJSON_free(et);
    return out;
}

int wf_tools_model_round(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t, int ai, const wf_llm_result_t *res, char *msg, size_t cap) {
    const wf_agent_t *a = &wf->agents[ai];
    cJSON *calls = NULL;
    if (parse_calls(res->text, &calls)) {
        snprintf(msg, cap, "%s: agent '%s': out of memory reading its tool calls", a->where, a->name);
        return KVM_ENOMEM;
    }
    if (cJSON_GetArraySize(calls) == 0) {
        cJSON_Delete(calls);
        return 0;
    }
    if (t->tool_rounds >= a->tool_rounds) {
        cJSON_Delete(calls);
        snprintf(msg, cap, "%s: agent '%s': the model still calls tools after tool_rounds = %d rounds", a->where, a->name,
                 a->tool_rounds);
        return KVM_EBUDGET;
    }
    /* the tool-response turn: one <tool_response> per call, in order */
    kvm_sb_t b = KVM_SB_INIT;
    int rc = 0;
    for (const cJSON *c = calls->child; !rc && c; c = c->next) {
        char *one = run_model_call(wf, r, t, a, c);
        rc = one ? kvm_sb_printf(&b, "%s<tool_response>\n%s\n</tool_response>", c == calls->child ? "" : "\n", one) : KVM_ENOMEM;
        kvm_free(one);
    }
    cJSON_Delete(calls);
    if (!rc && !t->turns && !(t->turns = cJSON_CreateArray())) rc = KVM_ENOMEM;
    if (!rc) {
        const char *roles[2] = {"assistant", "user"}, *texts[2] = {res->text ? res->text : "", kvm_sb_str(&b)};
        for (int k = 0; !rc && k < 2; k++) {
            cJSON *turn = cJSON_CreateObject();
            if (!turn || !cJSON_AddStringToObject(turn, "role", roles[k]) || !cJSON_AddStringToObject(turn, "content", texts[k]) ||
                !cJSON_AddItemToArray(t->turns, turn)) {
                cJSON_Delete(turn);
                rc = KVM_ENOMEM;
            }
        }
    }
    kvm_sb_free(&b);
    if (rc) {
        snprintf(msg, cap, "%s: agent '%s': out of memory answering its tool calls", a->where, a->name);
        return KVM_ENOMEM;
    }
    t->tool_rounds++;
    r->tokens_in += res->n_prompt; /* this round's tokens are the run's; the last round's are counted as the step's */
    r->tokens_out += res->n_out;
    int n = cJSON_GetArraySize(t->turns);
    wf_turn_t *turns = kvm_calloc((size_t)n + 1, sizeof *turns);
    if (!turns) {
        snprintf(msg, cap, "%s: agent '%s': out of memory", a->where, a->name);
        return KVM_ENOMEM;
    }
    int k = 0;
    for (const cJSON *c = t->turns->child; c; c = c->next, k++)
        turns[k] = (wf_turn_t){cJSON_GetObjectItemCaseSensitive(c, "role")->valuestring,
                               cJSON_GetObjectItemCaseSensitive(c, "content")->valuestring};
    uint64_t job = ++wf->job_serial;
    rc = wf_agent_resubmit(wf, r, t, ai, job, turns, n);
    kvm_free(turns);
    if (rc) {
        snprintf(msg, cap, "%s", kvm_errmsg());
        return rc;
    }
    t->job = job;
    t->t_job = kvm_now_ns();
    return 1;
}
