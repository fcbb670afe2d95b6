"""``tansuo plan``: scaling laws fitted to a study, and what a larger run would take.

A study of ``tansuo explore`` whose trials record N, D, FLOPs and MFU (recipes/shakespeare-scaling.yaml) is
fitted with Hoffmann et al. 2022's ``L(N, D) = E + A / N^alpha + B / D^beta`` (:mod:`fit`), backtested by
holding out its largest size, and projected (:mod:`project`): the loss of a named size and token count,
the compute-optimal allocation of a budget, the budget that reaches a target, time and money on the
accelerators of a hardware file (:mod:`hardware`), memory per device under DDP and FSDP (:mod:`memory`,
:mod:`shape`) and the cost of inference. :mod:`report` writes plan.json, plan.md and report.html.
"""

from tansuo.plan.points import PlanError
from tansuo.plan.project import PlanOptions, make_plan, parse_count, plan_study

__all__ = ["PlanError", "PlanOptions", "make_plan", "parse_count", "plan_study"]
