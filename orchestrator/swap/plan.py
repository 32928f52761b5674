"""Planning a rollout: everything is checked before the first guest is touched."""

from __future__ import annotations

from dataclasses import dataclass

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

    def describe(self) -> list[str]:
        lines = [f"swap {len(self.guests)} guest(s) to {self.to_image} ({self.strategy}), batch {self.batch}, "
                 f"stop after {self.max_failures} failure(s)"]
        for i, b in enumerate(self.batches, 1):
            lines.append(f"  batch {i}: {', '.join(b)}")
        return lines


def plan(ctx: Context, guests: list[str], to_image: str, strategy: str = "warm", batch: int = 1,
         max_failures: int = 1) -> Plan:
    """Validate everything a rollout needs before any guest is touched."""
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
    for g in guests:
        guest_records.load(ctx, g)
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
    batches = [guests[i:i + batch] for i in range(0, len(guests), batch)]
    return Plan(guests, to_image, strategy, batch, max_failures, batches)


