"""Extra memory of ``linear_logprobs`` (torch impl, automatic chunk) against the eager fp32 path.

Both are measured the same way: every CPU allocation and free that ``torch.profiler`` records
(``profile_memory=True``) during one forward + backward, replayed in time order; the peak of the running
sum is the extra memory (inputs excluded, gradients included).
"""

from __future__ import annotations

import gc

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from fastrl.ops.linear_logprobs import linear_logprobs


def peak_extra_bytes(fn) -> int:
    """Peak of the bytes allocated during ``fn()`` and still live, over time. Frees of memory allocated
    before the call (garbage of earlier tests collected meanwhile) are not counted."""
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            alloc = event.typed[1]
            events.append((event.start_time_ns, alloc.alloc_size, alloc.ptr))  # frees are negative
    assert events, "the profiler recorded no allocation"
    live: dict[int, int] = {}
    current = peak = 0
    for _, size, ptr in sorted(events):
        if size > 0:
            live[ptr] = size
            current += size
            peak = max(peak, current)
        elif ptr in live:
            current -= live.pop(ptr)
    return peak


def test_chunked_forward_backward_peak_is_under_15_percent_of_eager(seed):
    N, H, V = 4096, 256, 32000
    hidden = torch.randn(N, H, requires_grad=True)
    weight = (torch.randn(V, H) / H**0.5).requires_grad_()
    labels = torch.randint(0, V, (N,))
    upstream = torch.randn(N)

    def eager():
        logp = torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, labels[:, None]).squeeze(-1)
        (logp * upstream).sum().backward()

    def chunked():
        logp = linear_logprobs(hidden, weight, labels, impl="torch")
        (logp * upstream).sum().backward()

    eager_peak = peak_extra_bytes(eager)
    eager_grads = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    chunked_peak = peak_extra_bytes(chunked)
    print(f"extra memory, forward+backward: eager fp32 {eager_peak / 2**20:.1f} MiB, "
          f"linear_logprobs {chunked_peak / 2**20:.1f} MiB ({chunked_peak / eager_peak:.1%})")  # fmt: skip
    # The same gradients (so the measured runs did the same work; accuracy against float64 is tested in
    # test_linear_logprobs.py), then the memory bound. grad_weight sums 4096 fp32 terms per element in a
    # different order (chunks): a 1e-6 atol flaked on 1 of 8M elements, so the slack is sqrt(N) fp32 ulps.
    torch.testing.assert_close(hidden.grad, eager_grads[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad, eager_grads[1], rtol=1e-4, atol=1e-5)
    gradients = (N * H + V * H) * 4
    numbers = f"eager {eager_peak} B, chunked {chunked_peak} B, gradients {gradients} B"
    assert eager_peak > 3 * N * V * 4, numbers  # sanity: eager holds several [N, V] fp32 tensors at once
    assert chunked_peak >= gradients, numbers  # the measurement sees the gradients the backward allocates
    assert chunked_peak < 0.15 * eager_peak, numbers
