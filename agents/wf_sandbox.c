/* wf_sandbox.c - C work done inside library functions on a script's behalf, bounded by the run's budgets.
 *
 * The instruction hook only counts Lua instructions: a library function that loops in C (string.rep of
 * an empty string a trillion times, a backtracking pattern, table.move over a huge range, a finalizer)
 * would run past every budget without a hook firing. Every such function is wrapped here:
 *
 *   - its worst-case work is computed from its arguments BEFORE the call (for patterns: an upper bound of
 *     the steps of a backtracking matcher, from the pattern's items and the subject, see pattern_cost);
 *     work that does not fit the instructions left in the run's budget kills the run (KVM_EBUDGET) with a
 *     message naming the function, as the hook does;
 *   - the work that runs is charged to the instruction budget (one instruction per byte scanned or
 *     element moved), and the CPU budget is checked on return: a run over either is killed at its next
 *     instruction, so a loop of costly calls stops after one call, not after a hook period;
 *   - setmetatable refuses metatables with __gc (finalizers run with hooks off, also at lua_close).
 *
 * The wrapper calls the library's own C function on the same stack frame, so results and error
 * messages are the library's. docs/security.md ("The Lua sandbox") lists what is bounded and how. */
#include "wf_internal.h"

#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* Work allowed to one library call when no budget is set (no script code runs then; a safety net). */
#define WF_C_WORK_MAX 1e9

static kvm_workflow_t *getwf(lua_State *L) {
    void *ud = NULL;
    lua_getallocf(L, &ud);
    return ud;
}

/* Instructions left in the current budget. */
static double room(const wf_budget_t *b) {
    if (!b) return WF_C_WORK_MAX;
    if (!b->max_instructions) return INFINITY;
    return b->instructions >= b->max_instructions ? 0 : (double)(b->max_instructions - b->instructions);
}

void wf_charge(lua_State *L, double units) {
    wf_budget_t *b = getwf(L)->cur_budget;
    if (!b) return;
    if (units > 0) b->instructions += units >= 1e18 ? (uint64_t)1e18 : (uint64_t)units;
    bool over = b->killed || (b->max_instructions && b->instructions > b->max_instructions);
    if (!over && b->max_lua_ns && b->slice_t0) over = b->lua_ns + (kvm_now_ns() - b->slice_t0) > b->max_lua_ns;
    if (over) lua_sethook(L, wf_hook, LUA_MASKCOUNT, 1); /* the hook kills the run at its next instruction */
}

