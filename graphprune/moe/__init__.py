"""Mixture-of-experts pruning: routed experts as units, routing statistics, expert criteria' inputs
and the expert plan (router rows, router biases, stacked expert tensors, config expert count are
rewritten by the backend's passes)."""

from .experts import EXPERT_ALLOCATIONS, choose_removed, expert_criterion, min_experts, plan_counts
from .layers import ExpertLayer, find_expert_layers
from .routing import ExpertStats, collect_expert_stats

__all__ = ["EXPERT_ALLOCATIONS", "ExpertLayer", "ExpertStats", "choose_removed", "collect_expert_stats",
           "expert_criterion", "find_expert_layers", "min_experts", "plan_counts"]
