/* wf_lua.c - the sandboxed Lua state of a workflow and the kvmesh.* API that scripts build graphs with.
 *
 * Sandbox (interfaces.md §1): a counted allocator with a per-run and a per-state cap, an instruction
 * and CPU-time hook that pcall cannot swallow, text chunks only, no io/os/package/debug/load, frozen
 * library tables and a locked string metatable, globals frozen once the script has loaded, per-run
 * math.random. The API itself is documented in docs/lua-api.md. */
#include "wf_internal.h"
#include "../runtime/core/json.h"

#include <ctype.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define WF_MT_MODEL "kvmesh.model"
#define WF_MT_AGENT "kvmesh.agent"
#define WF_MT_GRAPH "kvmesh.graph"
#define WF_SOURCE_CAP (1u << 20)

static kvm_workflow_t *getwf(lua_State *L) {
    void *ud = NULL;
    lua_getallocf(L, &ud);
    return ud;
}

/* A copy of the n bytes at s as a C string, each NUL byte replaced by U+FFFD (traces, prompts and logs are C
 * text: a NUL would cut them silently). kvm_free; NULL when out of memory. */
static char *text_dup(const char *s, size_t n) {
    size_t nul = 0;
    for (size_t i = 0; i < n; i++) nul += s[i] == '\0';
    char *d = kvm_malloc(n + 2 * nul + 1);
    if (!d) return NULL;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i]) d[k++] = s[i];
        else {
            memcpy(d + k, "\xEF\xBF\xBD", 3);
            k += 3;
        }
    }
    d[k] = '\0';
    return d;
}

/* ---- allocator ---------------------------------------------------------------------------------- */

typedef struct ahdr {
    wf_account_t *acct;
    size_t pad;            /* keeps the block 16-byte aligned */
} ahdr_t;

/* What a block of n bytes costs in memory, as charged to the caps: n plus the headers in front of it (ahdr_t 16,
 * then what the counted allocator charges for any block: its header, the C allocator's, and under AddressSanitizer
 * the redzones), so that the caps bound what the process holds: a table of a million small strings holds about twice
 * their bytes (issue 19). */
static size_t footprint(size_t n) { return kvm_alloc_footprint(n + sizeof(ahdr_t)); }

static void acct_free(kvm_workflow_t *wf, wf_account_t *a) {
    if (a == wf->acct_shared) return;
    kvm_account_release(a->mem);
    kvm_free(a);
}

static void acct_sub(kvm_workflow_t *wf, wf_account_t *a, size_t n) {
    a->bytes -= n;
    wf->total_bytes -= n;
    if (a->mem) kvm_account_credit(a->mem, n);
    if (a->closed && a->bytes == 0) acct_free(wf, a);
}

/* Caps apply only while script code runs (a budget is set): the C side's own bookkeeping between
 * calls (pushing results, refs, traceback strings) is small and must never fail unprotected. */
static int acct_room(const kvm_workflow_t *wf, const wf_account_t *a, size_t n) {
    if (!wf->cur_budget) return 1;
    if (wf->total_bytes + n > wf->total_cap) return 0;
    /* a run's cap bounds its Lua heap and the C memory made for it together */
    return a->mem ? kvm_account_bytes(a->mem) + n <= a->cap : a->bytes + n <= a->cap;
}

static void acct_add(kvm_workflow_t *wf, wf_account_t *a, size_t n) {
    a->bytes += n;
    if (a->bytes > a->peak) a->peak = a->bytes;
    wf->total_bytes += n;
    if (a->mem) kvm_account_charge(a->mem, n, false); /* acct_room decided */
}

/* The counted allocator for a Lua block, charged to no memory account (wf_alloc charges the block's owner itself). */
static void *lua_block_realloc(void *p, size_t n) {
    kvm_account_t *prev = kvm_account_enter(NULL);
    void *q = kvm_realloc(p, n);
    kvm_account_enter(prev);
    return q;
}

/* lua_Alloc: refuses only growth past the block owner's cap or the state's cap; never fails a shrink.
 * When ptr is NULL, osize is a type tag, not a size (Lua manual), so it is not used. */
static void *wf_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    kvm_workflow_t *wf = ud;
    if (nsize == 0) {
        if (ptr) {
            ahdr_t *h = (ahdr_t *)ptr - 1;
            acct_sub(wf, h->acct, footprint(osize));
            kvm_free(h);
        }
        return NULL;
    }
    if (!ptr) {
        wf_account_t *a = wf->cur_acct ? wf->cur_acct : wf->acct_shared;
        if (!acct_room(wf, a, footprint(nsize))) return NULL;
        ahdr_t *h = lua_block_realloc(NULL, sizeof *h + nsize);
        if (!h) return NULL;
        h->acct = a;
        acct_add(wf, a, footprint(nsize));
        return h + 1;
    }
    ahdr_t *h = (ahdr_t *)ptr - 1;
    wf_account_t *a = h->acct;
    const size_t fo = footprint(osize), fn = footprint(nsize);
    if (fn > fo && !acct_room(wf, a, fn - fo)) return NULL;
    ahdr_t *nh = lua_block_realloc(h, sizeof *h + nsize);
    if (nsize > osize) {
        if (!nh) return NULL;
        acct_add(wf, a, fn - fo);
        return nh + 1;
    }
    /* a shrink never fails for Lua: a block that could not be shrunk stays as it is, and is accounted
     * at the size Lua now believes it has (the size it will free) */
    a->bytes -= fo - fn;
    wf->total_bytes -= fo - fn;
    if (a->mem) kvm_account_credit(a->mem, fo - fn);
    return nh ? nh + 1 : ptr;
}

void wf_account_charge_close(kvm_workflow_t *wf, wf_account_t *a) {
    if (!a) return;
    a->closed = true;
    if (a->bytes == 0) acct_free(wf, a);
}

/* ---- budget hook -------------------------------------------------------------------------------- */

/* Charges executed instructions and Lua CPU time to the current budget. Once exceeded, the budget is
 * marked killed and the hook re-arms itself to fire on every instruction, so a pcall that catches the
 * error is hit again at once: the kill cannot be swallowed. */
void wf_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    kvm_workflow_t *wf = getwf(L);
    wf_budget_t *b = wf->cur_budget;
    if (!b) return;
    if (!b->killed) {
        int cnt = lua_gethookcount(L);
        b->instructions += (uint64_t)(cnt > 0 ? cnt : 1);
        if (cnt != WF_HOOK_COUNT) lua_sethook(L, wf_hook, LUA_MASKCOUNT, WF_HOOK_COUNT);
        uint64_t used = b->lua_ns + (b->slice_t0 ? kvm_now_ns() - b->slice_t0 : 0);
        if (b->max_instructions && b->instructions > b->max_instructions)
            snprintf(b->kill_msg, sizeof b->kill_msg, "instruction budget exceeded (%llu; the smaller of --instructions and g:limit{instructions = N})",
                     (unsigned long long)b->max_instructions);
        else if (b->max_lua_ns && used > b->max_lua_ns)
            snprintf(b->kill_msg, sizeof b->kill_msg, "Lua CPU budget exceeded (%.0f ms; the smaller of --lua-ms and g:limit{lua_ms = N})",
                     (double)b->max_lua_ns / 1e6);
        else
            return;
        b->killed = true;
        b->kill_code = KVM_EBUDGET;
        lua_sethook(L, wf_hook, LUA_MASKCOUNT, 1);
    }
    lua_Debug d;
    if (lua_getstack(L, 0, &d) && lua_getinfo(L, "Sl", &d) && d.currentline > 0)
        lua_pushfstring(L, "%s:%d: kvmesh: %s", d.short_src, d.currentline, b->kill_msg);
    else
        lua_pushfstring(L, "kvmesh: %s", b->kill_msg);
    lua_error(L);
}

int wf_lua_msgh(lua_State *L) {
    const char *msg = lua_tostring(L, 1);
    if (!msg) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) msg = lua_tostring(L, -1);
        else msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    }
    luaL_traceback(L, L, msg, 1);
    return 1;
}

/* ---- RNG ---------------------------------------------------------------------------------------- */

uint64_t wf_rng_next(uint64_t s[2]) { /* xorshift128+ */
    uint64_t s1 = s[0];
    const uint64_t s0 = s[1];
    s[0] = s0;
    s1 ^= s1 << 23;
    s[1] = s1 ^ s0 ^ (s1 >> 17) ^ (s0 >> 26);
    return s[1] + s0;
}

static int l_random(lua_State *L) {
    uint64_t *s = wf_current_rng(getwf(L));
    uint64_t r = wf_rng_next(s);
    lua_Integer lo, up;
    switch (lua_gettop(L)) {
    case 0: lua_pushnumber(L, (lua_Number)(r >> 11) * (1.0 / 9007199254740992.0)); return 1;
    case 1: lo = 1; up = luaL_checkinteger(L, 1); break;
    case 2: lo = luaL_checkinteger(L, 1); up = luaL_checkinteger(L, 2); break;
    default: return luaL_error(L, "wrong number of arguments to 'random'");
    }
    luaL_argcheck(L, lo <= up, lua_gettop(L), "interval is empty");
    uint64_t span = (uint64_t)up - (uint64_t)lo;
    uint64_t v = span == UINT64_MAX ? r : r % (span + 1);
    lua_pushinteger(L, (lua_Integer)((uint64_t)lo + v));
    return 1;
}

static int l_randomseed(lua_State *L) {
    uint64_t *s = wf_current_rng(getwf(L));
    lua_Integer n = luaL_optinteger(L, 1, 0);
    s[0] = (uint64_t)n ^ 0x9e3779b97f4a7c15ULL;
    s[1] = kvm_hash64(&n, sizeof n, KVM_HASH_SEED) | 1;
    return 0;
}

/* ---- replaced base functions -------------------------------------------------------------------- */

static int l_print(lua_State *L) {
    int n = lua_gettop(L);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (int i = 1; i <= n; i++) {
        size_t l;
        const char *s = luaL_tolstring(L, i, &l);
        if (i > 1) luaL_addchar(&b, '\t');
        luaL_addvalue(&b);
        (void)s;
        (void)l;
    }
    luaL_pushresult(&b);
    size_t len;
    const char *s = lua_tolstring(L, -1, &len);
    char *text = text_dup(s, len);
    wf_log(getwf(L), "info", text ? text : s);
    kvm_free(text);
    return 0;
}

/* ctx:log(...): print's message without the ctx table itself (a method call passes it first); ctx.log(...)
 * works as print too. */
static int ctx_log(lua_State *L) {
    if (lua_gettop(L) >= 1 && lua_getmetatable(L, 1)) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, getwf(L)->ctx_mt_ref);
        bool is_ctx = lua_rawequal(L, -1, -2);
        lua_pop(L, 2);
        if (is_ctx) lua_remove(L, 1);
    }
    return l_print(L);
}

static int l_collectgarbage(lua_State *L) {
    const char *opt = luaL_optstring(L, 1, "count");
    if (strcmp(opt, "count") != 0) return luaL_error(L, "collectgarbage: only \"count\" is allowed in kvmesh scripts");
    int k = lua_gc(L, LUA_GCCOUNT, 0), b = lua_gc(L, LUA_GCCOUNTB, 0);
    lua_pushnumber(L, (lua_Number)k + (lua_Number)b / 1024.0);
    return 1;
}

static int is_locked(lua_State *L, int idx) {
    if (!lua_getmetatable(L, idx)) return 0;
    lua_pushliteral(L, "__metatable");
    lua_rawget(L, -2);
    int locked = lua_type(L, -1) == LUA_TSTRING && !strcmp(lua_tostring(L, -1), "locked");
    lua_pop(L, 2);
    return locked;
}

static int l_rawset(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_checkany(L, 2);
    luaL_checkany(L, 3);
    if (is_locked(L, 1)) return luaL_error(L, "rawset: table is read-only");
    lua_settop(L, 3);
    lua_rawset(L, 1);
    return 1;
}

static int l_readonly(lua_State *L) {
    if (lua_type(L, 2) == LUA_TSTRING) return luaL_error(L, "attempt to modify read-only table (field '%s')", lua_tostring(L, 2));
    return luaL_error(L, "attempt to modify read-only table");
}

static int l_frozen_global(lua_State *L) {
    const char *k = lua_type(L, 2) == LUA_TSTRING ? lua_tostring(L, 2) : "?";
    return luaL_error(L, "attempt to set global '%s': globals are read-only once the script has loaded "
                         "(keep per-run data in the run state)", k);
}

static int l_proxy_pairs(lua_State *L) {
    lua_getglobal(L, "next");
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_pushnil(L);
    return 3;
}

/* Pushes a locked metatable that reads through to the table at index `backing` and calls newindex
 * on writes. */
static void push_guard_mt(lua_State *L, int backing, lua_CFunction newindex) {
    backing = lua_absindex(L, backing);
    lua_newtable(L);
    lua_pushvalue(L, backing);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, newindex);
    lua_setfield(L, -2, "__newindex");
    lua_pushliteral(L, "locked");
    lua_setfield(L, -2, "__metatable");
}

