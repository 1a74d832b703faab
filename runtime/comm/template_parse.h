/* template_parse.h - the one template grammar of kvmesh (docs/lua-api.md, "Placeholders").
 *
 * An agent's user message is fixed text with placeholders. The forms, and the KVCOMM placeholder
 * name (kvcomm.md §1) each one becomes:
 *
 *   {input}             input                  the whole run input
 *   {input.KEY}         state:input.KEY        one field of the run input
 *   {agent.NAME}        agent:NAME:current     the latest output of agent node NAME
 *   {agent.NAME.prev}   agent:NAME:prev        its previous output
 *   {tool.NAME}         tool:NAME              the latest result of tool node NAME
 *   {state.KEY}         state:KEY              a state value
 *
 * ':' may replace '.' ({agent:planner}). "{{" is a literal '{' and "}}" a literal '}'. A brace group
 * made only of letters, digits, '_', '-', '.' and ':' ("{who}", "{agent.}") is a placeholder and must
 * be one of the forms above; other braces ("{ \"a\": 1 }") are literal text, so JSON needs no escaping.
 * NAME and KEY are letters, digits, '_' and '-'.
 *
 * Thread-safety: the parser keeps no state; call it from any thread. */
#ifndef KVM_COMM_TEMPLATE_PARSE_H
#define KVM_COMM_TEMPLATE_PARSE_H

#include <stddef.h>

typedef enum kvm_tpl_src {
    KVM_TPL_TEXT = 0,   /* fixed text */
    KVM_TPL_INPUT,      /* {input} (key NULL) or {input.KEY} */
    KVM_TPL_AGENT,      /* {agent.NAME} */
    KVM_TPL_AGENT_PREV, /* {agent.NAME.prev} */
    KVM_TPL_TOOL,       /* {tool.NAME} */
    KVM_TPL_STATE,      /* {state.KEY} */
} kvm_tpl_src_t;

/* One part of a parsed template. */
typedef struct kvm_tpl_part {
    kvm_tpl_src_t src;
    const char *text;   /* TEXT: the text with "{{" / "}}" unescaped; placeholders: the KVCOMM name */
    const char *source; /* placeholders: the text inside the braces as written ("agent.planner"); TEXT: NULL */
    const char *key;    /* placeholders: the input key (NULL for the whole {input}), node name or state key */
    size_t offset;      /* byte offset of the part in the template text */
} kvm_tpl_part_t;

/* Parses template text into parts (text and placeholders alternate as written; no part is empty).
 * *parts is one allocation holding the strings too, freed with kvm_free (NULL when *n_parts is 0).
 * KVM_EINVAL names the offset and the text of a bad or unclosed placeholder; KVM_ENOMEM. */
int kvm_template_parse_parts(const char *text, kvm_tpl_part_t **parts, int *n_parts);

#endif
