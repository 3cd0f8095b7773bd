"""The dynamic batcher's settings (``dynamic_batching`` in ``config.pbtxt``, read by
``repository/config.schedule_of``), checked as Triton checks a config."""

from __future__ import annotations

from dataclasses import dataclass

TRITON = "triton"
WORK_CONSERVING = "work_conserving"
POLICIES = (TRITON, WORK_CONSERVING)
# The queue keeps a list per priority level and walks every level for each request.
MAX_PRIORITY_LEVELS = 1000
# The longest max_queue_delay_microseconds a config may give: an hour. Past it a delay is no
# batching choice but a request held for good (2^64 - 1 held a lone one for 585,000 years),
# aging the queue's oldest-request gauge that autoscaling reads all the while.
MAX_QUEUE_DELAY_US = 3_600_000_000


@dataclass(frozen=True)
class QueuePolicy:
    """One priority level's ``ModelQueuePolicy``: at most ``max_queue_size`` requests of the level
    waiting (0: no bound of its own; the queue's as a whole still holds), and a queue timeout
    (0 = none) whose action is REJECT, or DELAY (``delay``)."""

    max_queue_size: int = 0
    timeout_s: float = 0.0
    delay: bool = False


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int
    max_queue_delay_s: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    instances: int = 1
    max_queue_size: int = 0  # requests waiting; 0 = unbounded (only in tests: the gateway's setting is >= 1)
    priority_levels: int = 0  # 0 = one level
    default_priority_level: int = 0
    default_timeout_s: float = 0.0  # 0 = none
    timeout_action_delay: bool = False  # False: REJECT, True: DELAY
    preserve_ordering: bool = False  # answers are released in the order requests arrived
    policy: str = TRITON
    # priority_queue_policy: (level, its policy) for the levels that have one of their own; the
    # others take the default's timeout and action above
    level_policies: tuple[tuple[int, QueuePolicy], ...] = ()

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1 for dynamic batching")
        if self.policy not in POLICIES:
            raise ValueError(f"batching policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        if self.priority_levels > MAX_PRIORITY_LEVELS:
            raise ValueError(
                f"dynamic_batching: priority_levels is {self.priority_levels}; at most {MAX_PRIORITY_LEVELS} "
                "(the queue keeps and walks a list per level)"
            )
        # (as Triton checks a config)
        if self.priority_levels and not 1 <= self.default_priority_level <= self.priority_levels:
            raise ValueError(
                f"dynamic_batching: default_priority_level must be between 1 and priority_levels "
                f"({self.priority_levels}), not {self.default_priority_level}"
            )
        for size in self.preferred_batch_sizes:
            if not 1 <= size <= self.max_batch_size:
                raise ValueError(
                    f"dynamic_batching: preferred_batch_size {size} must be between 1 and max_batch_size "
                    f"({self.max_batch_size})"
                )
        if self.preserve_ordering:  # (as Triton refuses them: answers go out in arrival order)
            if self.priority_levels > 1:
                raise ValueError(
                    f"dynamic_batching: preserve_ordering allows one priority level, not {self.priority_levels} "
                    "(as Triton requires): a higher level's answers would wait for a lower level's that arrived first"
                )
            policies = [(self.default_timeout_s, self.timeout_action_delay)]
            policies += [(p.timeout_s, p.delay) for _, p in self.level_policies]
            if any(timeout and delay for timeout, delay in policies):
                raise ValueError(
                    "dynamic_batching: a queue policy whose timeout_action is DELAY cannot go with preserve_ordering "
                    "(as Triton requires): a delayed request would hold back every answer after it"
                )
        for level, _ in self.level_policies:
            if not 1 <= level <= self.priority_levels:
                raise ValueError(
                    f"dynamic_batching: priority_queue_policy names level {level}; levels run from 1 to "
                    f"priority_levels ({self.priority_levels})"
                )

    def policy_of(self, level: int) -> QueuePolicy:
        """The queue policy of priority ``level`` (1 is the highest; 0 when the model has none)."""
        for n, p in self.level_policies:
            if n == level:
                return p
        return QueuePolicy(0, self.default_timeout_s, self.timeout_action_delay)
