"""ChatVLA-2 itself: the dynamic MoE language backbone, the diffusion action expert, the policy that
joins them, the three training stages and closed-loop evaluation."""