/* Levenshtein distance of a and b (names: at most 64 bytes each, longer ones are "far", 99). */
static int edit_distance(const char *a, const char *b) {
    size_t na = strlen(a), nb = strlen(b);
    if (na > 64 || nb > 64) return 99;
    int row[65];
    for (size_t j = 0; j <= nb; j++) row[j] = (int)j;
    for (size_t i = 1; i <= na; i++) {
        int diag = row[0];
        row[0] = (int)i;
        for (size_t j = 1; j <= nb; j++) {
            int up = row[j], best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best) best = up + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            diag = up;
            row[j] = best;
        }
    }
    return row[nb];
}

/* __index of kvmesh.reduce and graph handles (upvalues: the backing table, a label such as
 * "kvmesh.reduce"): a name they lack is an error at the line that reads it, with the nearest name, instead of a
 * nil that fails later, far from the typo. */
static int l_strict_index(lua_State *L) {
    lua_pushvalue(L, 2);
    lua_rawget(L, lua_upvalueindex(1));
    if (!lua_isnil(L, -1) || lua_type(L, 2) != LUA_TSTRING) return 1;
    const char *key = lua_tostring(L, 2), *label = lua_tostring(L, lua_upvalueindex(2));
    lua_pushvalue(L, lua_upvalueindex(1));
    int t = lua_gettop(L), best_d = 3;
    const char *best = NULL;
    lua_pushnil(L);
    while (lua_next(L, t)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TSTRING) continue;
        int d = edit_distance(key, lua_tostring(L, -1));
        if (d < best_d) best_d = d, best = lua_tostring(L, -1); /* the table keeps the key string alive */
    }
    luaL_where(L, 1);
    if (best) lua_pushfstring(L, "%s%s has no '%s'; did you mean '%s'?", lua_tostring(L, -1), label, key, best);
    else lua_pushfstring(L, "%s%s has no '%s'", lua_tostring(L, -1), label, key);
    return lua_error(L);
}

/* Replaces the table at the top of the stack by a read-only proxy of it. */
void wf_lua_push_proxy(lua_State *L) {
    int t = lua_gettop(L);
    lua_newtable(L);                  /* proxy */
    push_guard_mt(L, t, l_readonly);  /* its metatable */
    lua_pushvalue(L, t);
    lua_pushcclosure(L, l_proxy_pairs, 1);
    lua_setfield(L, -2, "__pairs");
    lua_setmetatable(L, -2);
    lua_replace(L, t);
}

/* Replaces the table at the top of the stack by a read-only proxy of it whose unknown names are errors
 * (l_strict_index; label names the table in them). */
static void push_strict_proxy(lua_State *L, const char *label) {
    wf_lua_push_proxy(L);
    lua_getmetatable(L, -1);        /* proxy mt */
    lua_getfield(L, -1, "__index"); /* proxy mt backing */
    lua_pushstring(L, label);
    lua_pushcclosure(L, l_strict_index, 2);
    lua_setfield(L, -2, "__index"); /* proxy mt */
    lua_pop(L, 1);
}

/* ---- handles ------------------------------------------------------------------------------------ */

typedef struct wf_handle {
    uint32_t magic;
    int idx;
} wf_handle_t;
#define WF_HANDLE_MAGIC 0x6b766d68u

static void push_handle(lua_State *L, const char *mt, int idx) {
    wf_handle_t *h = lua_newuserdatauv(L, sizeof *h, 0);
    h->magic = WF_HANDLE_MAGIC;
    h->idx = idx;
    luaL_setmetatable(L, mt);
}

static int check_handle(lua_State *L, int i, const char *mt) { return ((wf_handle_t *)luaL_checkudata(L, i, mt))->idx; }

static int test_handle(lua_State *L, int i, const char *mt) {
    wf_handle_t *h = luaL_testudata(L, i, mt);
    return h ? h->idx : -1;
}

int wf_lua_test_agent(lua_State *L, int idx) { return test_handle(L, idx, WF_MT_AGENT); }

/* "file:line" of the script line calling the running C function (new string, kvm_free). */
static char *where_dup(lua_State *L) {
    luaL_where(L, 1);
    size_t n;
    const char *s = lua_tolstring(L, -1, &n);
    char buf[512];
    snprintf(buf, sizeof buf, "%.*s", (int)(n >= 2 && s[n - 2] == ':' ? n - 2 : n), s);
    lua_pop(L, 1);
    if (!buf[0]) snprintf(buf, sizeof buf, "?");
    return kvm_strdup(buf);
}

/* Raises when the script has loaded: the graph, its agents and models are sized into every run (run
 * arrays, validation), so any change after that point is refused, naming the call. */
static void check_unfrozen(lua_State *L, const char *call) {
    if (getwf(L)->frozen)
        luaL_error(L, "%s: the graph, its agents and models are frozen once the script has loaded "
                      "(define them at load time, not from a node, router, dataset or scorer)", call);
}

static char *dup_or_die(lua_State *L, const char *s) {
    char *d = kvm_strdup(s ? s : "");
    if (!d) luaL_error(L, "out of memory");
    return d;
}

static void *grow(lua_State *L, void *arr, int n, size_t elem) {
    void *na = kvm_realloc(arr, (size_t)(n + 1) * elem);
    if (!na) luaL_error(L, "out of memory");
    return na;
}

/* Pushes t[k] read raw (no __index: no script code runs inside a binding, and a value the table holds
 * stays anchored by it) and returns its type. t is an absolute index. */
static int raw_field(lua_State *L, int t, const char *k) {
    luaL_checkstack(L, 2, "spec table");
    lua_pushstring(L, k);
    return lua_rawget(L, t);
}

/* Argument idx as a name (a C string): one with a NUL byte is refused, not cut. */
static const char *check_name(lua_State *L, int idx, const char *what) {
    size_t n;
    const char *s = luaL_checklstring(L, idx, &n);
    if (strlen(s) != n) luaL_error(L, "%s: the name '%s...' contains a NUL byte", what, s);
    return s;
}

/* The string at idx holds no NUL byte (it is used as a C string). */
static bool no_nul(lua_State *L, int idx) { return strlen(lua_tostring(L, idx)) == lua_rawlen(L, idx); }

static bool name_char(char c) { return isalnum((unsigned char)c) || c == '_' || c == '-'; }

/* ---- JSON <-> Lua ------------------------------------------------------------------------------- */

/* What one conversion may still build: values (a table reached twice is counted, and converted, twice)
 * and bytes of string text. */
typedef struct json_budget {
    size_t nodes, bytes;
    bool over;
} json_budget_t;

#define WF_JSON_MAX_NODES ((size_t)1 << 20)

typedef struct json_key_at {
    cJSON *item;
    int at; /* its place in the table's traversal: the order of equal keys ("1" and 1) */
} json_key_at_t;

static int json_key_cmp(const void *a, const void *b) {
    const json_key_at_t *x = a, *y = b;
    int c = strcmp(x->item->string, y->item->string);
    return c ? c : (x->at > y->at) - (x->at < y->at);
}

/* The members of o in the byte order of their keys. Lua's traversal order of a table depends on the state's hash
 * seed, which differs between processes: without this the same state is written differently by each run (traces,
 * replies, the failure a judge reads). Out of memory: o as it is. */
static cJSON *json_sort_keys(cJSON *o) {
    int n = 0;
    for (cJSON *c = o->child; c; c = c->next) n++;
    json_key_at_t *v = n > 1 ? kvm_malloc((size_t)n * sizeof *v) : NULL;
    if (!v) return o;
    int i = 0;
    for (cJSON *c = o->child; c; c = c->next, i++) v[i] = (json_key_at_t){c, i};
    qsort(v, (size_t)n, sizeof *v, json_key_cmp);
    for (i = 0; i < n; i++) { /* cJSON's list: the first item's prev is the last one, the last's next is NULL */
        v[i].item->prev = v[i ? i - 1 : n - 1].item;
        v[i].item->next = i + 1 < n ? v[i + 1].item : NULL;
    }
    o->child = v[0].item;
    kvm_free(v);
    return o;
}

static cJSON *to_json_rec(lua_State *L, int idx, int depth, json_budget_t *jb) {
    idx = lua_absindex(L, idx);
    if (jb->nodes == 0 || jb->bytes < sizeof(cJSON)) {
        jb->over = true;
        return NULL;
    }
    jb->nodes--;
    jb->bytes -= sizeof(cJSON); /* the C-side tree counts too */
    switch (lua_type(L, idx)) {
    case LUA_TNIL: return cJSON_CreateNull();
    case LUA_TBOOLEAN: return cJSON_CreateBool(lua_toboolean(L, idx));
    case LUA_TNUMBER:
        if (lua_isinteger(L, idx)) return cJSON_CreateNumber((double)lua_tointeger(L, idx));
        {
            double d = lua_tonumber(L, idx);
            return isfinite(d) ? cJSON_CreateNumber(d) : cJSON_CreateString(d != d ? "nan" : d > 0 ? "inf" : "-inf");
        }
    case LUA_TSTRING: {
        size_t n;
        const char *s = lua_tolstring(L, idx, &n);
        if (n > jb->bytes) {
            jb->over = true;
            return NULL;
        }
        jb->bytes -= n;
        if (strlen(s) == n) return cJSON_CreateString(s);
        char *t = text_dup(s, n); /* a NUL byte becomes U+FFFD: nothing is cut silently */
        cJSON *j = t ? cJSON_CreateString(t) : NULL;
        kvm_free(t);
        return j;
    }
    case LUA_TTABLE: {
        if (depth > 32 || !lua_checkstack(L, 4)) return cJSON_CreateString("<table nested too deep>");
        lua_Unsigned len = lua_rawlen(L, idx);
        lua_Unsigned count = 0;
        lua_pushnil(L);
        while (lua_next(L, idx)) {
            count++;
            lua_pop(L, 1);
        }
        if (count > 0 && count == len) {
            cJSON *a = cJSON_CreateArray();
            for (lua_Unsigned i = 1; a && i <= len; i++) {
                lua_rawgeti(L, idx, (lua_Integer)i);
                cJSON *c = to_json_rec(L, -1, depth + 1, jb);
                lua_pop(L, 1);
                if (!c || !cJSON_AddItemToArray(a, c)) { /* out of memory: nothing half-built survives */
                    cJSON_Delete(c);
                    cJSON_Delete(a);
                    return NULL;
                }
            }
            return a;
        }
        cJSON *o = cJSON_CreateObject();
        if (!o) return NULL; /* before the key push: the stack stays balanced */
        lua_pushnil(L);
        while (lua_next(L, idx)) {
            char kb[64];
            const char *k;
            if (lua_type(L, -2) == LUA_TSTRING) k = lua_tostring(L, -2);
            else if (lua_type(L, -2) == LUA_TNUMBER) {
                if (lua_isinteger(L, -2)) snprintf(kb, sizeof kb, "%lld", (long long)lua_tointeger(L, -2));
                else snprintf(kb, sizeof kb, "%.17g", lua_tonumber(L, -2));
                k = kb;
            } else {
                snprintf(kb, sizeof kb, "<%s>", luaL_typename(L, -2));
                k = kb;
            }
            cJSON *c = to_json_rec(L, -1, depth + 1, jb);
            lua_pop(L, 1);
            if (!c || !cJSON_AddItemToObject(o, k, c)) {
                cJSON_Delete(c);
                cJSON_Delete(o);
                lua_pop(L, 1); /* the key */
                return NULL;
            }
        }
        return json_sort_keys(o);
    }
    case LUA_TUSERDATA: {
        const char *kind = luaL_testudata(L, idx, WF_MT_AGENT) ? "agent" : luaL_testudata(L, idx, WF_MT_MODEL) ? "model"
                           : luaL_testudata(L, idx, WF_MT_GRAPH)                                       ? "graph"
                                                                                                         : "userdata";
        cJSON *o = cJSON_CreateObject();
        wf_handle_t *h = lua_touserdata(L, idx);
        if (!cJSON_AddStringToObject(o, "handle", kind) || (strcmp(kind, "userdata") != 0 && !cJSON_AddNumberToObject(o, "id", h->idx))) {
            cJSON_Delete(o);
            return NULL;
        }
        return o;
    }
    default: {
        char b[64];
        snprintf(b, sizeof b, "<%s>", luaL_typename(L, idx));
        return cJSON_CreateString(b);
    }
    }
}

cJSON *wf_lua_to_json(lua_State *L, int idx) {
    size_t cap = getwf(L)->o.run_mem_cap_bytes / 4; /* the tree and its text, made outside the Lua heap */
    json_budget_t jb = {.nodes = WF_JSON_MAX_NODES, .bytes = cap};
    cJSON *j = to_json_rec(L, idx, 0, &jb);
    wf_charge(L, (double)(WF_JSON_MAX_NODES - jb.nodes) + (double)(cap - jb.bytes) / 64);
    if (!j && jb.over)
        kvm_seterr(KVM_EBUDGET, "value too large to convert to JSON (over %zu values or %zu MiB with its text, a quarter of the run "
                                "memory cap; a table reached twice counts twice)", WF_JSON_MAX_NODES, cap >> 20);
    else if (!j)
        kvm_seterr(KVM_ENOMEM, "out of memory converting a value to JSON");
    return j;
}

