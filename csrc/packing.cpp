// First-fit-decreasing packing and Karmarkar-Karp k-way partitioning. The Python fallback in
// fastrl/native.py implements the same steps with the same tie-breaking, so both give identical output.
#include "packing.h"

#include <algorithm>
#include <numeric>
#include <queue>
#include <stdexcept>
#include <string>
#include <utility>

namespace fastrl {
namespace {

void check_lengths(const std::vector<int64_t>& lengths) {
  for (size_t i = 0; i < lengths.size(); ++i) {
    if (lengths[i] < 0) {
      throw std::invalid_argument("lengths must be >= 0; lengths[" + std::to_string(i) +
                                  "] = " + std::to_string(lengths[i]));
    }
  }
}

// Max segment tree over the remaining capacity of n bins (bins not yet opened hold `budget`), answering
// "leftmost bin with remaining >= need" in O(log n). Since every opened bin lies left of every unopened
// one, the answer is the first fitting opened bin, or else the next bin to open: exactly first fit.
class FirstFitTree {
 public:
  FirstFitTree(size_t n, int64_t budget) : size_(1) {
    while (size_ < n) size_ <<= 1;
    tree_.assign(2 * size_, -1);  // padding leaves never fit (need >= 0)
    for (size_t i = 0; i < n; ++i) tree_[size_ + i] = budget;
    for (size_t i = size_ - 1; i >= 1; --i) tree_[i] = std::max(tree_[2 * i], tree_[2 * i + 1]);
  }

  // Leftmost leaf with value >= need; the caller guarantees one exists.
  size_t leftmost_fit(int64_t need) const {
    size_t node = 1;
    while (node < size_) node = tree_[2 * node] >= need ? 2 * node : 2 * node + 1;
    return node - size_;
  }

  void subtract(size_t leaf, int64_t amount) {
    size_t node = size_ + leaf;
    tree_[node] -= amount;
    for (node >>= 1; node >= 1; node >>= 1) tree_[node] = std::max(tree_[2 * node], tree_[2 * node + 1]);
  }

 private:
  size_t size_;
  std::vector<int64_t> tree_;
};

struct Subset {
  int64_t sum = 0;
  std::vector<int64_t> items;
};

using Partition = std::vector<Subset>;  // k subsets, sorted by sum descending (stable)

void sort_desc(Partition& p) {
  std::stable_sort(p.begin(), p.end(), [](const Subset& a, const Subset& b) { return a.sum > b.sum; });
}

struct HeapEntry {
  int64_t spread;   // max subset sum - min subset sum
  int64_t counter;  // creation order: ties pop the older partition first
  size_t slot;      // index into the partition store
};

struct HeapLess {  // std::priority_queue pops the greatest: largest spread, then smallest counter
  bool operator()(const HeapEntry& a, const HeapEntry& b) const {
    if (a.spread != b.spread) return a.spread < b.spread;
    return a.counter > b.counter;
  }
};

// Pair a's largest subset with b's smallest, and so on, so the combined sums are as even as possible.
Partition combine(Partition& a, Partition& b) {
  const size_t k = a.size();
  Partition out(k);
  for (size_t i = 0; i < k; ++i) {
    Subset& x = a[i];
    Subset& y = b[k - 1 - i];
    // Small-to-large: move the bigger index list and append the smaller, O(n log n) copying in all.
    if (x.items.size() < y.items.size()) std::swap(x.items, y.items);
    out[i].sum = x.sum + y.sum;
    out[i].items = std::move(x.items);
    out[i].items.insert(out[i].items.end(), y.items.begin(), y.items.end());
  }
  sort_desc(out);
  return out;
}

}  // namespace

std::vector<std::vector<int64_t>> pack_sequences(const std::vector<int64_t>& lengths, int64_t budget) {
  if (budget < 1) throw std::invalid_argument("budget must be >= 1, got " + std::to_string(budget));
  check_lengths(lengths);
  const size_t n = lengths.size();
  for (size_t i = 0; i < n; ++i) {
    if (lengths[i] > budget) {
      throw std::invalid_argument("lengths[" + std::to_string(i) + "] = " + std::to_string(lengths[i]) +
                                  " exceeds budget " + std::to_string(budget));
    }
  }
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  // Longest first; equal lengths keep index order (stable).
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });

  std::vector<std::vector<int64_t>> bins;
  if (n == 0) return bins;
  FirstFitTree tree(n, budget);
  for (int64_t idx : order) {
    const size_t bin = tree.leftmost_fit(lengths[idx]);
    tree.subtract(bin, lengths[idx]);
    if (bin == bins.size()) bins.emplace_back();
    bins[bin].push_back(idx);
  }
  for (auto& b : bins) std::sort(b.begin(), b.end());
  return bins;
}

std::vector<std::vector<int64_t>> partition_balanced(const std::vector<int64_t>& lengths, int64_t k,
                                                     bool equal_size) {
  if (k < 1) throw std::invalid_argument("k must be >= 1, got " + std::to_string(k));
  check_lengths(lengths);
  const size_t n = lengths.size();
  const size_t kk = static_cast<size_t>(k);
  if (equal_size && n % kk != 0) {
    throw std::invalid_argument("equal_size=True needs len(lengths) divisible by k; got " +
                                std::to_string(n) + " sequences and k = " + std::to_string(k));
  }
  if (n == 0) return std::vector<std::vector<int64_t>>(kk);

  std::vector<Partition> store;
  std::priority_queue<HeapEntry, std::vector<HeapEntry>, HeapLess> heap;
  int64_t counter = 0;
  auto push = [&](Partition&& p) {
    const int64_t spread = p.front().sum - p.back().sum;
    store.push_back(std::move(p));
    heap.push(HeapEntry{spread, counter++, store.size() - 1});
  };

  if (equal_size) {
    // Each starting partition holds k sequences adjacent in length order, one per subset; every merge
    // keeps one subset per slot, so each final group gets exactly n / k sequences.
    std::vector<int64_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return lengths[a] < lengths[b]; });
    for (size_t start = 0; start < n; start += kk) {
      Partition p(kk);
      for (size_t j = 0; j < kk; ++j) {
        const int64_t idx = order[start + j];
        p[j].sum = lengths[idx];
        p[j].items.push_back(idx);
      }
      sort_desc(p);
      push(std::move(p));
    }
  } else {
    for (size_t i = 0; i < n; ++i) {
      Partition p(kk);
      p[0].sum = lengths[i];
      p[0].items.push_back(static_cast<int64_t>(i));
      push(std::move(p));
    }
  }

  while (heap.size() > 1) {
    const size_t a = heap.top().slot;
    heap.pop();
    const size_t b = heap.top().slot;
    heap.pop();
    Partition merged = combine(store[a], store[b]);
    store[a].clear();  // consumed: free the memory early
    store[b].clear();
    push(std::move(merged));
  }

  Partition& last = store[heap.top().slot];
  std::vector<std::vector<int64_t>> groups;
  groups.reserve(kk);
  for (auto& s : last) {
    std::sort(s.items.begin(), s.items.end());
    groups.push_back(std::move(s.items));
  }
  return groups;
}

}  // namespace fastrl
