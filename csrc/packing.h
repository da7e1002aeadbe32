// Host-side sequence utilities: first-fit-decreasing packing and Karmarkar-Karp k-way partitioning.
// The exact algorithms (and tie-breaking) are documented in fastrl/native.py, whose pure-Python fallback
// must give identical results; keep the two in step.
#pragma once

#include <cstdint>
#include <vector>

namespace fastrl {

// Bins of original indices, each bin's total length <= budget. Bins in opening order, indices ascending.
// Throws std::invalid_argument on budget < 1, a negative length or a length > budget.
std::vector<std::vector<int64_t>> pack_sequences(const std::vector<int64_t>& lengths, int64_t budget);

// k groups of original indices by the largest differencing method; indices ascending in each group,
// groups by total length descending. equal_size: every group gets len / k items (needs len % k == 0).
// Throws std::invalid_argument on k < 1, a negative length or len % k != 0 under equal_size.
std::vector<std::vector<int64_t>> partition_balanced(const std::vector<int64_t>& lengths, int64_t k,
                                                     bool equal_size);

}  // namespace fastrl