void wf_lua_push_json(lua_State *L, const cJSON *j) {
    luaL_checkstack(L, 4, "json");
    if (!j || cJSON_IsNull(j) || cJSON_IsInvalid(j)) lua_pushnil(L);
    else if (cJSON_IsBool(j)) lua_pushboolean(L, cJSON_IsTrue(j));
    else if (cJSON_IsNumber(j)) {
        double d = j->valuedouble;
        if (d == floor(d) && fabs(d) < 9007199254740992.0) lua_pushinteger(L, (lua_Integer)d);
        else lua_pushnumber(L, d);
    } else if (cJSON_IsString(j)) lua_pushstring(L, j->valuestring);
    else if (cJSON_IsArray(j)) {
        lua_createtable(L, cJSON_GetArraySize(j), 0);
        int i = 1;
        for (const cJSON *c = j->child; c; c = c->next) {
            wf_lua_push_json(L, c);
            lua_rawseti(L, -2, i++);
        }
    } else if (cJSON_IsObject(j)) {
        lua_newtable(L);
        for (const cJSON *c = j->child; c; c = c->next) {
            wf_lua_push_json(L, c);
            lua_setfield(L, -2, c->string);
        }
    } else
        lua_pushnil(L);
}

char *wf_lua_value_text(lua_State *L, int idx) {
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
    case LUA_TNONE: return kvm_strdup("");
    case LUA_TSTRING: {
        size_t n;
        const char *s = lua_tolstring(L, idx, &n);
        return text_dup(s, n);
    }
    case LUA_TBOOLEAN: return kvm_strdup(lua_toboolean(L, idx) ? "true" : "false");
    case LUA_TNUMBER: {
        char b[64];
        if (lua_isinteger(L, idx)) snprintf(b, sizeof b, "%lld", (long long)lua_tointeger(L, idx));
        else snprintf(b, sizeof b, "%.14g", lua_tonumber(L, idx));
        return kvm_strdup(b);
    }
    default: {
        cJSON *j = wf_lua_to_json(L, idx);
        if (!j) return NULL; /* the message says why */
        char *s = cJSON_PrintUnformatted(j);
        cJSON_Delete(j);
        if (!s) kvm_seterr(KVM_ENOMEM, "out of memory converting a value to JSON");
        char *r = s ? kvm_strdup(s) : NULL;
        cJSON_free(s);
        return r;
    }
    }
}

static int l_json(lua_State *L) {
    luaL_checkany(L, 1);
    char *s = wf_lua_value_text(L, 1);
    if (!s) return luaL_error(L, "kvmesh.json: %s", kvm_errmsg());
    lua_pushstring(L, s);
    kvm_free(s);
    return 1;
}

/* ---- kvmesh.<name>: the host program's functions (kvm_runtime_add_function) ----------------------------- */

static int push_json_protected(lua_State *L) {
    wf_lua_push_json(L, lua_touserdata(L, 1));
    return 1;
}

/* kvmesh.<name>(...): the arguments go to the host function as a JSON array, its JSON result comes back as Lua
 * data; a failure is a Lua error naming the function. Nothing C-side survives a raise. */
static int l_host_call(lua_State *L) {
    const wf_host_fn_t *h = lua_touserdata(L, lua_upvalueindex(1));
    int n = lua_gettop(L);
    cJSON *args = cJSON_CreateArray();
    bool ok = args != NULL;
    for (int i = 1; ok && i <= n; i++) {
        cJSON *a = wf_lua_to_json(L, i);
        ok = a && cJSON_AddItemToArray(args, a);
        if (!ok) cJSON_Delete(a);
    }
    char *text = ok ? cJSON_PrintUnformatted(args) : NULL;
    cJSON_Delete(args);
    if (!text) return luaL_error(L, "kvmesh.%s: %s", h->name, ok ? "out of memory" : kvm_errmsg());
    char *res = NULL;
    int rc = h->fn(h->ud, text, &res);
    cJSON_free(text);
    if (rc) {
        lua_pushfstring(L, "kvmesh.%s: %s", h->name, res ? res : kvm_strerror(rc));
        kvm_free(res);
        return lua_error(L);
    }
    if (!res) return 0;
    cJSON *j = NULL;
    rc = kvm_json_parse(res, strlen(res), "its result", &j);
    kvm_free(res);
    if (rc) return luaL_error(L, "kvmesh.%s: %s", h->name, kvm_errmsg());
    lua_pushcfunction(L, push_json_protected);
    lua_pushlightuserdata(L, j);
    int st = lua_pcall(L, 1, 1, 0);
    cJSON_Delete(j);
    return st == LUA_OK ? 1 : lua_error(L);
}

/* Binds every host function under the kvmesh table (on top of the stack), making the tables of dotted names;
 * raises on a name that collides with a built-in. */
static void add_host_fns(lua_State *L, const kvm_wf_opts_t *o) {
    for (int i = 0; i < o->n_host_fns; i++) {
        const wf_host_fn_t *h = o->host_fns[i];
        int depth = 0;
        const char *seg = h->name;
        for (const char *dot; (dot = strchr(seg, '.')) != NULL; seg = dot + 1, depth++) {
            lua_pushlstring(L, seg, (size_t)(dot - seg));
            if (lua_rawget(L, -2) == LUA_TNIL) {
                lua_pop(L, 1);
                lua_newtable(L);
                lua_pushlstring(L, seg, (size_t)(dot - seg));
                lua_pushvalue(L, -2);
                lua_rawset(L, -4);
            } else if (!lua_istable(L, -1) || lua_getmetatable(L, -1)) {
                luaL_error(L, "host function kvmesh.%s: kvmesh.%.*s is a built-in", h->name, (int)(dot - h->name), h->name);
            }
        }
        if (lua_getfield(L, -1, seg) != LUA_TNIL) luaL_error(L, "host function kvmesh.%s: the name is taken", h->name);
        lua_pop(L, 1);
        lua_pushlightuserdata(L, (void *)h);
        lua_pushcclosure(L, l_host_call, 1);
        lua_setfield(L, -2, seg);
        lua_pop(L, depth);
    }
}

/* Replaces every plain (metatable-less) table field of the table on top, depth first, by its read-only proxy. */
static void freeze_plain_tables(lua_State *L) {
    luaL_checkstack(L, 4, "freeze");
    lua_pushnil(L);
    while (lua_next(L, -2)) {                 /* t k v */
        if (lua_type(L, -1) == LUA_TTABLE) {
            if (lua_getmetatable(L, -1)) {
                lua_pop(L, 1);                /* a proxy already: leave it */
            } else {
                freeze_plain_tables(L);
                wf_lua_push_proxy(L);         /* t k proxy */
                lua_pushvalue(L, -2);
                lua_insert(L, -2);            /* t k k proxy */
                lua_rawset(L, -4);            /* t[k] = proxy (an existing field: allowed while traversing) */
                continue;
            }
        }
        lua_pop(L, 1);
    }
}

static int l_now_ms(lua_State *L) {
    lua_pushnumber(L, (lua_Number)kvm_wall_ns() / 1e6);
    return 1;
}

/* ---- kvmesh.model ------------------------------------------------------------------------------- */

/* qsort order of "KEY=VALUE" KVCOMM switches: preset first, ablation second, the others by key */
static int switch_rank(const char *s) {
    return !strncmp(s, "preset=", 7) || !strncmp(s, "kvcomm.preset=", 14) ? 0 : strstr(s, "ablation=") == s ? 1 : 2;
}

static int cmp_switch(const void *a, const void *b) {
    const char *x = *(const char *const *)a, *y = *(const char *const *)b;
    const int rx = switch_rank(x), ry = switch_rank(y);
    return rx != ry ? rx - ry : strcmp(x, y);
}

static int l_model(lua_State *L) {
    kvm_workflow_t *wf = getwf(L);
    check_unfrozen(L, "kvmesh.model");
    const char *path;
    /* kvmesh.model{path = ..., kvcomm = {preset = "spec", gamma = 0.5, ...}}: the model's own KVCOMM switches */
    char setbuf[32][192];
    const char *sets[32];
    int n_sets = 0;
    if (lua_type(L, 1) == LUA_TTABLE) {
        path = raw_field(L, 1, "path") == LUA_TSTRING ? lua_tostring(L, -1) : NULL; /* stays on the stack */
        if (!path) return luaL_error(L, "kvmesh.model{...}: field 'path' (a string) is required");
        const int kt = raw_field(L, 1, "kvcomm"), ki = lua_gettop(L);
        if (kt != LUA_TNIL && kt != LUA_TTABLE)
            return luaL_error(L, "kvmesh.model{...}: field 'kvcomm' must be a table of KVCOMM switches, e.g. "
                              "{ preset = \"spec\" } (got a %s)", lua_typename(L, kt));
        for (lua_pushnil(L); kt == LUA_TTABLE && lua_next(L, ki); lua_pop(L, 1)) {
            if (lua_type(L, -2) != LUA_TSTRING) return luaL_error(L, "kvmesh.model{...}: kvcomm switch names must be strings");
            if (n_sets == 32) return luaL_error(L, "kvmesh.model{...}: more than 32 kvcomm switches");
            const char *k = lua_tostring(L, -2), *v;
            if (lua_type(L, -1) == LUA_TBOOLEAN) v = lua_toboolean(L, -1) ? "on" : "off";
            else if (lua_type(L, -1) == LUA_TSTRING || lua_type(L, -1) == LUA_TNUMBER) v = lua_tostring(L, -1);
            else return luaL_error(L, "kvmesh.model{...}: kvcomm.%s must be a string, number or boolean", k);
            snprintf(setbuf[n_sets], sizeof setbuf[n_sets], "%s=%s", k, v);
            sets[n_sets] = setbuf[n_sets];
            n_sets++;
        }
        /* a Lua table has no order: preset, then ablation (each resets switches), then the others by name */
        qsort(sets, (size_t)n_sets, sizeof *sets, cmp_switch);
    } else {
        path = check_name(L, 1, "kvmesh.model");
    }
    char resolved[4096];
    const char *use = path;
    if (wf->o.mock) use = "mock:echo";
    else if (wf->o.model_override) use = wf->o.model_override;
    else if (path[0] != '/' && !strchr(path, ':') && !kvm_file_exists(path) && !kvm_dir_exists(path) && wf->path) {
        /* relative paths are tried against the script's directory too */
        const char *slash = strrchr(wf->path, '/');
        if (slash) {
            snprintf(resolved, sizeof resolved, "%.*s/%s", (int)(slash - wf->path), wf->path, path);
            if (kvm_file_exists(resolved) || kvm_dir_exists(resolved)) use = resolved;
        }
    }
    int idx;
    for (int i = 0; i < wf->n_models; i++)
        if (!strcmp(wf->models[i].path, path)) {
            /* the same switches again, or none: the same model; others are refused (one model, one configuration) */
            if (n_sets && wf_llm_model_open(wf->llm, use, sets, n_sets, &idx) != 0)
                return luaL_error(L, "kvmesh.model: %s", kvm_errmsg());
            push_handle(L, WF_MT_MODEL, i);
            return 1;
        }
    if (wf_llm_model_open(wf->llm, use, sets, n_sets, &idx) != 0) {
        if (idx != -1) return luaL_error(L, "kvmesh.model: %s", kvm_errmsg());
        /* Nothing loaded: the script learns no more than that, whether the path is missing, unreadable, a directory
         * or a file of another kind (a script may name any path the process can read: issue 19). The loader's
         * reason goes to the runtime's log, which the operator reads and a script or a client of the daemon does not. */
        KVM_LOGW("kvmesh.model '%s': %s", path, kvm_errmsg());
        return luaL_error(L, "kvmesh.model: no model could be loaded from '%s' (it is missing, unreadable, or not a model: a folder "
                             "with config.json and .safetensors weights, or a llama2.c .bin file; the runtime's log has the reason)",
                          path);
    }
    char *w = where_dup(L), *p = kvm_strdup(path);
    wf_model_t *nm = kvm_realloc(wf->models, (size_t)(wf->n_models + 1) * sizeof *nm);
    if (!w || !p || !nm) {
        kvm_free(w);
        kvm_free(p);
        if (nm) wf->models = nm;
        return luaL_error(L, "out of memory");
    }
    wf->models = nm;
    nm[wf->n_models] = (wf_model_t){.path = p, .llm = idx, .where = w};
    push_handle(L, WF_MT_MODEL, wf->n_models++);
    return 1;
}

/* ---- kvmesh.agent ------------------------------------------------------------------------------- */

static const char *const agent_fields[] = {"name", "model", "role", "system", "template", "prompt", "max_tokens",
                                           "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop",
                                           "budget", "kv", "writes", "ignore_eos", "timeout_ms", "retry", "tools",
                                           "tool_rounds", "kv_from", NULL};

static void check_fields(lua_State *L, int t, const char *what, const char *const *allowed) {
    lua_pushnil(L);
    while (lua_next(L, t)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "%s: field names must be strings", what);
        const char *k = lua_tostring(L, -1);
        bool ok = false;
        for (int i = 0; allowed[i]; i++)
            if (!strcmp(allowed[i], k)) ok = true;
        if (!ok) {
            luaL_Buffer b;
            luaL_buffinit(L, &b);
            for (int i = 0; allowed[i]; i++) {
                if (i) luaL_addstring(&b, ", ");
                luaL_addstring(&b, allowed[i]);
            }
            luaL_pushresult(&b);
            luaL_error(L, "%s: unknown field '%s' (known: %s)", what, k, lua_tostring(L, -1));
        }
    }
}

