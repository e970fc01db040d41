"""Save plans the daemon keeps for its clients: a checked request whose structure later saves reuse."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

from ckptd.proto.errors import ErrorCode
from ckptd.proto.messages import PlannedSave, SaveRequest
from ckptd.service.errors import SaveRejected
from ckptd.service.shard_headers import ShardHeaders

MAX_PLANS = 64
"""Plans kept in all (the least recently used goes first; its client then sends a full request).
A plan holds its request's tensor list (about 150 bytes a tensor) and its shards' headers (about 60
bytes a tensor); a client holds one at a time."""


@dataclass(frozen=True)
class SavePlan:
    """A full request the daemon accepted, and where its parts went (checked once, reused)."""

    request: SaveRequest
    scopes: Dict[str, str]
    headers: ShardHeaders
    """Its shards' headers, encoded at its first save."""


class SavePlans:
    """Plans by (client connection, plan id), bounded: a planned save from another connection, or one
    naming a plan this daemon never had or has dropped, is refused with UNKNOWN_PLAN."""

    def __init__(self, limit: int = MAX_PLANS) -> None:
        self._plans: "OrderedDict[Tuple[bytes, int], SavePlan]" = OrderedDict()
        self._limit = limit

    def remember(self, client: bytes, request: SaveRequest, scopes: Dict[str, str], headers: ShardHeaders) -> None:
        """Keep an accepted request that asked to be a plan (`request.plan_id`)."""
        if request.plan_id is None:
            return
        key = (client, request.plan_id)
        self._plans[key] = SavePlan(request, scopes, headers)
        self._plans.move_to_end(key)
        while len(self._plans) > self._limit:
            self._plans.popitem(last=False)

    def recall(self, client: bytes, save: PlannedSave) -> Tuple[SaveRequest, Dict[str, str], ShardHeaders]:
        """The full request of a planned save, its parts' scopes and the plan's shard headers. Raises
        SaveRejected (UNKNOWN_PLAN, or INVALID_REQUEST for a save that does not fit its plan)."""
        plan = self._plans.get((client, save.plan_id))
        if plan is None:
            raise SaveRejected(
                ErrorCode.UNKNOWN_PLAN,
                f"planned save of step {save.step}: this daemon holds no plan {save.plan_id} of this client "
                "(restarted, or the plan was dropped); send the full request",
            )
        self._plans.move_to_end((client, save.plan_id))
        return plan.request.planned(save), plan.scopes, plan.headers

    def forget(self, client: bytes) -> None:
        """Drop every plan of a client that said goodbye."""
        for key in [k for k in self._plans if k[0] == client]:
            del self._plans[key]

    def forget_gone(self, alive: Callable[[int], bool]) -> None:
        """Drop the plans of client processes that are gone (`alive(pid)` false) without a goodbye."""
        for key in [k for k, plan in self._plans.items() if not alive(plan.request.pid)]:
            del self._plans[key]

    def __len__(self) -> int:
        return len(self._plans)