int wf_budget_kill(lua_State *L, const char *fmt, ...) {
    char msg[sizeof ((wf_budget_t *)0)->kill_msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    wf_budget_t *b = getwf(L)->cur_budget;
    if (b) {
        b->killed = true;
        b->kill_code = KVM_EBUDGET;
        snprintf(b->kill_msg, sizeof b->kill_msg, "%s", msg);
        lua_sethook(L, wf_hook, LUA_MASKCOUNT, 1); /* a pcall that catches this is hit again at once */
    }
    return luaL_error(L, "kvmesh: %s", msg);
}

/* Refuses `cost` steps of C work in fn when they exceed what the budget has left; else charges `charge`. */
static void bound(lua_State *L, const char *fn, double cost, double charge, const char *what) {
    double left = room(getwf(L)->cur_budget);
    if (cost > left)
        wf_budget_kill(L, "%s: %s could take up to %.3g steps in C, over the %.3g instructions left in the run's budget", fn, what,
                       cost, left);
    wf_charge(L, charge);
}

/* Calls the wrapped library function (upvalue 1) on this frame: its arguments, results and messages. */
static int call_orig(lua_State *L) {
    lua_CFunction f = lua_tocfunction(L, lua_upvalueindex(1));
    int n = f(L);
    wf_charge(L, 0); /* CPU time of the call */
    return n;
}

/* ---- patterns --------------------------------------------------------------------------------------- */

/* Whether byte c is in class %cl (the manual's classes; an upper-case letter is the complement). */
static bool class_has(int c, int cl) {
    bool r;
    switch (tolower(cl)) {
    case 'a': r = isalpha(c); break;
    case 'c': r = iscntrl(c); break;
    case 'd': r = isdigit(c); break;
    case 'g': r = isgraph(c); break;
    case 'l': r = islower(c); break;
    case 'p': r = ispunct(c); break;
    case 's': r = isspace(c); break;
    case 'u': r = isupper(c); break;
    case 'w': r = isalnum(c); break;
    case 'x': r = isxdigit(c); break;
    default: return cl == c;
    }
    return isupper(cl) ? !r : r;
}

/* The end of a set whose body starts at p (after '['): past its ']', or NULL when it is not closed. A ']'
 * right after '[' or '[^' is a member, '%' escapes the next byte. */
static const char *set_end(const char *p, const char *e) {
    if (p < e && *p == '^') p++;
    do {
        if (p >= e) return NULL;
        if (*p++ == '%') {
            if (p >= e) return NULL;
            p++;
        }
    } while (p < e && *p != ']');
    return p < e ? p + 1 : NULL;
}

/* Whether c is in the set [p, ec) (p after '[', ec at its ']'). */
static bool set_has(int c, const char *p, const char *ec) {
    bool neg = *p == '^';
    if (neg) p++;
    for (const char *q = p; q < ec; q++) {
        if (*q == '%' && q + 1 < ec) {
            q++;
            if (class_has(c, (unsigned char)*q)) return !neg;
        } else if (q + 2 < ec && q[1] == '-') {
            if ((unsigned char)q[0] <= c && c <= (unsigned char)q[2]) return !neg;
            q += 2;
        } else if ((unsigned char)*q == c)
            return !neg;
    }
    return neg;
}

/* The end of the single-byte item at p ('.', %x, [set] or a byte), NULL when malformed. */
static const char *item_end(const char *p, const char *e) {
    if (*p == '%') return p + 2 <= e ? p + 2 : NULL;
    if (*p == '[') return set_end(p + 1, e);
    return p + 1;
}

static bool item_has(int c, const char *p, const char *ep) {
    if (*p == '.') return true;
    if (*p == '%') return class_has(c, (unsigned char)p[1]);
    if (*p == '[') return set_has(c, p + 1, ep - 1);
    return (unsigned char)*p == c;
}

/* The longest run of subject bytes the item [p, ep) matches: how far a repetition of it can expand. */
static size_t max_run(const unsigned char *s, size_t n, const char *p, const char *ep) {
    if (*p == '.') return n;
    size_t best = 0, cur = 0;
    for (size_t i = 0; i < n; i++) {
        cur = item_has(s[i], p, ep) ? cur + 1 : 0;
        if (cur > best) best = cur;
    }
    return best;
}

/* An upper bound of the steps a backtracking matcher of Lua patterns takes to try pattern p at every
 * start of a subject of n bytes (one start when anchored). Items are visited once per way of matching
 * the items before them: a repetition (*, +, -) of an item that matches at most R bytes in a row
 * multiplies the ways by R + 1, '?' by 2; each visit costs the item's test (its length in the pattern)
 * times the bytes it may scan (R + 1 for a repetition, n + 1 for %b and back-references). Sound for
 * any pattern (a malformed one is counted up to where the matcher raises), far above the real cost for
 * most: see docs/security.md. */
static double pattern_cost(const unsigned char *s, size_t n, const char *p, size_t lp, bool anchor) {
    const char *e = p + lp;
    double starts = (double)n + 1, ways = 1, total = 0, full = (double)n + 1;
    bool scan = (double)n * (double)lp <= 1e8; /* measuring runs is itself bounded work */
    if (anchor && p < e && *p == '^') {
        starts = 1;
        p++;
    }
    while (p < e) {
        double w = 1, b = 1;
        if (*p == '(') p += p + 1 < e && p[1] == ')' ? 2 : 1;
        else if (*p == ')' || (*p == '$' && p + 1 == e)) p++;
        else if (*p == '%' && p + 1 < e && (p[1] == 'b' || isdigit((unsigned char)p[1]))) {
            w = full;
            p += p[1] == 'b' ? 4 : 2;
        } else if (*p == '%' && p + 1 < e && p[1] == 'f') {
            const char *q = p + 2 < e && p[2] == '[' ? set_end(p + 3, e) : NULL;
            if (!q) break;
            w = (double)(q - p);
            p = q;
        } else {
            const char *ep = item_end(p, e);
            if (!ep) break; /* malformed: the matcher raises when it gets here */
            double c = (double)(ep - p);
            if (ep < e && strchr("*+-?", *ep)) {
                b = *ep == '?' ? 2 : (scan ? (double)max_run(s, n, p, ep) : (double)n) + 1;
                w = b * c;
                p = ep + 1;
            } else {
                w = c;
                p = ep;
            }
        }
        total += ways * w;
        ways *= b;
    }
    return starts * (total + 1);
}

/* Whether p needs the pattern matcher (has a magic character) rather than a plain search. */
static bool has_specials(const char *p, size_t lp) {
    for (size_t i = 0; i < lp; i++)
        if (strchr("^$*+?.([%-", p[i]) && p[i]) return true;
    return false;
}

/* string.find / match / gmatch / gsub: the matcher's worst case must fit the budget. */
static int bound_pattern(lua_State *L, const char *fn, bool anchor, bool may_be_plain) {
    size_t n, lp;
    const char *s = luaL_checklstring(L, 1, &n);
    const char *p = luaL_checklstring(L, 2, &lp);
    double cost;
    if (may_be_plain && (lua_toboolean(L, 4) || !has_specials(p, lp)))
        cost = lp > n ? 1 : ((double)n - (double)lp + 1) * ((double)lp + 1);
    else
        cost = pattern_cost((const unsigned char *)s, n, p, lp, anchor);
    bound(L, fn, cost, (double)n + (double)lp, "the pattern on this subject");
    return call_orig(L);
}

static int w_find(lua_State *L) { return bound_pattern(L, "string.find", true, true); }
static int w_match(lua_State *L) { return bound_pattern(L, "string.match", true, false); }
static int w_gmatch(lua_State *L) { return bound_pattern(L, "string.gmatch", false, false); } /* all of the iteration */
static int w_gsub(lua_State *L) { return bound_pattern(L, "string.gsub", true, false); }

/* ---- string.rep, table functions -------------------------------------------------------------------- */

static int w_rep(lua_State *L) {
    size_t l, lsep = 0;
    luaL_checklstring(L, 1, &l);
    lua_Integer n = luaL_checkinteger(L, 2);
    luaL_optlstring(L, 3, "", &lsep);
    double cost = n > 0 ? (double)n * (l + lsep > 0 ? (double)(l + lsep) / 64 + 1 : 1) : 1;
    bound(L, "string.rep", cost, cost, "repeating");
    return call_orig(L);
}

/* Elements from i to j inclusive (0 when empty). */
static double span(lua_Integer i, lua_Integer j) { return j >= i ? (double)j - (double)i + 1 : 0; }

static int w_concat(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_Integer i = luaL_optinteger(L, 3, 1);
    lua_Integer j = lua_isnoneornil(L, 4) ? luaL_len(L, 1) : luaL_checkinteger(L, 4);
    lua_settop(L, 4);
    lua_pushinteger(L, j); /* the library does not take the length again */
    lua_replace(L, 4);
    bound(L, "table.concat", span(i, j), span(i, j), "concatenating this range");
    return call_orig(L);
}

static int w_insert(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_Integer e = luaL_len(L, 1) + 1;
    lua_Integer pos = lua_gettop(L) == 3 ? luaL_checkinteger(L, 2) : e;
    double cost = pos >= 1 && pos <= e ? span(pos, e) : 1; /* a position out of bounds: the library raises */
    bound(L, "table.insert", cost, cost, "shifting the elements");
    return call_orig(L);
}

static int w_remove(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_Integer size = luaL_len(L, 1);
    lua_Integer pos = luaL_optinteger(L, 2, size);
    double cost = pos >= 1 && pos <= size + 1 ? span(pos, size) + 1 : 1; /* out of bounds: the library raises */
    bound(L, "table.remove", cost, cost, "shifting the elements");
    return call_orig(L);
}

static int w_move(lua_State *L) {
    lua_Integer f = luaL_checkinteger(L, 2), e = luaL_checkinteger(L, 3);
    bound(L, "table.move", span(f, e), span(f, e), "moving this range");
    return call_orig(L);
}

static int w_unpack(lua_State *L) {
    lua_Integer i = luaL_optinteger(L, 2, 1);
    lua_Integer j = lua_isnoneornil(L, 3) ? luaL_len(L, 1) : luaL_checkinteger(L, 3);
    double cost = fmin(span(i, j), 1e6); /* past the stack limit the library raises "too many results" at once */
    bound(L, "table.unpack", cost, cost, "unpacking this range");
    return call_orig(L);
}

static int w_sort(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    double n = (double)luaL_len(L, 1);
    double cost = n > 1 ? 2 * n * log2(n) : 1;
    bound(L, "table.sort", cost, cost, "sorting");
    return call_orig(L);
}

/* Functions whose C work is linear in their string arguments: charged by the byte. */
static int w_linear(lua_State *L) {
    double bytes = lua_gettop(L);
    for (int i = 1; i <= lua_gettop(L); i++)
        if (lua_type(L, i) == LUA_TSTRING) bytes += (double)lua_rawlen(L, i);
    wf_charge(L, bytes);
    return call_orig(L);
}

/* ---- finalizers --------------------------------------------------------------------------------------- */

/* setmetatable(t, mt): a metatable with __gc is refused. Lua marks an object for finalization only when
 * its metatable has __gc at this call, so adding __gc later has no effect. */
static int w_setmetatable(lua_State *L) {
    if (lua_type(L, 2) == LUA_TTABLE) {
        lua_pushliteral(L, "__gc");
        bool gc = lua_rawget(L, 2) != LUA_TNIL;
        lua_pop(L, 1);
        if (gc) return luaL_error(L, "setmetatable: __gc metamethods are not allowed in kvmesh scripts (finalizers run outside every budget)");
    }
    return call_orig(L);
}

/* ---- installing ---------------------------------------------------------------------------------------- */

typedef struct wrap {
    const char *lib;       /* NULL: the global table */
    const char *name;
    lua_CFunction fn;
} wrap_t;

static const wrap_t wraps[] = {
    {"string", "find", w_find},     {"string", "match", w_match},     {"string", "gmatch", w_gmatch},
    {"string", "gsub", w_gsub},     {"string", "rep", w_rep},         {"string", "byte", w_linear},
    {"string", "char", w_linear},   {"string", "format", w_linear},   {"string", "lower", w_linear},
    {"string", "upper", w_linear},  {"string", "reverse", w_linear},  {"string", "sub", w_linear},
    {"string", "pack", w_linear},   {"string", "unpack", w_linear},   {"table", "concat", w_concat},
    {"table", "insert", w_insert},  {"table", "remove", w_remove},    {"table", "move", w_move},
    {"table", "unpack", w_unpack},  {"table", "sort", w_sort},        {"utf8", "char", w_linear},
    {"utf8", "codepoint", w_linear}, {"utf8", "len", w_linear},       {"utf8", "offset", w_linear},
    {NULL, "tostring", w_linear},   {NULL, "tonumber", w_linear},     {NULL, "setmetatable", w_setmetatable},
};

void wf_sandbox_wrap_libs(lua_State *L, int G) {
    G = lua_absindex(L, G);
    for (size_t i = 0; i < sizeof wraps / sizeof wraps[0]; i++) {
        const wrap_t *w = &wraps[i];
        if (w->lib) lua_getfield(L, G, w->lib);
        else lua_pushvalue(L, G);
        lua_getfield(L, -1, w->name);
        if (!lua_tocfunction(L, -1)) luaL_error(L, "sandbox: %s.%s is not a C function", w->lib ? w->lib : "_G", w->name);
        lua_pushcclosure(L, w->fn, 1);
        lua_setfield(L, -2, w->name);
        lua_pop(L, 1);
    }
}