static lua_Number opt_num_field(lua_State *L, int t, const char *k, lua_Number def, const char *what) {
    raw_field(L, t, k);
    lua_Number v = def;
    if (!lua_isnil(L, -1)) {
        if (!lua_isnumber(L, -1)) luaL_error(L, "%s: field '%s' must be a number (got %s)", what, k, luaL_typename(L, -1));
        v = lua_tonumber(L, -1);
    }
    lua_pop(L, 1);
    return v;
}

/* t[k] (read raw) when it is a string, else NULL (nil) or an error. A string is left on the stack, so it
 * stays alive while the calling binding uses it, whatever happens to the table meanwhile. */
/* opt_num_field checked to lie in [lo, hi] (NaN and infinities never do): a bad value is refused where it
 * is defined, naming the field, instead of surfacing later as a wrapped integer or 'out of memory'. */
static lua_Number num_in(lua_State *L, int t, const char *k, lua_Number def, lua_Number lo, lua_Number hi, const char *what) {
    lua_Number v = opt_num_field(L, t, k, def, what);
    if (!(v >= lo && v <= hi)) {
        char m[512]; /* lua_pushfstring has no %g */
        snprintf(m, sizeof m, "%s: field '%s' must be a number in [%.15g, %.15g] (got %g)", what, k, lo, hi, v);
        luaL_error(L, "%s", m);
    }
    return v;
}

typedef struct wf_retry {
    int max;
    double backoff_ms;
    unsigned on;
} wf_retry_t;

/* The agent field `retry = { max = N, backoff_ms = M, on = {"timeout", "kv", "error"} }` (absent: no retries;
 * backoff 100 ms; on timeout and kv). */
static void parse_retry(lua_State *L, int t, const char *aw, wf_retry_t *out) {
    *out = (wf_retry_t){.max = 0, .backoff_ms = 100, .on = WF_RETRY_TIMEOUT | WF_RETRY_KV};
    raw_field(L, t, "retry");
    int r = lua_gettop(L);
    if (lua_isnil(L, r)) {
        lua_pop(L, 1);
        return;
    }
    if (!lua_istable(L, r)) luaL_error(L, "%s: retry must be a table { max = N, backoff_ms = M, on = {...} }", aw);
    char what[340];
    snprintf(what, sizeof what, "%s: retry", aw);
    static const char *const fields[] = {"max", "backoff_ms", "on", NULL};
    check_fields(L, r, what, fields);
    out->max = (int)num_in(L, r, "max", 1, 0, 10, what);
    out->backoff_ms = num_in(L, r, "backoff_ms", 100, 0, 60000, what);
    raw_field(L, r, "on");
    if (!lua_isnil(L, -1)) {
        if (!lua_istable(L, -1)) luaL_error(L, "%s.on must be a list of \"timeout\", \"kv\", \"error\"", what);
        out->on = 0;
        int n = (int)lua_rawlen(L, -1);
        for (int i = 1; i <= n; i++) {
            lua_rawgeti(L, -1, i);
            const char *k = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "";
            unsigned bit = !strcmp(k, "timeout") ? WF_RETRY_TIMEOUT : !strcmp(k, "kv") ? WF_RETRY_KV
                           : !strcmp(k, "error") ? WF_RETRY_ERROR : 0;
            if (!bit) luaL_error(L, "%s.on[%d]: \"timeout\", \"kv\" or \"error\" (got %s)", what, i, luaL_typename(L, -1));
            out->on |= bit;
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 2);
}

static const char *opt_str_field(lua_State *L, int t, const char *k, const char *what) {
    raw_field(L, t, k);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return NULL;
    }
    if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "%s: field '%s' must be a string (got %s)", what, k, luaL_typename(L, -1));
    if (!no_nul(L, -1)) luaL_error(L, "%s: field '%s' contains a NUL byte", what, k);
    return lua_tostring(L, -1);
}

/* The agent field `kv_from = { agent = "reader", via = "c2c", fuser = "x.c2c.json", section = "state.doc" }`
 * (docs/c2c.md): the placeholder `section` (as written between braces) of this agent's template, which the sharer
 * agent's template holds too, is prefilled by the sharer agent's model and fused into this agent's cache through the
 * fuser (spec §5-6). Checked here: the fields, the sharer agent (defined before this one), the placeholder in both
 * templates, and (unless the run is --mock) the fuser file against both models. Raises with the script's line. */
static void parse_kv_from(lua_State *L, kvm_workflow_t *wf, int t, wf_agent_t *a, const char *aw) {
    static const char *const fields[] = {"agent", "via", "fuser", "section", NULL};
    const int top = lua_gettop(L);
    raw_field(L, t, "kv_from");
    if (lua_isnil(L, -1)) {
        lua_settop(L, top);
        return;
    }
    if (!lua_istable(L, -1))
        luaL_error(L, "%s: kv_from must be a table { agent = NAME, via = \"c2c\", fuser = PATH, section = PLACEHOLDER }", aw);
    const int k = lua_gettop(L);
    char what[340];
    snprintf(what, sizeof what, "%s: kv_from", aw);
    check_fields(L, k, what, fields);
    const char *via = opt_str_field(L, k, "via", what), *from = opt_str_field(L, k, "agent", what);
    const char *fuser = opt_str_field(L, k, "fuser", what), *section = opt_str_field(L, k, "section", what);
    if (!via || strcmp(via, "c2c")) luaL_error(L, "%s: field 'via' must be \"c2c\" (the only kind of kv_from)", what);
    if (!from || !fuser || !section) luaL_error(L, "%s: fields 'agent', 'fuser' and 'section' are required", what);
    int si = -1;
    for (int i = 0; i < wf->n_agents; i++)
        if (!strcmp(wf->agents[i].name, from) && &wf->agents[i] != a) si = i;
    if (si < 0) luaL_error(L, "%s: agent '%s' is not an agent defined before this one", what, from);
    const wf_agent_t *s = &wf->agents[si];
    const char *name = NULL;
    bool in_sharer = false;
    for (int i = 0; i < a->n_parts; i++)
        if (a->parts[i].source && !strcmp(a->parts[i].source, section)) name = a->parts[i].text;
    for (int i = 0; i < s->n_parts; i++) in_sharer |= s->parts[i].source && !strcmp(s->parts[i].source, section);
    if (!name) luaL_error(L, "%s: section '{%s}' is not a placeholder of this agent's template", what, section);
    if (!in_sharer) luaL_error(L, "%s: section '{%s}' is not in the template of agent '%s' (both prompts hold it)", what, section, from);
    char resolved[4096];
    const char *use = fuser;
    if (fuser[0] != '/' && !kvm_file_exists(fuser) && wf->path) { /* relative paths are tried against the script's directory too */
        const char *slash = strrchr(wf->path, '/');
        if (slash) {
            snprintf(resolved, sizeof resolved, "%.*s/%s", (int)(slash - wf->path), wf->path, fuser);
            if (kvm_file_exists(resolved)) use = resolved;
        }
    }
    int idx = -1;
    if (!wf->o.mock) { /* mock models have no KV to fuse: the option is checked, the fusion skipped */
        if (a->model == s->model)
            luaL_error(L, "%s: agent '%s' runs on the same model (%s); C2C is between two checkpoints (kv = \"kvcomm\" shares "
                       "KV on one)", what, from, wf->models[a->model].path);
        int rc = wf_llm_c2c_open(wf->llm, use, wf->models[a->model].llm, wf->models[s->model].llm, &idx);
        if (rc == KVM_EINVAL) luaL_error(L, "%s: %s", what, kvm_errmsg()); /* a valid fuser for another pair */
        if (rc) {
            /* as for kvmesh.model (issue 19): a script learns only that no fuser could be read from the path; the reason
             * (which may quote the file) goes to the runtime's log */
            KVM_LOGW("kv_from fuser '%s': %s", fuser, kvm_errmsg());
            luaL_error(L, "%s: no C2C fuser could be loaded from '%s' (it is missing, unreadable, or not a fuser config "
                       "with its weights file: docs/c2c.md; the runtime's log has the reason)", what, fuser);
        }
    }
    a->c2c = idx + 1;
    a->c2c_from = kvm_strdup(from);
    a->c2c_fuser = kvm_strdup(use);
    a->c2c_section = kvm_strdup(name);
    if (!a->c2c_from || !a->c2c_fuser || !a->c2c_section) luaL_error(L, "out of memory");
    lua_settop(L, top);
}

/* Builds an agent from the spec table at index t (name may come from the argument). Returns its index.
 * Raises a Lua error (with the script's file:line) on a bad spec; nothing leaks on error because all
 * checks run before the first allocation. */
/* Whether elements 1..n of the table at idx are non-empty strings without NUL bytes (read raw). */
static bool string_list(lua_State *L, int idx, int n) {
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, idx, i);
        bool ok = lua_type(L, -1) == LUA_TSTRING && *lua_tostring(L, -1) && no_nul(L, -1);
        lua_pop(L, 1);
        if (!ok) return false;
    }
    return true;
}

