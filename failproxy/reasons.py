"""The reasons a failed attempt can have (SPEC 4.1), in a fixed order: metrics index them by
position. The bottom of the package: config validates `retry_on` against these names, policy
decides with them, metrics count by them."""

from __future__ import annotations

REASONS: tuple[str, ...] = (
    "overloaded",
    "refused",
    "missing",
    "connect_timeout",
    "unreachable",
    "busy",
    "queue_full",
    "reset",
    "timeout",
    "http_502",
    "http_503",
    "http_504",
    # The overflow policy's skips of the local socket (balance.py): not failures of it.
    "workers_busy",  # as many requests of ours awaiting it as it has workers (learned)
    "queued",  # its accept queue holds a connection: every worker is busy
    "held",  # no known free worker anywhere: held in failproxy, then sent where one freed up
    "hold_timeout",  # held past upstream.hold_timeout: sent where its expected wait is least
    "least_wait",  # held, but its expected wait elsewhere was shorter than holding on: sent there
)
REASON_INDEX = {reason: i for i, reason in enumerate(REASONS)}

# Reasons where nothing was sent: always safe to move on (when listed in retry_on).
CONNECT_REASONS = frozenset(REASONS[:7])
# Reasons that happen after bytes may have reached the upstream.
SENT_REASONS = frozenset(REASONS[7:12])
# What `retry_on` may name.
RETRY_ON_NAMES = frozenset({"connect", *SENT_REASONS})
