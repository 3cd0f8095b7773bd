"""Queue-depth autoscaling, simulated: what the chart's HPA would do with the queue a load test measured.

The chart scales Pods on the average ``batchgate_queue_depth`` per pod. A load test against *one*
pod (``batchgate loadtest --sweep-rate ... --metrics-url ...``) measures, for each offered rate, the
queue that pod holds and the latency its callers see. This module joins the two:

- :class:`QueueCurve` turns the load test into a per-pod model: queue depth and p99 as functions of
  the request rate one pod receives, up to the pod's capacity (the highest rate it sustained);
- :class:`HPA` is the ``autoscaling/v2`` controller's arithmetic for one metric with an
  ``AverageValue`` target (proportional rule, tolerance, stabilization windows, rate policies), as
  the Kubernetes controller computes it;
- :func:`simulate` drives a traffic ramp through both, one tick at a time, and reports how many
  replicas run, what queue each holds, and when a pod is past its capacity;
- :func:`pick_target` reads the target queue depth off the load test: the largest per-pod queue
  whose step still met the latency SLO.

Run it as ``python -m batchgate.loadtest.autoscale --results results.json --ramp 0:100,300:2000``.

The parts live in ``traffic`` (the curve, the target pick and the ramp), ``controller`` (the values and
the HPA), ``simulation`` and ``report`` (the table, the plot and the command line).

The modelling assumptions (each one is repeated where it is used):

1. *Steady state per rate.* A pod that receives r req/s (r at or below its capacity) holds the queue
   the load test measured at r, straight away; the queue's own transients (seconds) are ignored
   next to the autoscaler's (tens of seconds and more).
2. *Even spread.* Traffic is divided evenly over the *ready* pods at every instant. That is what
   per-request balancing gives (an L7 proxy or mesh, or clients doing round robin over the headless
   Service). With a plain ClusterIP Service, long-lived gRPC channels stay where they are until the
   gateway's maximum connection age closes them: ``rebalance_s`` (``--rebalance``) models that
   connection churn, and a new pod's share then grows over about that long.
3. *Fluid overload.* Above capacity the excess arrivals pile up: a pod's extra backlog grows at
   (rate - capacity) req/s and drains at (capacity - rate) once the rate falls below capacity.
   Its queue is the curve's value at capacity plus that backlog, never below the curve.
4. *Cold starts.* A pod created by a scale-up takes no traffic and reports no metric until
   ``ready_delay_s`` later (image pull, model load, readiness probe).
5. *Scale-down.* Removed pods stop taking traffic at once; what they held is assumed to drain
   during their termination grace period and leaves the model.
"""

from .controller import (
    CHART_VALUES,
    DEFAULT_VALUES,
    HPA,
    Autoscaling,
    Decision,
    Policy,
    Rules,
    load_values,
    queue_limit_from_values,
)
from .report import build_parser, main
from .simulation import ASSUMPTIONS, FORMAT, FORMAT_VERSION, Simulation, simulate
from .traffic import EPS, CurvePoint, QueueCurve, TargetPick, parse_ramp, pick_target, rate_at

__all__ = [
    "ASSUMPTIONS",
    "CHART_VALUES",
    "DEFAULT_VALUES",
    "EPS",
    "FORMAT",
    "FORMAT_VERSION",
    "HPA",
    "Autoscaling",
    "CurvePoint",
    "Decision",
    "Policy",
    "QueueCurve",
    "Rules",
    "Simulation",
    "TargetPick",
    "build_parser",
    "load_values",
    "main",
    "parse_ramp",
    "pick_target",
    "queue_limit_from_values",
    "rate_at",
    "simulate",
]