static int make_agent(lua_State *L, int t, const char *name_arg) {
    kvm_workflow_t *wf = getwf(L);
    const char *what = "kvmesh.agent";
    check_fields(L, t, what, agent_fields);
    const char *name = name_arg ? name_arg : opt_str_field(L, t, "name", what);
    if (!name || !*name) return luaL_error(L, "%s: field 'name' is required", what);
    for (int i = 0; i < wf->n_agents; i++)
        if (!strcmp(wf->agents[i].name, name)) return luaL_error(L, "%s: an agent named '%s' already exists (%s)", what, name, wf->agents[i].where);
    raw_field(L, t, "model");
    int model = test_handle(L, -1, WF_MT_MODEL);
    lua_pop(L, 1);
    if (model < 0) {
        if (wf->n_models == 1) model = 0;
        else return luaL_error(L, "%s '%s': field 'model' must be a kvmesh.model(...) handle", what, name);
    }
    const char *role = opt_str_field(L, t, "role", what);
    if (!role) role = opt_str_field(L, t, "system", what);
    const char *tmpl = opt_str_field(L, t, "template", what);
    if (!tmpl) tmpl = opt_str_field(L, t, "prompt", what);
    if (!tmpl) return luaL_error(L, "%s '%s': field 'template' is required", what, name);
    char aw[300];
    snprintf(aw, sizeof aw, "%s '%.256s'", what, name);
    lua_Number max_tokens = num_in(L, t, "max_tokens", 64, 1, 1 << 20, aw);
    kvm_sampler_params_t sp = {0};
    sp.temperature = (float)num_in(L, t, "temperature", 0, 0, 1e4, aw);
    sp.top_k = (int)num_in(L, t, "top_k", 0, 0, 1 << 30, aw);
    sp.top_p = (float)num_in(L, t, "top_p", 1, 0, 1, aw);
    sp.repetition_penalty = (float)num_in(L, t, "repetition_penalty", 1, 1e-6, 1e4, aw);
    sp.seed = (uint64_t)num_in(L, t, "seed", 0, 0, 18446744073709549568.0, aw); /* the largest double below 2^64 */
    lua_Number budget = num_in(L, t, "budget", 0, 0, 1e15, aw);
    const double timeout_ms = num_in(L, t, "timeout_ms", 0, 0, 1e9, aw);
    wf_retry_t retry;
    parse_retry(L, t, aw, &retry);
    raw_field(L, t, "ignore_eos");
    bool ignore_eos = lua_toboolean(L, -1);
    lua_pop(L, 1);
    const char *kvs = opt_str_field(L, t, "kv", what);
    int kv = kvs ? wf_kv_policy_parse(kvs) : KVM_KV_KVCOMM;
    if (kv < 0) return luaL_error(L, "%s '%s': kv must be \"dense\", \"prefix\" or \"kvcomm\" (got \"%s\")", what, name, kvs);
    raw_field(L, t, "stop");
    int stop_idx = lua_gettop(L);
    int n_stop = 0;
    if (lua_type(L, stop_idx) == LUA_TSTRING) n_stop = 1;
    else if (lua_type(L, stop_idx) == LUA_TTABLE) {
        n_stop = (int)lua_rawlen(L, stop_idx);
        if (!string_list(L, stop_idx, n_stop))
            return luaL_error(L, "%s '%s': stop must be a non-empty string (without NUL bytes) or a list of them", what, name);
    } else if (!lua_isnil(L, stop_idx))
        return luaL_error(L, "%s '%s': stop must be a string or a list of strings", what, name);
    /* tools = {"name", ...}: host tools the model may call (wf_tools.c); tool_rounds bounds the rounds */
    raw_field(L, t, "tools");
    int tools_idx = lua_gettop(L);
    int n_tools = 0;
    if (lua_type(L, tools_idx) == LUA_TTABLE) {
        n_tools = (int)lua_rawlen(L, tools_idx);
    }
    if ((n_tools == 0 && !lua_isnil(L, tools_idx) && !lua_istable(L, tools_idx)) || !string_list(L, tools_idx, n_tools))
        return luaL_error(L, "%s '%s': tools must be a list of tool names (non-empty strings)", what, name);
    const int tool_rounds = (int)num_in(L, t, "tool_rounds", 4, 1, 16, aw);
    /* template check before allocating the agent */
    kvm_tpl_part_t *parts;
    int n_parts;
    if (kvm_template_parse_parts(tmpl, &parts, &n_parts) != 0) return luaL_error(L, "agent '%s': %s", name, kvm_errmsg());
    char *w = where_dup(L);
    int *part_node = kvm_malloc(((size_t)n_parts + 1) * sizeof *part_node);
    wf_agent_t *na = kvm_realloc(wf->agents, (size_t)(wf->n_agents + 1) * sizeof *na);
    if (!na || !w || !part_node) {
        kvm_free(parts);
        kvm_free(part_node);
        kvm_free(w);
        if (na) wf->agents = na;
        return luaL_error(L, "out of memory");
    }
    wf->agents = na;
    wf_agent_t *a = &na[wf->n_agents++];
    memset(a, 0, sizeof *a);
    a->name = kvm_strdup(name);
    a->model = model;
    a->role = role ? kvm_strdup(role) : NULL;
    a->tmpl = kvm_strdup(tmpl);
    a->parts = parts;
    a->n_parts = n_parts;
    a->part_node = part_node;
    for (int i = 0; i < n_parts; i++) part_node[i] = -1;
    a->sampling = sp;
    a->max_tokens = (int)max_tokens;
    a->budget_tokens = (long)budget;
    a->ignore_eos = ignore_eos;
    a->kv = (kvm_kv_policy_t)kv;
    a->timeout_ms = timeout_ms;
    a->retry_max = retry.max;
    a->retry_backoff_ms = retry.backoff_ms;
    a->retry_on = retry.on;
    a->where = w;
    if (n_stop > 0) {
        a->stop = kvm_calloc((size_t)n_stop, sizeof *a->stop);
        for (int i = 0; a->stop && i < n_stop; i++) {
            if (lua_type(L, stop_idx) == LUA_TSTRING) lua_pushvalue(L, stop_idx);
            else lua_rawgeti(L, stop_idx, i + 1);
            a->stop[a->n_stop++] = kvm_strdup(lua_tostring(L, -1));
            lua_pop(L, 1);
        }
    }
    a->tool_rounds = tool_rounds;
    if (n_tools > 0) {
        a->tools = kvm_calloc((size_t)n_tools, sizeof *a->tools);
        for (int i = 0; a->tools && i < n_tools; i++) {
            lua_rawgeti(L, tools_idx, i + 1);
            a->tools[a->n_tools++] = kvm_strdup(lua_tostring(L, -1));
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 2); /* stop, tools */
    if (!a->name || !a->tmpl || (role && !a->role) || (n_stop && !a->stop) || (n_tools && !a->tools))
        return luaL_error(L, "out of memory");
    /* the stats table follows the agents */
    kvm_wf_agent_stats_t *ns = kvm_realloc(wf->stats, (size_t)wf->n_agents * sizeof *ns);
    if (!ns) return luaL_error(L, "out of memory");
    wf->stats = ns;
    memset(&ns[wf->n_agents - 1], 0, sizeof *ns);
    parse_kv_from(L, wf, t, &wf->agents[wf->n_agents - 1], aw); /* last: it may raise, the agent is complete */
    return wf->n_agents - 1;
}

static int l_agent(lua_State *L) {
    check_unfrozen(L, "kvmesh.agent");
    luaL_checktype(L, 1, LUA_TTABLE);
    push_handle(L, WF_MT_AGENT, make_agent(L, 1, NULL));
    return 1;
}

/* ---- kvmesh.graph ------------------------------------------------------------------------------- */

/* The graph of method `call` (e.g. "g:edge"): every graph method changes the graph, so each is refused
 * once the script has loaded. */
static wf_graph_t *check_graph(lua_State *L, int i, const char *call) {
    kvm_workflow_t *wf = getwf(L);
    check_unfrozen(L, call);
    int idx = check_handle(L, i, WF_MT_GRAPH);
    return wf->graphs[idx];
}

static int parse_reducer(lua_State *L, int idx, int *fn_ref, const char *key) {
    *fn_ref = LUA_NOREF;
    if (lua_type(L, idx) == LUA_TFUNCTION) {
        lua_pushvalue(L, idx);
        *fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        return WF_RED_FUNC;
    }
    const char *r = lua_type(L, idx) == LUA_TSTRING ? lua_tostring(L, idx) : NULL;
    static const char *const names[] = {"replace", "append", "merge", "sum", "max", "min"};
    if (r)
        for (int i = 0; i < 6; i++)
            if (!strcmp(names[i], r)) return i;
    return luaL_error(L, "kvmesh.graph: state key '%s': the reducer must be kvmesh.reduce.<replace|append|merge|sum|max|min> "
                         "or a function(old, new)", key);
}

/* g:limit{...} / limit = {...}: each given value must be a finite number in range (absent: -1). A script
 * may lower the operator's instruction, CPU and memory limits, never raise them (kvm_wf_start takes the
 * minimum). */
static void set_limits(lua_State *L, wf_graph_t *g, int t) {
    static const char *const lf[] = {"steps", "tokens", "wall_ms", "instructions", "memory_mb", "lua_ms", NULL};
    check_fields(L, t, "limit", lf);
    const double big = 1e15;
    lua_Number v;
    if ((v = num_in(L, t, "steps", -1, -1, big, "limit")) >= 0) {
        if (v < 1) luaL_error(L, "limit: steps must be >= 1");
        g->lim_steps = (long)v;
    }
    if ((v = num_in(L, t, "tokens", -1, -1, big, "limit")) >= 0) g->lim_tokens = (long)v;
    if ((v = num_in(L, t, "wall_ms", -1, -1, big, "limit")) >= 0) g->lim_wall_ms = (long)v;
    if ((v = num_in(L, t, "instructions", -1, -1, 1e18, "limit")) >= 0) g->lim_instructions = (uint64_t)v;
    if ((v = num_in(L, t, "memory_mb", -1, -1, 1e9, "limit")) >= 0) g->lim_memory_mb = (long)v;
    if ((v = num_in(L, t, "lua_ms", -1, -1, big, "limit")) >= 0) g->lim_lua_ms = v;
}

static int l_graph(lua_State *L) {
    kvm_workflow_t *wf = getwf(L);
    check_unfrozen(L, "kvmesh.graph");
    if (!lua_isnoneornil(L, 1)) luaL_checktype(L, 1, LUA_TTABLE);
    else {
        lua_newtable(L);
        lua_replace(L, 1);
    }
    static const char *const gf[] = {"name", "state", "limit", NULL};
    check_fields(L, 1, "kvmesh.graph", gf);
    const char *name = opt_str_field(L, 1, "name", "kvmesh.graph");
    wf_graph_t **ng = kvm_realloc(wf->graphs, (size_t)(wf->n_graphs + 1) * sizeof *ng);
    if (!ng) return luaL_error(L, "out of memory");
    wf->graphs = ng;
    wf_graph_t *g = kvm_calloc(1, sizeof *g);
    if (!g) return luaL_error(L, "out of memory");
    ng[wf->n_graphs++] = g;
    g->name = dup_or_die(L, name ? name : "workflow");
    g->where = where_dup(L);
    g->output_ref = g->dataset_ref = g->score_ref = LUA_NOREF;
    lua_newtable(L);
    g->init_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    raw_field(L, 1, "state");
    int st = lua_gettop(L);
    if (lua_type(L, st) == LUA_TTABLE) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, g->init_ref);
        int init = lua_gettop(L);
        lua_pushnil(L);
        while (lua_next(L, st)) {
            if (lua_type(L, -2) != LUA_TSTRING || !no_nul(L, -2)) return luaL_error(L, "kvmesh.graph: state keys must be strings without NUL bytes");
            const char *k = lua_tostring(L, -2);
            if (!strcmp(k, "input")) return luaL_error(L, "kvmesh.graph: state key 'input' is reserved (it is the run's input)");
            int red, ref, vi = lua_gettop(L);
            bool has_init = false;
            if (lua_type(L, vi) == LUA_TTABLE) { /* { reducer, init = value } */
                lua_rawgeti(L, vi, 1);
                red = parse_reducer(L, lua_gettop(L), &ref, k);
                lua_pop(L, 1);
                raw_field(L, vi, "init");
                has_init = !lua_isnil(L, -1);
                if (has_init) lua_setfield(L, init, k);
                else lua_pop(L, 1);
            } else
                red = parse_reducer(L, vi, &ref, k);
            if (!has_init && (red == WF_RED_APPEND || red == WF_RED_MERGE)) {
                lua_newtable(L);
                lua_setfield(L, init, k);
            } else if (!has_init && red == WF_RED_SUM) {
                lua_pushinteger(L, 0);
                lua_setfield(L, init, k);
            }
            wf_key_t *nk = kvm_realloc(g->keys, (size_t)(g->n_keys + 1) * sizeof *nk);
            if (!nk) return luaL_error(L, "out of memory");
            g->keys = nk;
            nk[g->n_keys].name = dup_or_die(L, k);
            nk[g->n_keys].reducer = red;
            nk[g->n_keys].fn_ref = ref;
            g->n_keys++;
            lua_settop(L, vi - 1);
        }
        lua_pop(L, 1);
    } else if (!lua_isnil(L, st))
        return luaL_error(L, "kvmesh.graph: field 'state' must be a table of key = reducer");
    lua_pop(L, 1);
    /* msgs (append) is always declared */
    bool has_msgs = false;
    for (int i = 0; i < g->n_keys; i++)
        if (!strcmp(g->keys[i].name, "msgs")) has_msgs = true;
    if (!has_msgs) {
        wf_key_t *nk = kvm_realloc(g->keys, (size_t)(g->n_keys + 1) * sizeof *nk);
        if (!nk) return luaL_error(L, "out of memory");
        g->keys = nk;
        char *msgs = dup_or_die(L, "msgs"); /* may raise: count the key only once it is whole */
        nk[g->n_keys++] = (wf_key_t){.name = msgs, .reducer = WF_RED_APPEND, .fn_ref = LUA_NOREF};
        lua_rawgeti(L, LUA_REGISTRYINDEX, g->init_ref);
        lua_newtable(L);
        lua_setfield(L, -2, "msgs");
        lua_pop(L, 1);
    }
    raw_field(L, 1, "limit");
    if (lua_type(L, -1) == LUA_TTABLE) set_limits(L, g, lua_gettop(L));
    lua_pop(L, 1);
    push_handle(L, WF_MT_GRAPH, wf->n_graphs - 1);
    return 1;
}

static void check_node_name(lua_State *L, wf_graph_t *g, const char *name) {
    if (!*name) luaL_error(L, "graph: a node name must not be empty");
    for (const char *p = name; *p; p++)
        if (!name_char(*p) && *p != '.') luaL_error(L, "graph: node name '%s' may only use letters, digits, '_', '-' and '.'", name);
    if (!strcmp(name, WF_START_NAME) || !strcmp(name, WF_END_NAME)) luaL_error(L, "graph: node name '%s' is reserved", name);
    for (int i = 0; i < g->n_nodes; i++)
        if (!strcmp(g->nodes[i].name, name)) luaL_error(L, "graph: a node named '%s' already exists (%s)", name, g->nodes[i].where);
}

static wf_node_t *add_node(lua_State *L, wf_graph_t *g, const char *name, int kind) {
    check_node_name(L, g, name);
    g->nodes = grow(L, g->nodes, g->n_nodes, sizeof *g->nodes);
    wf_node_t *n = &g->nodes[g->n_nodes++];
    memset(n, 0, sizeof *n);
    n->kind = kind;
    n->agent = -1;
    n->fn_ref = LUA_NOREF;
    n->router_ref = LUA_NOREF;
    n->name = dup_or_die(L, name);
    n->where = where_dup(L);
    return n;
}

/* g:agent(name, spec | agent [, {writes = key}]) (alias g:node) */
static int g_agent_as(lua_State *L, const char *call) {
    wf_graph_t *g = check_graph(L, 1, call);
    const char *name = check_name(L, 2, call);
    int ai = test_handle(L, 3, WF_MT_AGENT);
    const char *writes = NULL;
    if (ai < 0) {
        luaL_checktype(L, 3, LUA_TTABLE);
        writes = opt_str_field(L, 3, "writes", "g:agent");
        check_node_name(L, g, name);
        ai = make_agent(L, 3, name);
    }
    if (lua_type(L, 4) == LUA_TTABLE) writes = opt_str_field(L, 4, "writes", "g:agent");
    wf_node_t *n = add_node(L, g, name, WF_NODE_AGENT);
    n->agent = ai;
    if (writes) n->writes = dup_or_die(L, writes);
    lua_settop(L, 1);
    return 1;
}
static int g_agent(lua_State *L) { return g_agent_as(L, "g:agent"); }
static int g_node(lua_State *L) { return wf_lua_is_subgraph_spec(L, 3) ? wf_lua_g_subgraph(L) : g_agent_as(L, "g:node"); }

