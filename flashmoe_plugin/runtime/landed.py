"""One decode token's routed experts on the CPU, computed as their records land.

A token's k records (each at least MIN_RECORD_BYTES) are requested resident-first (then those a
prefetch is already reading, then the rest), so the kernels run the resident experts while the
reader threads fetch the missing ones, and each missing expert runs as soon as its record is in
(Engine._experts); the next layer's predicted records are read behind them (the predictor's
prefetch). On a 2-core machine the reads must not cost the cores the kernels need: that is
O_DIRECT's job (pager.default_direct_io).

When every record is resident the step is one fused call (Backend.moe_decode). Otherwise every
expert is one kernel call and the weighted outputs are summed in routing order, whatever order
the records landed in: the fused kernel sums its experts in that order too (y = 0, then y +=
w_e * expert_e(x), e = 0..k-1, in plain C without FMA contraction), so the logits do not depend on
the budget, the residency or the disk's timing (the pager tests compare them bit for bit)."""
from __future__ import annotations

import torch

# Records smaller than this run in one fused call after they have all landed: a kernel call costs
# tens of microseconds of dispatch and activation preparation, a few percent of a 16 MiB expert's
# compute on 2 cores, and many small experts (Qwen3.5: 10 of ~7 MB per token and layer) gain
# more from one call spreading them over the cores than from starting early.
MIN_RECORD_BYTES = 16 << 20


def expert_out(backend, x: torch.Tensor, record, weight: torch.Tensor, layout) -> torch.Tensor:
    """weight * expert(x) for one token x [1, H] and one record (weight: a 1-element tensor)."""
    return backend.moe_decode(x, (record,), weight, layout)


def routing_order_sum(outs: list) -> torch.Tensor:
    out = outs[0]
    for y in outs[1:]:
        out = out + y
    return out


def moe_as_landed(backend, x: torch.Tensor, batch, chosen: list, weights: torch.Tensor, layout) -> torch.Tensor:
    """sum_i weights[i] * expert_{chosen[i]}(x), each expert computed when the pager's batch
    yields its record (the batch was requested in pager.ready_first order)."""
    if not batch.waits:
        got = dict(batch)
        return backend.moe_decode(x, [got[e] for e in chosen], weights, layout)
    at = {e: i for i, e in enumerate(chosen)}
    outs = [None] * len(chosen)
    for e, rec in batch:
        i = at[e]
        outs[i] = expert_out(backend, x, rec, weights[i:i + 1], layout)
    return routing_order_sum(outs)
