"""A Ray Serve request router for the engine replicas: the replica ranked first for the
request's affinity key (affinity.py) unless it is much busier than the least busy one, then the
rest in rank order (Serve probes them in turn and skips full ones); requests without a key go
by Serve's own power-of-two-choices."""
from __future__ import annotations

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import LocalityMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

from .affinity import rank


class AffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    def initialize_state(self, imbalance: int = 8, **kwargs):
        self.imbalance = imbalance  # queued requests the preferred replica may have over the least busy one

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key = pending_request.kwargs.get("affinity") if pending_request is not None else None
        if not key or not candidate_replicas:
            return await PowerOfTwoChoicesRequestRouter.choose_replicas(self, candidate_replicas, pending_request)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ordered = [by_id[i] for i in rank(key, list(by_id))]
        loads = [self._replica_queue_len_cache.get(r.replica_id) for r in ordered]
        known = [n for n in loads if n is not None]
        if loads[0] is not None and known and loads[0] - min(known) > self.imbalance:
            return await PowerOfTwoChoicesRequestRouter.choose_replicas(self, candidate_replicas, pending_request)
        return [[ordered[0]], ordered[1:]] if len(ordered) > 1 else [ordered]
