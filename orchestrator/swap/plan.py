"""Planning a rollout: everything is checked before the first guest is touched."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import guests as guest_records
from ..context import Context
from ..errors import SwapError, ValidationError
from ..images import catalog

STRATEGIES = ("warm", "cold")
MAX_BATCH = 64  # guests swapped at once, a thread each: more would only queue on libvirt and the disk
MAX_GUESTS = 1000  # as in a fleet spec


@dataclass
class Plan:
    guests: list[str]
    to_image: str
    strategy: str
    batch: int
    max_failures: int
    batches: list[list[str]]
    # how long each swapped guest's application may take to answer before the swap rolls back
    health_timeout: float = 120.0
    per_host: int | None = None  # at most this many guests of one host in a batch
    hosts: dict[str, str] = field(default_factory=dict)  # guest -> its host ("local": this one)

    def describe(self) -> list[str]:
        per = f", at most {self.per_host} per host" if self.per_host else ""
        lines = [f"swap {len(self.guests)} guest(s) to {self.to_image} ({self.strategy}), batch {self.batch}{per}, "
                 f"stop after {self.max_failures} failure(s)"]
        for i, b in enumerate(self.batches, 1):
            on = f" (hosts {', '.join(self.hosts.get(g, 'local') for g in b)})" if self.per_host else ""
            lines.append(f"  batch {i}: {', '.join(b)}{on}")
        return lines


def batches(guests: list[str], batch: int, per_host: int | None, host_of: dict[str, str]) -> list[list[str]]:
    """Batches of at most ``batch`` guests, at most ``per_host`` of one host in each; guests keep
    their order as far as the limits allow (each batch takes the first guests that still fit)."""
    pending = list(guests)
    out: list[list[str]] = []
    while pending:
        group: list[str] = []
        count: dict[str, int] = {}
        for g in list(pending):
            h = host_of.get(g, "local")
            if len(group) < batch and (per_host is None or count.get(h, 0) < per_host):
                group.append(g)
                count[h] = count.get(h, 0) + 1
                pending.remove(g)
        out.append(group)
    return out


def plan(ctx: Context, guests: list[str], to_image: str, strategy: str = "warm", batch: int = 1,
         max_failures: int = 1, per_host: int | None = None) -> Plan:
    """Validate everything a rollout needs before any guest is touched."""
    if per_host is not None and (isinstance(per_host, bool) or not isinstance(per_host, int)
                                 or not 1 <= per_host <= MAX_BATCH):
        raise ValidationError(f"per-host must be in 1..{MAX_BATCH}, got {str(per_host)[:20]}")
    if strategy not in STRATEGIES:
        raise ValidationError(f"unknown strategy {strategy!r}: use warm or cold")
    if not 1 <= batch <= MAX_BATCH:
        raise ValidationError(f"batch must be in 1..{MAX_BATCH}, got {batch}")
    if max_failures < 1:
        raise ValidationError(f"max-failures must be at least 1, got {max_failures}")
    if not guests:
        raise ValidationError("no guests given")
    if len(guests) > MAX_GUESTS:
        raise ValidationError(f"{len(guests)} guests given; one rollout swaps at most {MAX_GUESTS}")
    if len(set(guests)) != len(guests):
        raise ValidationError("a guest is named twice")
    host_of = {g: guest_records.load(ctx, g).host or "local" for g in guests}
    if ":" in to_image:
        raise ValidationError(f"swap targets must be captured images from the repository, not recipe {to_image!r} "
                              f"(build one with 'osimg image build NAME --from {to_image}')")
    img = catalog.get(ctx, to_image)
    problems = catalog.verify(ctx, to_image)
    if problems:
        raise SwapError(f"refusing to swap to image {to_image!r}: it failed verification ({'; '.join(problems)}); "
                        "no guest was touched")
    if strategy == "warm" and not img.has_memory_state:
        raise ValidationError(f"image {to_image!r} has no memory state; use --strategy cold or rebuild it")
    return Plan(guests, to_image, strategy, batch, max_failures, batches(guests, batch, per_host, host_of),
                per_host=per_host, hosts=host_of)