static int g_fnnode(lua_State *L, int kind, const char *call) {
    wf_graph_t *g = check_graph(L, 1, call);
    const char *name = check_name(L, 2, call);
    luaL_checktype(L, 3, LUA_TFUNCTION);
    const char *writes = lua_type(L, 4) == LUA_TTABLE ? opt_str_field(L, 4, "writes", "g:func") : NULL;
    wf_node_t *n = add_node(L, g, name, kind);
    lua_pushvalue(L, 3);
    n->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    if (writes) n->writes = dup_or_die(L, writes);
    lua_settop(L, 1);
    return 1;
}
static int g_func(lua_State *L) { return g_fnnode(L, WF_NODE_FUNC, "g:func"); }
static int g_tool(lua_State *L) { return g_fnnode(L, WF_NODE_TOOL, "g:tool"); }
static int g_verifier(lua_State *L) { return g_fnnode(L, WF_NODE_TOOL, "g:verifier"); }

static void free_names(char **v, int n) {
    for (int i = 0; i < n; i++) kvm_free(v[i]);
    kvm_free(v);
}

/* Reads a node name or a list of names at idx into a new array. */
static char **names_arg(lua_State *L, int idx, int *n, const char *what) {
    *n = 0;
    if (lua_type(L, idx) == LUA_TSTRING) {
        check_name(L, idx, what);
        char **v = kvm_calloc(1, sizeof *v);
        if (!v) luaL_error(L, "out of memory");
        v[0] = kvm_strdup(lua_tostring(L, idx));
        if (!v[0]) {
            kvm_free(v);
            luaL_error(L, "out of memory");
        }
        *n = 1;
        return v;
    }
    if (lua_type(L, idx) != LUA_TTABLE) luaL_error(L, "%s: expected a node name or a list of node names (got %s)", what, luaL_typename(L, idx));
    int len = (int)lua_rawlen(L, idx);
    if (len == 0) luaL_error(L, "%s: the list of node names is empty", what);
    for (int i = 1; i <= len; i++) {
        lua_rawgeti(L, idx, i);
        if (lua_type(L, -1) != LUA_TSTRING || !no_nul(L, -1)) luaL_error(L, "%s: item %d is not a node name (a string without NUL bytes)", what, i);
        lua_pop(L, 1);
    }
    char **v = kvm_calloc((size_t)len, sizeof *v);
    if (!v) luaL_error(L, "out of memory");
    for (int i = 1; i <= len; i++) {
        lua_rawgeti(L, idx, i);
        v[i - 1] = kvm_strdup(lua_tostring(L, -1));
        lua_pop(L, 1);
        if (!v[i - 1]) {
            free_names(v, i - 1);
            luaL_error(L, "out of memory");
        }
    }
    *n = len;
    return v;
}

void wf_free_strs(char **v, int n) {
    for (int i = 0; v && i < n; i++) kvm_free(v[i]);
    kvm_free(v);
}

/* g:edge(from, to | {to...} [, {when = fn, on_error = bool}]) */
static int g_edge(lua_State *L) {
    wf_graph_t *g = check_graph(L, 1, "g:edge");
    const char *from = check_name(L, 2, "g:edge");
    luaL_checkany(L, 3);
    int when = LUA_NOREF;
    bool on_error = false;
    if (lua_type(L, 4) == LUA_TTABLE) {
        static const char *const ef[] = {"when", "on_error", NULL};
        check_fields(L, 4, "g:edge", ef);
        raw_field(L, 4, "when");
        if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TFUNCTION) return luaL_error(L, "g:edge: 'when' must be a function(state, last)");
        lua_pop(L, 1);
        raw_field(L, 4, "on_error");
        on_error = lua_toboolean(L, -1);
        lua_pop(L, 1);
    } else if (!lua_isnoneornil(L, 4))
        return luaL_error(L, "g:edge: the options must be a table {when = fn, on_error = true}");
    int n;
    char **to = names_arg(L, 3, &n, "g:edge");
    if (lua_type(L, 4) == LUA_TTABLE) {
        raw_field(L, 4, "when");
        if (lua_isfunction(L, -1)) when = luaL_ref(L, LUA_REGISTRYINDEX);
        else lua_pop(L, 1);
    }
    char *w = where_dup(L);
    wf_edge_t *ne = kvm_realloc(g->edges, (size_t)(g->n_edges + n) * sizeof *ne);
    if (!ne) {
        wf_free_strs(to, n);
        kvm_free(w);
        return luaL_error(L, "out of memory");
    }
    g->edges = ne;
    bool ok = true;
    for (int i = 0; i < n; i++) {
        wf_edge_t *e = &ne[g->n_edges++];
        e->from = e->to = WF_START;
        e->from_name = kvm_strdup(from);
        e->to_name = to[i];
        e->when_ref = when; /* shared ref: released once at free (see wf_lua_close) */
        e->on_error = on_error;
        e->where = i == 0 ? w : w ? kvm_strdup(w) : NULL;
        ok = ok && e->from_name && e->where;
    }
    kvm_free(to);
    if (!ok) return luaL_error(L, "g:edge: out of memory"); /* the edges made are freed with the graph */
    lua_settop(L, 1);
    return 1;
}

/* g:route(from, fn [, {targets...}]) */
static int g_route(lua_State *L) {
    wf_graph_t *g = check_graph(L, 1, "g:route");
    const char *from = check_name(L, 2, "g:route");
    luaL_checktype(L, 3, LUA_TFUNCTION);
    int n = 0;
    char **targets = lua_isnoneornil(L, 4) ? NULL : names_arg(L, 4, &n, "g:route targets");
    /* resolved at validation; routes live on nodes, found by name there */
    wf_node_t *node = NULL;
    for (int i = 0; i < g->n_nodes; i++)
        if (!strcmp(g->nodes[i].name, from)) node = &g->nodes[i];
    if (!node) {
        wf_free_strs(targets, n);
        return luaL_error(L, "g:route: unknown node '%s' (define the node before its router)", from);
    }
    if (node->router_ref != LUA_NOREF) {
        wf_free_strs(targets, n);
        return luaL_error(L, "g:route: node '%s' already has a router (%s)", from, node->route_where);
    }
    lua_pushvalue(L, 3);
    node->router_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    node->route_names = targets;
    node->n_route_targets = n;
    node->route_declared = targets != NULL;
    node->route_where = where_dup(L);
    lua_settop(L, 1);
    return 1;
}

/* g:join({sources}, target [, {mode = "all" | "any"}]) */
static int g_join(lua_State *L) {
    wf_graph_t *g = check_graph(L, 1, "g:join");
    luaL_checktype(L, 2, LUA_TTABLE);
    const char *target = check_name(L, 3, "g:join");
    bool all = true;
    if (lua_type(L, 4) == LUA_TTABLE) {
        const char *mode = opt_str_field(L, 4, "mode", "g:join");
        if (mode && !strcmp(mode, "any")) all = false;
        else if (mode && strcmp(mode, "all") != 0) return luaL_error(L, "g:join: mode must be \"all\" or \"any\" (got \"%s\")", mode);
    }
    int n;
    char **src = names_arg(L, 2, &n, "g:join");
    g->joins = grow(L, g->joins, g->n_joins, sizeof *g->joins);
    wf_join_t *j = &g->joins[g->n_joins++];
    memset(j, 0, sizeof *j);
    j->src_names = src;
    j->n_src = n;
    j->src = kvm_calloc((size_t)n, sizeof *j->src);
    j->target_name = kvm_strdup(target);
    j->all = all;
    j->where = where_dup(L);
    if (!j->src || !j->target_name) return luaL_error(L, "out of memory");
    lua_settop(L, 1);
    return 1;
}

static int g_limit(lua_State *L) {
    wf_graph_t *g = check_graph(L, 1, "g:limit");
    luaL_checktype(L, 2, LUA_TTABLE);
    set_limits(L, g, 2);
    lua_settop(L, 1);
    return 1;
}

static int set_fn(lua_State *L, int *ref) {
    luaL_checktype(L, 2, LUA_TFUNCTION);
    if (*ref != LUA_NOREF) luaL_unref(L, LUA_REGISTRYINDEX, *ref);
    lua_pushvalue(L, 2);
    *ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_settop(L, 1);
    return 1;
}
static int g_output(lua_State *L) { return set_fn(L, &check_graph(L, 1, "g:output")->output_ref); }
static int g_dataset(lua_State *L) { return set_fn(L, &check_graph(L, 1, "g:dataset")->dataset_ref); }
static int g_score(lua_State *L) { return set_fn(L, &check_graph(L, 1, "g:score")->score_ref); }

static int g_tostring(lua_State *L) {
    kvm_workflow_t *wf = getwf(L);
    wf_graph_t *g = wf->graphs[check_handle(L, 1, WF_MT_GRAPH)];
    lua_pushfstring(L, "graph '%s' (%d nodes, %d edges)", g->name, g->n_nodes, g->n_edges);
    return 1;
}
static int a_tostring(lua_State *L) {
    kvm_workflow_t *wf = getwf(L);
    wf_agent_t *a = &wf->agents[check_handle(L, 1, WF_MT_AGENT)];
    lua_pushfstring(L, "agent '%s' (model %s, kv %s)", a->name, wf->models[a->model].path, kvm_kv_policy_name(a->kv));
    return 1;
}
static int m_tostring(lua_State *L) {
    kvm_workflow_t *wf = getwf(L);
    lua_pushfstring(L, "model '%s'", wf->models[check_handle(L, 1, WF_MT_MODEL)].path);
    return 1;
}
static int a_index(lua_State *L) {
    kvm_workflow_t *wf = getwf(L);
    wf_agent_t *a = &wf->agents[check_handle(L, 1, WF_MT_AGENT)];
    const char *k = luaL_checkstring(L, 2);
    if (!strcmp(k, "name")) lua_pushstring(L, a->name);
    else if (!strcmp(k, "template")) lua_pushstring(L, a->tmpl);
    else if (!strcmp(k, "role")) lua_pushstring(L, a->role ? a->role : "");
    else if (!strcmp(k, "max_tokens")) lua_pushinteger(L, a->max_tokens);
    else if (!strcmp(k, "kv")) lua_pushstring(L, kvm_kv_policy_name(a->kv));
    else lua_pushnil(L);
    return 1;
}

/* ---- validation --------------------------------------------------------------------------------- */

int wf_graph_find(const wf_graph_t *g, const char *name) {
    for (int i = 0; i < g->n_nodes; i++)
        if (!strcmp(g->nodes[i].name, name)) return i;
    return -1;
}

static int resolve(const wf_graph_t *g, const char *name, bool allow_start, bool allow_end, const char *where, const char *what) {
    if (allow_start && !strcmp(name, WF_START_NAME)) return WF_START;
    if (allow_end && !strcmp(name, WF_END_NAME)) return WF_END;
    int i = wf_graph_find(g, name);
    if (i >= 0) return i;
    char list[512] = "";
    size_t l = 0;
    for (int k = 0; k < g->n_nodes && l + 2 < sizeof list; k++)
        l += (size_t)snprintf(list + l, sizeof list - l, "%s%s", k ? ", " : "", g->nodes[k].name);
    if (!strcmp(name, WF_START_NAME) || !strcmp(name, WF_END_NAME))
        return kvm_seterr(KVM_EINVAL, "%s: %s: kvmesh.%s cannot be used here", where, what, !strcmp(name, WF_START_NAME) ? "START" : "END");
    return kvm_seterr(KVM_EINVAL, "%s: %s: unknown node '%s' (nodes: %s)", where, what, name, list);
}

/* DFS colouring over the static successor relation; fills path with a cycle if one exists. */
typedef struct {
    const wf_graph_t *g;
    int *color;
    int *parent;
    int cyc_from, cyc_to;
    bool uncond_only;      /* consider only unconditional edges and joins */
} cyc_t;

static int succ_list(const wf_graph_t *g, int u, bool uncond_only, int *out, int cap) {
    int n = 0;
    for (int i = 0; i < g->n_edges; i++) {
        const wf_edge_t *e = &g->edges[i];
        if (e->from != u || e->to < 0) continue;
        if (uncond_only && (e->when_ref != LUA_NOREF || e->on_error)) continue;
        if (n < cap) out[n++] = e->to;
    }
    for (int i = 0; i < g->n_joins; i++)
        for (int k = 0; k < g->joins[i].n_src; k++)
            if (g->joins[i].src[k] == u && n < cap) out[n++] = g->joins[i].target;
    if (!uncond_only && g->nodes[u].router_ref != LUA_NOREF) {
        if (g->nodes[u].route_declared) {
            for (int k = 0; k < g->nodes[u].n_route_targets; k++)
                if (g->nodes[u].route_targets[k] >= 0 && n < cap) out[n++] = g->nodes[u].route_targets[k];
        } else
            for (int k = 0; k < g->n_nodes && n < cap; k++) out[n++] = k;
    }
    return n;
}

