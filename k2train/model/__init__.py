"""The Kimi K2 model in plain torch.nn (no torch.distributed here: parallelism is applied from outside)."""

from .attention import MLA
from .model import Block, K2Model
from .moe import FeedForward, GroupedExperts, MoE, Router, update_router_bias_
from .norms import RMSNorm

__all__ = ["K2Model", "Block", "MLA", "MoE", "Router", "GroupedExperts", "FeedForward", "RMSNorm", "update_router_bias_"]
