// Another expertmesh op called from C++ through the dispatcher: the composite ops (mla_attention,
// moe_layer) chain ops that live in other files without a Python call between them.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace expertmesh_cpu {

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

}  // namespace expertmesh_cpu
