"""Mixture-of-experts pruning: routed experts as units, routing statistics, expert criteria' inputs
and the expert rewrite (router rows, router biases, stacked expert tensors, config expert count)."""

from .layers import ExpertLayer, find_expert_layers
from .prune import EXPERT_ALLOCATIONS, ExpertPruning, expert_criterion, min_experts, prune_experts
from .routing import ExpertStats, collect_expert_stats

__all__ = ["EXPERT_ALLOCATIONS", "ExpertLayer", "ExpertPruning", "ExpertStats", "collect_expert_stats",
           "expert_criterion", "find_expert_layers", "min_experts", "prune_experts"]
