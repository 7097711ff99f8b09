// The expertmesh ops the composite ops (mla_attention, mla_query, moe_layer) call from C++ through
// the dispatcher, each typed once here: they live in other files (their schemas are there), and no
// Python runs between them.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>

namespace expertmesh_cpu::ops {

template <typename Sig>
c10::TypedOperatorHandle<Sig> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using T = const at::Tensor&;

inline const auto& linear_packed() {  // linear_cpu.cpp
  static const auto h = find<at::Tensor(T, T, int64_t)>("expertmesh::linear_packed");
  return h;
}
inline const auto& swiglu_packed() {  // linear_cpu.cpp
  static const auto h = find<at::Tensor(T, T, T, int64_t)>("expertmesh::swiglu_packed");
  return h;
}
inline const auto& bmm_small() {  // linear_cpu.cpp
  static const auto h = find<at::Tensor(T, T)>("expertmesh::bmm_small");
  return h;
}
inline const auto& rms_norm() {  // norm_cpu.cpp
  static const auto h = find<at::Tensor(T, T, double)>("expertmesh::rms_norm");
  return h;
}
inline const auto& mla_attend() {  // mla_cpu.cpp
  static const auto h = find<at::Tensor(T, T, T, T, T, T, double, int64_t)>("expertmesh::mla_attend");
  return h;
}
inline const auto& moe_gate() {  // route_cpu.cpp
  static const auto h =
      find<std::tuple<at::Tensor, at::Tensor>(T, T, T, int64_t, int64_t, int64_t, bool, double)>("expertmesh::moe_gate");
  return h;
}

}  // namespace expertmesh_cpu::ops