static bool dfs(cyc_t *c, int u) {
    c->color[u] = 1;
    int cap = c->g->n_edges + c->g->n_nodes * 2 + 8;
    int *s = kvm_malloc((size_t)cap * sizeof *s);
    if (!s) return false;
    int n = succ_list(c->g, u, c->uncond_only, s, cap);
    for (int i = 0; i < n; i++) {
        int v = s[i];
        if (c->color[v] == 1) {
            c->cyc_from = u;
            c->cyc_to = v;
            kvm_free(s);
            return true;
        }
        if (c->color[v] == 0) {
            c->parent[v] = u;
            if (dfs(c, v)) {
                kvm_free(s);
                return true;
            }
        }
    }
    kvm_free(s);
    c->color[u] = 2;
    return false;
}

/* Finds a cycle; on success writes "a -> b -> a" into buf. */
static bool find_cycle(const wf_graph_t *g, bool uncond_only, char *buf, size_t cap) {
    cyc_t c = {.g = g, .uncond_only = uncond_only};
    c.color = kvm_calloc((size_t)g->n_nodes + 1, sizeof *c.color);
    c.parent = kvm_calloc((size_t)g->n_nodes + 1, sizeof *c.parent);
    bool found = false;
    for (int u = 0; c.color && c.parent && u < g->n_nodes && !found; u++)
        if (c.color[u] == 0) found = dfs(&c, u);
    if (found) {
        /* walk parents from cyc_from back to cyc_to */
        int chain[256], n = 0;
        for (int v = c.cyc_from; n < 256; v = c.parent[v]) {
            chain[n++] = v;
            if (v == c.cyc_to) break;
        }
        size_t l = 0;
        for (int i = n - 1; i >= 0 && l < cap; i--) l += (size_t)snprintf(buf + l, cap - l, "%s -> ", g->nodes[chain[i]].name);
        if (l < cap) snprintf(buf + l, cap - l, "%s", g->nodes[c.cyc_to].name);
    }
    kvm_free(c.color);
    kvm_free(c.parent);
    return found;
}

static const char *edge_where_on(const wf_graph_t *g, const char *cycle) {
    /* the first edge whose endpoints both appear in the cycle text (good enough for a message) */
    for (int i = 0; i < g->n_edges; i++) {
        const wf_edge_t *e = &g->edges[i];
        if (e->from >= 0 && e->to >= 0 && strstr(cycle, g->nodes[e->from].name) && strstr(cycle, g->nodes[e->to].name)) return e->where;
    }
    return g->where;
}

/* Resolves names and checks the graph: unknown nodes, START edges, mixed conditional/unconditional
 * out-edges, placeholders naming no producer, undeclared state keys, and loops (a cycle needs a
 * conditional edge or router on it, and every graph with a cycle needs g:limit{steps = N}). */
static int validate(kvm_workflow_t *wf, wf_graph_t *g) {
    if (g->n_nodes == 0) return kvm_seterr(KVM_EINVAL, "%s: graph '%s' has no nodes", g->where, g->name);
    bool has_start = false;
    for (int i = 0; i < g->n_edges; i++) {
        wf_edge_t *e = &g->edges[i];
        int f = resolve(g, e->from_name, true, false, e->where, "g:edge");
        if (f < WF_START) return f;
        int t = resolve(g, e->to_name, false, true, e->where, "g:edge");
        if (t < WF_END) return t;
        e->from = f;
        e->to = t;
        if (f == WF_START) {
            has_start = true;
            if (e->when_ref != LUA_NOREF) return kvm_seterr(KVM_EINVAL, "%s: g:edge: edges from kvmesh.START cannot be conditional", e->where);
        }
    }
    if (!has_start) return kvm_seterr(KVM_EINVAL, "%s: graph '%s' has no edge from kvmesh.START (add g:edge(kvmesh.START, \"%s\"))", g->where, g->name, g->nodes[0].name);
    for (int i = 0; i < g->n_joins; i++) {
        wf_join_t *j = &g->joins[i];
        for (int k = 0; k < j->n_src; k++) {
            int s = resolve(g, j->src_names[k], false, false, j->where, "g:join");
            if (s < 0) return s;
            j->src[k] = s;
        }
        int t = resolve(g, j->target_name, false, false, j->where, "g:join");
        if (t < 0) return t;
        j->target = t;
    }
    for (int i = 0; i < g->n_nodes; i++) {
        wf_node_t *n = &g->nodes[i];
        if (n->route_declared) {
            n->route_targets = kvm_calloc((size_t)n->n_route_targets, sizeof *n->route_targets);
            if (!n->route_targets) return KVM_ENOMEM;
            for (int k = 0; k < n->n_route_targets; k++) {
                int t = resolve(g, n->route_names[k], false, true, n->route_where, "g:route");
                if (t < WF_END) return t;
                n->route_targets[k] = t;
            }
        }
        bool cond = false, uncond = false;
        for (int k = 0; k < g->n_edges; k++) {
            const wf_edge_t *e = &g->edges[k];
            if (e->from != i || e->on_error) continue;
            if (e->when_ref != LUA_NOREF) cond = true;
            else uncond = true;
        }
        if (cond && uncond)
            return kvm_seterr(KVM_EINVAL, "%s: node '%s' mixes conditional and unconditional out-edges; make them all conditional (or use g:route)", n->where, n->name);
        if (n->router_ref != LUA_NOREF && (cond || uncond))
            return kvm_seterr(KVM_EINVAL, "%s: node '%s' has a router and also out-edges; use one or the other", n->route_where, n->name);
        if (n->writes) {
            bool ok = false;
            for (int k = 0; k < g->n_keys; k++)
                if (!strcmp(g->keys[k].name, n->writes)) ok = true;
            if (!ok) return kvm_seterr(KVM_EINVAL, "%s: node '%s' writes state key '%s', which the graph does not declare (kvmesh.graph{state = {%s = ...}})", n->where, n->name, n->writes, n->writes);
        }
    }
    /* placeholders: agent/tool slots name producer nodes; state slots name declared keys */
    for (int i = 0; i < g->n_nodes; i++) {
        if (g->nodes[i].kind != WF_NODE_AGENT) continue;
        wf_agent_t *a = &wf->agents[g->nodes[i].agent];
        for (int k = 0; k < a->n_parts; k++) {
            const kvm_tpl_part_t *p = &a->parts[k];
            if (p->src == KVM_TPL_AGENT || p->src == KVM_TPL_AGENT_PREV) {
                int nd = wf_graph_find(g, p->key);
                if (nd < 0)
                    for (int q = 0; q < g->n_nodes; q++)
                        if (g->nodes[q].kind == WF_NODE_AGENT && !strcmp(wf->agents[g->nodes[q].agent].name, p->key)) nd = q;
                if (nd < 0 || g->nodes[nd].kind != WF_NODE_AGENT)
                    return kvm_seterr(KVM_EINVAL, "%s: agent '%s': placeholder {%s} names no agent node of graph '%s'", a->where, a->name, p->source, g->name);
                if (a->part_node[k] >= 0 && a->part_node[k] != nd) return wf_subgraph_shared_agent(a, p->source, g);
                a->part_node[k] = nd;
            } else if (p->src == KVM_TPL_TOOL) {
                int nd = wf_graph_find(g, p->key);
                if (nd < 0 || g->nodes[nd].kind != WF_NODE_TOOL)
                    return kvm_seterr(KVM_EINVAL, "%s: agent '%s': placeholder {%s} names no tool node (g:tool) of graph '%s'", a->where, a->name, p->source, g->name);
                if (a->part_node[k] >= 0 && a->part_node[k] != nd) return wf_subgraph_shared_agent(a, p->source, g);
                a->part_node[k] = nd;
            } else if (p->src == KVM_TPL_STATE) {
                bool ok = false;
                for (int q = 0; q < g->n_keys; q++)
                    if (!strcmp(g->keys[q].name, p->key)) ok = true;
                if (!ok) return kvm_seterr(KVM_EINVAL, "%s: agent '%s': placeholder {%s} names an undeclared state key", a->where, a->name, p->source);
            }
        }
    }
    g->validated = true;
    for (int i = 0; i < g->n_nodes; i++) /* the graphs of its subgraph nodes, each once */
        if (g->nodes[i].kind == WF_NODE_SUBGRAPH && !wf->graphs[g->nodes[i].sub]->validated) {
            int rc = validate(wf, wf->graphs[g->nodes[i].sub]);
            if (rc) return rc;
        }
    char cyc[1024];
    if (find_cycle(g, true, cyc, sizeof cyc))
        return kvm_seterr(KVM_EINVAL, "%s: the cycle %s has no conditional edge or router on it: it could only end by exhausting the step budget",
                          edge_where_on(g, cyc), cyc);
    if (g->lim_steps == 0 && find_cycle(g, false, cyc, sizeof cyc))
        return kvm_seterr(KVM_EINVAL, "%s: graph '%s' has a cycle (%s) but no step budget: add g:limit{steps = N}", edge_where_on(g, cyc), g->name, cyc);
    /* reachability: warn only */
    int *seen = kvm_calloc((size_t)g->n_nodes, sizeof *seen), *stack = kvm_malloc(((size_t)g->n_nodes + 1) * sizeof *stack);
    int cap = g->n_edges + g->n_nodes * 2 + 8, *s = kvm_malloc((size_t)cap * sizeof *s);
    if (seen && stack && s) {
        int sp = 0;
        for (int k = 0; k < g->n_edges; k++)
            if (g->edges[k].from == WF_START && g->edges[k].to >= 0 && !seen[g->edges[k].to]) {
                seen[g->edges[k].to] = 1;
                stack[sp++] = g->edges[k].to;
            }
        while (sp > 0) {
            int u = stack[--sp];
            int n = succ_list(g, u, false, s, cap);
            for (int q = 0; q < g->n_edges; q++)
                if (g->edges[q].from == u && g->edges[q].on_error && g->edges[q].to >= 0 && n < cap) s[n++] = g->edges[q].to;
            for (int q = 0; q < n; q++)
                if (!seen[s[q]]) {
                    seen[s[q]] = 1;
                    stack[sp++] = s[q];
                }
        }
        for (int k = 0; k < g->n_nodes; k++)
            if (!seen[k]) KVM_LOGW("%s: node '%s' is unreachable from kvmesh.START", g->nodes[k].where, g->nodes[k].name);
    }
    kvm_free(seen);
    kvm_free(stack);
    kvm_free(s);
    return 0;
}

/* ---- opening the state -------------------------------------------------------------------------- */

static int c_log(lua_State *L) {
    const char *lv = luaL_checkstring(L, 1);
    const char *msg = luaL_checkstring(L, 2);
    wf_log(getwf(L), lv, msg);
    return 0;
}

static int l_panic(lua_State *L) {
    const char *m = lua_tostring(L, -1);
    kvm_assert_fail(__FILE__, __LINE__, m ? m : "Lua panic");
}

static void l_warn(void *ud, const char *msg, int tocont) {
    /* pieces are concatenated in a static buffer until the last one; control messages are ignored */
    static char buf[1024];
    static size_t len;
    if (!tocont && len == 0 && msg[0] == '@') return;
    size_t n = strlen(msg);
    if (len + n >= sizeof buf) n = sizeof buf - 1 - len;
    memcpy(buf + len, msg, n);
    len += n;
    buf[len] = '\0';
    if (!tocont) {
        wf_log(ud, "warn", buf);
        len = 0;
    }
}

/* kvmesh.blame(run_id [, k]): the ranked candidates of blame for an ended run of this runtime (docs/lua-api.md) as
 * {run_id, agent, step, steps, candidates = {{agent, step, score, evidence}...}, schemata = {{id, score}...}}; nil and
 * the reason for a run that is unknown, going (the caller's own) or untraced. Never a path, never a replay (the
 * executor is not re-entrant: a verify would step the run that calls it). */
static int l_blame(lua_State *L) {
    kvm_workflow_t *wf = getwf(L);
    size_t n = 0;
    const char *id = luaL_checklstring(L, 1, &n);
    lua_Integer k = luaL_optinteger(L, 2, 5);
    if (k < 0 || k > KVM_BLAME_MAX_K) return luaL_error(L, "kvmesh.blame: k must be in 0..%d (got %I)", KVM_BLAME_MAX_K, k);
    bool hex = n > 0 && n < KVM_TRACE_ID_HEX;
    for (size_t i = 0; hex && i < n; i++) hex = (id[i] >= '0' && id[i] <= '9') || (id[i] >= 'a' && id[i] <= 'f');
    if (!hex) {
        lua_pushnil(L);
        lua_pushstring(L, "kvmesh.blame: a run id is the hex id of a run of this runtime (kvmesh.blame takes no path)");
        return 2;
    }
    kvm_blame_t b;
    int steps = 0;
    char why[512];
    int rc = wf_api_blame(wf, id, (int)k, &b, &steps, why, sizeof why);
    wf_charge(L, 200.0 * steps); /* the trace was read and scored on the script's behalf */
    if (rc) {
        lua_pushnil(L);
        lua_pushfstring(L, "kvmesh.blame: %s", why);
        return 2;
    }
    lua_createtable(L, 0, 6);
    lua_pushlstring(L, id, n);
    lua_setfield(L, -2, "run_id");
    lua_pushstring(L, b.agent);
    lua_setfield(L, -2, "agent");
    lua_pushinteger(L, b.step);
    lua_setfield(L, -2, "step");
    lua_pushinteger(L, steps);
    lua_setfield(L, -2, "steps");
    lua_createtable(L, b.n_cand, 0);
    for (int i = 0; i < b.n_cand; i++) {
        lua_createtable(L, 0, 4);
        lua_pushstring(L, b.cand[i].agent);
        lua_setfield(L, -2, "agent");
        lua_pushinteger(L, b.cand[i].step);
        lua_setfield(L, -2, "step");
        lua_pushnumber(L, b.cand[i].score);
        lua_setfield(L, -2, "score");
        lua_pushstring(L, b.cand[i].evidence);
        lua_setfield(L, -2, "evidence");
        lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -2, "candidates");
    lua_createtable(L, b.n_schemata, 0);
    for (int i = 0; i < b.n_schemata; i++) {
        lua_createtable(L, 0, 2);
        lua_pushinteger(L, b.schema_ids[i]);
        lua_setfield(L, -2, "id");
        lua_pushnumber(L, b.schema_scores[i]);
        lua_setfield(L, -2, "score");
        lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -2, "schemata");
    return 1;
}

