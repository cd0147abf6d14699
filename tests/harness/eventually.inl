// Implementation of tpc::testing::eventually (header-only, included by harness.h).
#pragma once

#include <chrono>
#include <thread>

namespace tpc::testing {

template <class Pred>
bool eventually(Pred pred, int64_t timeout_ms) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    if (pred()) return true;
    if (std::chrono::steady_clock::now() >= deadline) return pred();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

}  // namespace tpc::testing
