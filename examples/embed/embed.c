/* embed.c - kvmesh embedded in a C program through the installed header only (include/kvmesh.h).
 *
 * Loads a two-agent workflow into a runtime, runs it, and prints the outputs, the agents' KV figures and
 * the runtime's counters; with --model, it also generates straight from the model.
 *
 *   embed                          the workflow on the mock model (no model files needed)
 *   embed --model DIR|FILE         the workflow on a real model, then one generation
 *   embed WORKFLOW.lua [--model M] a workflow file of your own (input: --input TEXT)
 *
 * Build against an installed kvmesh: see examples/embed/README.md. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <kvmesh.h>

static const char *k_workflow =
    "local kvm = kvmesh\n"
    "local m = kvm.model('mock:echo')\n"
    "local g = kvm.graph{ name = 'embedded' }\n"
    "g:agent('reader', { model = m, role = 'You read.', template = 'Question: {input}\\nNotes:', max_tokens = 8 })\n"
    "g:agent('writer', { model = m, template = 'Question: {input}\\nNotes: {agent.reader}\\nAnswer:', max_tokens = 8 })\n"
    "g:edge(kvm.START, 'reader')\n"
    "g:edge('reader', 'writer')\n"
    "return g\n";

static void on_step(void *ud, const kvm_step_event_t *e) {
    (void)ud;
    printf("  step %d %-8s %3d tokens in (%d reused) -> %2d out  %s\n", e->superstep, e->node, e->tokens_in,
           e->tokens_reused, e->tokens_out, e->status ? kvm_errname(e->status) : "ok");
}

static int fail(const char *what) {
    fprintf(stderr, "embed: %s: %s (%s)\n", what, kvm_errmsg(), kvm_errname(kvm_errcode()));
    return 1;
}

static int generate(const char *model) {
    kvm_model_params_t mp = kvm_model_default_params();
    mp.backend = "cpu";
    mp.quiet = true;
    kvm_model_t *m = kvm_model_load(model, &mp);
    if (!m) return fail("loading the model");
    char desc[256];
    kvm_model_describe(m, desc, sizeof desc);
    printf("model: %s\n", desc);
    kvm_generate_params_t gp = kvm_generate_default_params();
    gp.max_tokens = 8;
    kvm_model_info_t info;
    kvm_model_info(m, &info);
    gp.chat = strcmp(info.chat_format, "none") != 0;
    kvm_generation_t out;
    int rc = kvm_model_generate(m, "Mark: 9442\nAnn: 3742\nAsk: Mark", &gp, NULL, NULL, &out);
    if (rc == 0) printf("generated %d tokens (stop: %s): %s\n", out.n_ids, kvm_stop_reason_name(out.stop_reason), out.text);
    kvm_generation_clear(&out);
    kvm_model_free(m);
    return rc ? fail("generating") : 0;
}

int main(int argc, char **argv) {
    const char *model = NULL, *script = NULL, *input = "What is 2 + 2?";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc) model = argv[++i];
        else if (!strcmp(argv[i], "--input") && i + 1 < argc) input = argv[++i];
        else if (argv[i][0] != '-') script = argv[i];
        else {
            fprintf(stderr, "usage: embed [WORKFLOW.lua] [--model DIR|FILE] [--input TEXT]\n");
            return 2;
        }
    }
    printf("kvmesh %s (API %d)\n", kvm_version(), KVM_API_VERSION);

    kvm_runtime_params_t rp = kvm_runtime_default_params();
    rp.model.backend = "cpu";
    rp.quiet = true;
    rp.model_override = model ? model : (script ? NULL : "mock:echo");
    kvm_runtime_t *rt = kvm_runtime_create(&rp);
    if (!rt) return fail("creating the runtime");

    kvm_workflow_params_t wp = kvm_workflow_default_params();
    wp.on_step = on_step;
    kvm_workflow_t *wf = script ? kvm_workflow_load(rt, script, &wp)
                                : kvm_workflow_load_string(rt, "embedded.lua", k_workflow, strlen(k_workflow), &wp);
    if (!wf) {
        kvm_runtime_free(rt);
        return fail("loading the workflow");
    }
    char inputs[1024];
    snprintf(inputs, sizeof inputs, "{\"input\": \"%s\"}", input);
    kvm_run_params_t runp = kvm_run_default_params();
    runp.inputs_json = inputs;
    kvm_run_t *run = kvm_run_start(wf, &runp);
    int rc = run ? kvm_workflow_drive(wf) : -1;
    if (rc) {
        kvm_workflow_free(wf);
        kvm_runtime_free(rt);
        return fail("running the workflow");
    }
    const char *msg = NULL;
    int st = kvm_run_status(run, &msg);
    char *outs = kvm_run_outputs_json(run);
    printf("run %s: %s\noutputs: %s\n", kvm_run_id(run), st ? msg : "ok", outs ? outs : "(none)");
    kvm_free(outs);
    for (int i = 0; i < kvm_workflow_n_agents(wf); i++) {
        kvm_agent_stats_t s;
        if (kvm_workflow_agent_stats(wf, i, &s) == 0)
            printf("agent %-8s kv %-7s calls %d prompt %ld reused %ld output %ld\n", s.name, s.kv, s.calls,
                   s.prompt_tokens, s.exact + s.offset + s.naive, s.output_tokens);
    }
    char *stats = kvm_runtime_stats_json(rt);
    printf("runtime: %s\n", stats ? stats : kvm_errmsg());
    kvm_free(stats);
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
    if (st) return 1;
    return model ? generate(model) : 0;
}
