/* hf_load.c - STUB until the Hugging Face loader lands. */
#include "model.h"

int kvm_load_hf(kvm_model_t *m, const char *dir) { return kvm_seterr(KVM_EUNSUPPORTED, "%s: HF loading not implemented yet", dir); }
int kvm_config_parse_hf(kvm_config_t *cfg, const char *json, const char *path) { return KVM_EUNSUPPORTED; }