static const luaL_Reg kvmesh_fns[] = {{"model", l_model}, {"agent", l_agent}, {"graph", l_graph}, {"json", l_json},
                                      {"now_ms", l_now_ms}, {"log", c_log}, {"interrupt", wf_interrupt},
                                      {"blame", l_blame}, {NULL, NULL}};
static const luaL_Reg graph_methods[] = {{"agent", g_agent}, {"node", g_node}, {"func", g_func}, {"tool", g_tool},
                                         {"verifier", g_verifier}, {"edge", g_edge}, {"route", g_route}, {"join", g_join},
                                         {"limit", g_limit}, {"output", g_output}, {"dataset", g_dataset}, {"score", g_score},
                                         {"subgraph", wf_lua_g_subgraph},
                                         {NULL, NULL}};

static const luaL_Reg ctx_methods[] = {{"call", wf_ctx_call}, {"map", wf_ctx_map}, {"tool", wf_ctx_tool},
                                       {"log", ctx_log}, {NULL, NULL}};

/* Pushes a locked metatable (registered as `name`, or a plain one when name is NULL) with __tostring
 * and an __index that is a function or a table of methods (each optional). */
static void new_locked_mt(lua_State *L, const char *name, lua_CFunction tostring, lua_CFunction index, const luaL_Reg *methods) {
    if (name) luaL_newmetatable(L, name);
    else lua_newtable(L);
    if (tostring) {
        lua_pushcfunction(L, tostring);
        lua_setfield(L, -2, "__tostring");
    }
    if (index || methods) {
        if (index) lua_pushcfunction(L, index);
        else {
            lua_newtable(L);
            luaL_setfuncs(L, methods, 0);
        }
        lua_setfield(L, -2, "__index");
    }
    lua_pushliteral(L, "locked");
    lua_setfield(L, -2, "__metatable");
}

/* Everything that can raise runs here, under lua_pcall. */
static int open_protected(lua_State *L) {
    kvm_workflow_t *wf = getwf(L);
    static const luaL_Reg libs[] = {{LUA_GNAME, luaopen_base}, {LUA_TABLIBNAME, luaopen_table}, {LUA_STRLIBNAME, luaopen_string},
                                    {LUA_MATHLIBNAME, luaopen_math}, {LUA_UTF8LIBNAME, luaopen_utf8}, {LUA_COLIBNAME, luaopen_coroutine},
                                    {NULL, NULL}};
    for (const luaL_Reg *l = libs; l->name; l++) {
        luaL_requiref(L, l->name, l->func, 1);
        lua_pop(L, 1);
    }
    lua_pushglobaltable(L);
    int G = lua_gettop(L);
    static const char *const drop[] = {"dofile", "loadfile", "load", "require", NULL};
    for (int i = 0; drop[i]; i++) {
        lua_pushnil(L);
        lua_setfield(L, G, drop[i]);
    }
    lua_pushcfunction(L, l_print);
    lua_setfield(L, G, "print");
    lua_pushcfunction(L, l_collectgarbage);
    lua_setfield(L, G, "collectgarbage");
    lua_pushcfunction(L, l_rawset);
    lua_setfield(L, G, "rawset");
    lua_getfield(L, G, "string");
    lua_pushnil(L);
    lua_setfield(L, -2, "dump");
    lua_pop(L, 1);
    lua_getfield(L, G, "math");
    lua_pushcfunction(L, l_random);
    lua_setfield(L, -2, "random");
    lua_pushcfunction(L, l_randomseed);
    lua_setfield(L, -2, "randomseed");
    lua_pop(L, 1);
    wf_sandbox_wrap_libs(L, G); /* before the library tables are frozen */
    /* lock the string metatable: scripts cannot reach or patch string methods */
    lua_pushliteral(L, "");
    lua_getmetatable(L, -1);
    lua_pushliteral(L, "locked");
    lua_setfield(L, -2, "__metatable");
    lua_pop(L, 2);
    /* handle metatables */
    new_locked_mt(L, WF_MT_MODEL, m_tostring, NULL, NULL);
    new_locked_mt(L, WF_MT_AGENT, a_tostring, a_index, NULL);
    new_locked_mt(L, WF_MT_GRAPH, g_tostring, NULL, graph_methods);
    lua_getfield(L, -1, "__index"); /* a misspelled method: an error with the nearest name */
    lua_pushliteral(L, "a graph");
    lua_pushcclosure(L, l_strict_index, 2);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 3);
    /* ctx objects of func nodes: {run_id, seed, node, superstep} + methods */
    new_locked_mt(L, NULL, NULL, NULL, ctx_methods);
    wf->ctx_mt_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    /* the kvmesh table */
    luaL_newlib(L, kvmesh_fns);
    lua_pushliteral(L, WF_START_NAME);
    lua_setfield(L, -2, "START");
    lua_pushliteral(L, WF_END_NAME);
    lua_setfield(L, -2, "END");
    lua_pushliteral(L, KVM_VERSION);
    lua_setfield(L, -2, "version");
    lua_newtable(L);
    static const char *const reds[] = {"replace", "append", "merge", "sum", "max", "min", NULL};
    for (int i = 0; reds[i]; i++) {
        lua_pushstring(L, reds[i]);
        lua_setfield(L, -2, reds[i]);
    }
    push_strict_proxy(L, "kvmesh.reduce");
    lua_setfield(L, -2, "reduce");
    add_host_fns(L, &getwf(L)->o);
    freeze_plain_tables(L);
    wf_lua_push_proxy(L); /* not strict: `kvmesh.name == nil` tells whether a host function is registered */
    lua_setfield(L, G, "kvmesh");
    /* freeze the library tables */
    static const char *const frozen[] = {"string", "table", "math", "utf8", "coroutine", NULL};
    for (int i = 0; frozen[i]; i++) {
        lua_getfield(L, G, frozen[i]);
        wf_lua_push_proxy(L);
        lua_setfield(L, G, frozen[i]);
    }
    /* the script's globals: a fresh table over the (hidden) base globals; frozen after load */
    lua_newtable(L);
    int env = lua_gettop(L);
    lua_pushvalue(L, env);
    lua_setfield(L, env, "_G");
    lua_newtable(L);
    lua_pushvalue(L, G);
    lua_setfield(L, -2, "__index");
    lua_pushliteral(L, "locked");
    lua_setfield(L, -2, "__metatable");
    lua_setmetatable(L, env);
    wf->env_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushnil(L);
    lua_setfield(L, G, "_G"); /* no path from a script back to the real globals */
    return 0;
}

int wf_lua_open(kvm_workflow_t *wf) {
    wf->acct_shared = kvm_calloc(1, sizeof *wf->acct_shared);
    if (!wf->acct_shared) return kvm_seterr(KVM_ENOMEM, "lua: out of memory");
    wf->acct_shared->cap = wf->total_cap;
    wf->L = lua_newstate(wf_alloc, wf);
    if (!wf->L) return kvm_seterr(KVM_ENOMEM, "lua: cannot create the state");
    lua_atpanic(wf->L, l_panic);
    lua_setwarnf(wf->L, l_warn, wf);
    lua_sethook(wf->L, wf_hook, LUA_MASKCOUNT, WF_HOOK_COUNT);
    lua_pushcfunction(wf->L, open_protected);
    if (lua_pcall(wf->L, 0, 0, 0) != LUA_OK) {
        int rc = kvm_seterr(KVM_ELUA_RUNTIME, "lua: sandbox setup failed: %s", lua_tostring(wf->L, -1));
        lua_pop(wf->L, 1);
        return rc;
    }
    return 0;
}

/* Moves the entries of the env table into a backing table and leaves env empty with __index =
 * backing and a raising __newindex: from now on scripts read their globals but cannot set any. */
static int freeze_env(lua_State *L) {
    kvm_workflow_t *wf = getwf(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, wf->env_ref);
    int env = lua_gettop(L);
    lua_newtable(L);
    int back = lua_gettop(L);
    lua_getmetatable(L, env); /* old mt: __index = base globals */
    lua_setmetatable(L, back);
    lua_pushnil(L);
    while (lua_next(L, env)) {
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_rawset(L, back);
    }
    for (;;) { /* clear env */
        lua_pushnil(L);
        if (!lua_next(L, env)) break;
        lua_pop(L, 1);
        lua_pushnil(L);
        lua_rawset(L, env);
    }
    push_guard_mt(L, back, l_frozen_global);
    lua_setmetatable(L, env);
    return 0;
}

static int map_status(int st) {
    switch (st) {
    case LUA_ERRSYNTAX: return KVM_ELUA_SYNTAX;
    case LUA_ERRMEM: return KVM_ELUA_MEMORY;
    default: return KVM_ELUA_RUNTIME;
    }
}

int wf_lua_load_script(kvm_workflow_t *wf, const char *chunkname, const char *src, size_t len) {
    lua_State *L = wf->L;
    if (len > WF_SOURCE_CAP) return kvm_seterr(KVM_EINVAL, "%s: script of %zu bytes is over the 1 MiB cap", chunkname + 1, len);
    if (len > 0 && (unsigned char)src[0] == 0x1b) return kvm_seterr(KVM_ELUA_SYNTAX, "%s: binary (precompiled) chunks are refused; give Lua source text", chunkname + 1);
    wf->load_budget.max_instructions = wf->o.max_instructions;
    wf->load_budget.max_lua_ns = (uint64_t)(wf->o.lua_cpu_ms * 1e6);
    wf->cur_budget = &wf->load_budget;
    wf->cur_acct = wf->acct_shared;
    int top = lua_gettop(L);
    lua_pushcfunction(L, wf_lua_msgh);
    int st = luaL_loadbufferx(L, src, len, chunkname, "t");
    if (st != LUA_OK) {
        int rc = kvm_seterr(map_status(st), "%s", lua_tostring(L, -1));
        lua_settop(L, top);
        wf->cur_budget = NULL;
        return rc;
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, wf->env_ref);
    lua_setupvalue(L, -2, 1);
    wf->load_budget.slice_t0 = kvm_now_ns();
    st = lua_pcall(L, 0, 1, top + 1);
    wf->load_budget.lua_ns += kvm_now_ns() - wf->load_budget.slice_t0;
    wf->load_budget.slice_t0 = 0;
    wf->cur_budget = NULL;
    if (st != LUA_OK) {
        int code = wf->load_budget.killed ? KVM_EBUDGET : map_status(st);
        int rc = kvm_seterr(code, "%s", lua_tostring(L, -1) ? lua_tostring(L, -1) : "not enough memory");
        lua_settop(L, top);
        return rc;
    }
    int gi = test_handle(L, -1, WF_MT_GRAPH);
    if (gi < 0) {
        int rc = kvm_seterr(KVM_EINVAL, "%s: the script must end with 'return g', g a kvmesh.graph{} (it returned %s)", chunkname + 1,
                            luaL_typename(L, -1));
        lua_settop(L, top);
        return rc;
    }
    wf->g = wf->graphs[gi];
    wf->frozen = true; /* from here on, nothing may change the graph, the agents or the models */
    lua_settop(L, top);
    lua_pushcfunction(L, freeze_env);
    if (lua_pcall(L, 0, 0, 0) != LUA_OK) {
        int rc = kvm_seterr(KVM_ELUA_MEMORY, "%s: cannot freeze globals: %s", chunkname + 1, lua_tostring(L, -1));
        lua_settop(L, top);
        return rc;
    }
    return validate(wf, wf->g);
}

/* ---- for wf_subgraph.c ---------------------------------------------------------------------------- */

wf_graph_t *wf_lua_check_graph(lua_State *L, int i, const char *call) { return check_graph(L, i, call); }
int wf_lua_graph_index(lua_State *L, int i) { return test_handle(L, i, WF_MT_GRAPH); }
const char *wf_lua_check_name(lua_State *L, int idx, const char *what) { return check_name(L, idx, what); }
void wf_lua_check_fields(lua_State *L, int t, const char *what, const char *const *allowed) { check_fields(L, t, what, allowed); }
wf_node_t *wf_lua_add_node(lua_State *L, wf_graph_t *g, const char *name, int kind) { return add_node(L, g, name, kind); }
