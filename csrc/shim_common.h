// What both shim files share: how a fallible call hands libtorch's error to Rust
// (`torch_ext::shim`'s `with_error_buffer`: the message into the caller's buffer,
// NUL-terminated, truncated to fit) and how tch's tensor handles become a list.
#pragma once
#include <ATen/ATen.h>
#include <cstring>
#include <exception>
#include <vector>

inline void report(const std::exception& e, char* error, int error_len) {
  std::strncpy(error, e.what(), error_len - 1);
  error[error_len - 1] = 0;
}

// Runs `call`; 0 when it returns, 1 with the message in `error` when it throws.
template <class Call>
int guarded(char* error, int error_len, Call call) {
  try {
    call();
    return 0;
  } catch (const std::exception& e) {
    report(e, error, error_len);
    return 1;
  }
}

// Handles in tch are `at::Tensor*` (torch-sys's torch_api.h).
inline std::vector<at::Tensor> tensors_of(at::Tensor* const* handles, int n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int i = 0; i < n; ++i) out.push_back(*handles[i]);
  return out;
}
