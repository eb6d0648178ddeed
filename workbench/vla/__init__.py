"""ChatVLA-2 itself: the dynamic MoE language backbone, the diffusion action expert, the policy that
joins them, the three training stages and closed-loop evaluation."""

from .observation import Observation
from .policy import ChatVLA2Policy, load_policy, save_policy

__all__ = ["ChatVLA2Policy", "Observation", "load_policy", "save_policy"]
