"""ChatVLA-2's action expert: a ScaleDP-style diffusion transformer (DiT blocks, adaLN-Zero) that denoises
an action chunk, conditioned on the pooled VLM hidden states, the robot state and, through the paper's
*reasoning-following enhancement*, on the pooled reasoning hidden states.

    >>> expert = ActionExpert(ActionExpertConfig(), ActionNormalizer.from_stats(stats))
    >>> loss, terms = expert.compute_loss(actions, obs, state, reasoning)   # training
    >>> chunk = expert.sample(obs, state, reasoning)                                       # (B, 16, 4) raw

Conditioning, per block: c = timestep embedding + (observation embedding, or in the blocks chosen by
``reasoning_injection`` the reasoning embedding *instead*). With ``reasoning=None`` every block uses the
observation embedding. Where this differs from DiT/ScaleDP it says so in a comment.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDIMScheduler

from ..dataset import CHUNK_SIZE
from ..world.env import ACTION_DIM, STATE_DIM

INJECTIONS = ("latter_half", "all", "former_half", "off")
BETA_SCHEDULES = ("squaredcos_cap_v2", "linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIME_FREQ_DIM = 128  # sinusoidal features of the diffusion timestep, before the MLP


@dataclass
class ActionExpertConfig:
    chunk_size: int = CHUNK_SIZE  # actions predicted per call, one per 10 Hz step
    action_dim: int = ACTION_DIM  # [dx, dy, dz, grip]
    state_dim: int = STATE_DIM  # [ee_x, ee_y, ee_z, gripper_width]
    obs_dim: int = 128  # pooled VLM hidden states
    reasoning_dim: int = 128  # pooled hidden states of the reasoning tokens
    hidden: int = 128
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    reasoning_injection: str = "latter_half"  # blocks conditioned on reasoning: one of INJECTIONS
    num_train_timesteps: int = 100
    num_inference_steps: int = 10
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"

    def __post_init__(self):
        for f in ("chunk_size", "action_dim", "state_dim", "obs_dim", "reasoning_dim", "hidden", "depth", "heads",
                  "num_train_timesteps", "num_inference_steps"):
            v = getattr(self, f)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ValueError(f"{f} must be a positive int, got {v!r}")
        if not (isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0):
            raise ValueError(f"mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        for name, allowed in (("reasoning_injection", INJECTIONS), ("beta_schedule", BETA_SCHEDULES),
                              ("prediction_type", PREDICTION_TYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.num_inference_steps > self.num_train_timesteps:
            raise ValueError(f"num_inference_steps ({self.num_inference_steps}) must be <= num_train_timesteps "
                             f"({self.num_train_timesteps})")

    @property
    def reasoning_blocks(self) -> tuple[int, ...]:
        """Indices of the blocks whose adaLN condition is the reasoning embedding."""
        half = self.depth // 2
        return {"latter_half": tuple(range(half, self.depth)), "all": tuple(range(self.depth)),
                "former_half": tuple(range(half)), "off": ()}[self.reasoning_injection]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ActionExpertConfig:
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(d) - known):
            raise ValueError(f"unknown ActionExpertConfig keys {unknown}; allowed: {sorted(known)}")
        return cls(**d)


class ActionNormalizer(nn.Module):
    """Per-dimension min/max scaling of actions and states to [-1, 1]. The bounds are buffers, so they
    travel in the policy's state_dict. A dimension with (near) zero range maps to 0 instead of dividing
    by zero: x -> (x - (max + min) / 2) / max((max - min) / 2, eps)."""

    def __init__(self, action_min, action_max, state_min, state_max, eps: float = 1e-6):
        super().__init__()
        for name, v in (("action_min", action_min), ("action_max", action_max), ("state_min", state_min),
                        ("state_max", state_max)):
            self.register_buffer(name, torch.as_tensor(v, dtype=torch.float32).flatten().clone())
        for k in ("action", "state"):
            lo, hi = getattr(self, f"{k}_min"), getattr(self, f"{k}_max")
            if lo.shape != hi.shape or (lo > hi).any():
                raise ValueError(f"{k} min/max must have the same shape and min <= max, got {lo} and {hi}")
        self.eps = eps

    @classmethod
    def from_stats(cls, stats: dict) -> ActionNormalizer:
        """From a dataset's ``meta/stats.json`` dict ({"action": {"min", "max", ...}, "observation.state": ...})."""
        try:
            a, s = stats["action"], stats["observation.state"]
            return cls(a["min"], a["max"], s["min"], s["max"])
        except KeyError as e:
            raise ValueError(f"stats need 'action' and 'observation.state', each with 'min' and 'max'; "
                             f"missing {e}") from e

    @classmethod
    def identity(cls, action_dim: int, state_dim: int) -> ActionNormalizer:
        """Bounds [-1, 1] (a no-op): a placeholder until real bounds are loaded from a state_dict."""
        return cls(-torch.ones(action_dim), torch.ones(action_dim), -torch.ones(state_dim), torch.ones(state_dim))

    def _center_scale(self, k: str):
        lo, hi = getattr(self, f"{k}_min"), getattr(self, f"{k}_max")
        return (hi + lo) / 2, ((hi - lo) / 2).clamp(min=self.eps)

    def normalize_action(self, a: torch.Tensor) -> torch.Tensor:
        """(..., A) raw -> (..., A) in [-1, 1]."""
        c, s = self._center_scale("action")
        return (a - c) / s

    def unnormalize_action(self, a: torch.Tensor) -> torch.Tensor:
        """(..., A) in [-1, 1] -> (..., A) raw."""
        c, s = self._center_scale("action")
        return a * s + c

    def normalize_state(self, x: torch.Tensor) -> torch.Tensor:
        """(..., S) raw -> (..., S) in [-1, 1]."""
        c, s = self._center_scale("state")
        return (x - c) / s

    def extra_repr(self) -> str:
        return f"action_dim={self.action_min.numel()}, state_dim={self.state_min.numel()}"


class ObservationProjector(nn.Module):
    """Pooled VLM features (B, obs_dim) and normalised state (B, S) -> observation embedding (B, hidden).
    The paper's projection (two linear layers + LayerNorm); the state enters through its own Linear, added
    before the LayerNorm so the embedding has the same scale whatever the state contributes."""

    def __init__(self, obs_dim: int, state_dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(obs_dim, hidden), nn.Linear(hidden, hidden)
        self.state = nn.Linear(state_dim, hidden)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, obs: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(F.silu(self.fc1(obs))) + self.state(state))


class ReasoningProjector(nn.Module):
    """Pooled reasoning hidden states (B, reasoning_dim) -> reasoning embedding (B, hidden): an MLP."""

    def __init__(self, reasoning_dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(reasoning_dim, hidden), nn.Linear(hidden, hidden)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(r)))


class TimestepEmbedder(nn.Module):
    """Diffusion timesteps (B,) -> (B, hidden): sinusoidal features, then an MLP (as in DiT)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = TIME_FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)  # (half,)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, T, H) scaled and shifted by per-sample (B, 1, H) vectors."""
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """Self-attention over the chunk's steps + MLP, each pre-normed and modulated by the condition c through
    adaLN-Zero: shift/scale/gate come from a Linear of c that starts at zero, so the block starts as identity."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, H))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, T, H), c (B, H) -> (B, T, H)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)  # 6 x (B, 1, H)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + Linear to the action dimension; all zero-initialised, so the net outputs 0."""

    def __init__(self, hidden: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c)[:, None].chunk(2, dim=-1)  # 2 x (B, 1, H)
        return self.out(modulate(self.norm(x), shift, scale))


class ActionExpert(nn.Module):
    """Diffusion transformer over an action chunk. Tokens are the chunk's steps (B, chunk, hidden), with a
    learned positional embedding. The normaliser is a submodule, so the state_dict holds its bounds."""

    def __init__(self, config: ActionExpertConfig | None = None, normalizer: ActionNormalizer | None = None):
        super().__init__()
        self.config = cfg = config or ActionExpertConfig()
        self.normalizer = normalizer or ActionNormalizer.identity(cfg.action_dim, cfg.state_dim)
        if (self.normalizer.action_min.numel(), self.normalizer.state_min.numel()) != (cfg.action_dim, cfg.state_dim):
            raise ValueError(f"normalizer has action/state dims ({self.normalizer.extra_repr()}) but the config "
                             f"says action_dim={cfg.action_dim}, state_dim={cfg.state_dim}")
        self.reasoning_blocks = cfg.reasoning_blocks
        self.obs_proj = ObservationProjector(cfg.obs_dim, cfg.state_dim, cfg.hidden)
        self.reasoning_proj = ReasoningProjector(cfg.reasoning_dim, cfg.hidden) if self.reasoning_blocks else None
        self.time_embed = TimestepEmbedder(cfg.hidden)
        self.action_in = nn.Linear(cfg.action_dim, cfg.hidden)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.chunk_size, cfg.hidden))
        self.blocks = nn.ModuleList(DiTBlock(cfg.hidden, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg.hidden, cfg.action_dim)
        self._init_weights()
        # DiT/ScaleDP sample with diffusers' default "leading" spacing (90, 80, ..., 0), which never starts at
        # the noisiest trained step; "trailing" (99, 89, ..., 9) starts from (almost) pure noise as sampled.
        self.scheduler = DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                                       prediction_type=cfg.prediction_type, clip_sample=True,
                                       timestep_spacing="trailing")

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos_emb, std=0.02)
        for lin in [b.ada[-1] for b in self.blocks] + [self.final.ada[-1], self.final.out]:  # adaLN-Zero
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return (f"params={self.num_parameters() / 1e6:.2f}M, injection={self.config.reasoning_injection}, "
                f"reasoning_blocks={list(self.reasoning_blocks)}")

    def forward(self, noisy_actions: torch.Tensor, timesteps: torch.Tensor, obs: torch.Tensor, state: torch.Tensor,
                reasoning: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise (or x0 / v, per ``prediction_type``) of a normalised noisy chunk.

        noisy_actions (B, chunk, A), timesteps (B,) int, obs (B, obs_dim), state (B, S) raw,
        reasoning (B, reasoning_dim) or None (then every block is conditioned on the observation).
        Returns (B, chunk, A). Every step of the chunk attends to every other, in training as in sampling.
        """
        t = self.time_embed(timesteps)  # (B, H)
        c_obs = t + self.obs_proj(obs, self.normalizer.normalize_state(state))  # (B, H)
        c_rsn = c_obs if reasoning is None or self.reasoning_proj is None else t + self.reasoning_proj(reasoning)
        x = self.action_in(noisy_actions) + self.pos_emb  # (B, chunk, H)
        for i, block in enumerate(self.blocks):
            c = c_rsn if i in self.reasoning_blocks else c_obs  # reasoning *replaces* the observation
            x = block(x, c)
        return self.final(x, c)  # the final layer shares the last block's condition

    def _check(self, obs, state, reasoning):
        cfg, B = self.config, obs.shape[0]
        for name, x, d in (("obs", obs, cfg.obs_dim), ("state", state, cfg.state_dim),
                           ("reasoning", reasoning, cfg.reasoning_dim)):
            if x is not None and tuple(x.shape) != (B, d):
                raise ValueError(f"{name} must have shape (B={B}, {d}), got {tuple(x.shape)}")

    def draw_noise(self, batch: int, generator: torch.Generator | None = None, device=None):
        """Training noise (batch, chunk, A) and then timesteps (batch,), drawn from ``generator`` in that order."""
        cfg = self.config
        noise = torch.randn((batch, cfg.chunk_size, cfg.action_dim), generator=generator, device=device)
        return noise, torch.randint(0, cfg.num_train_timesteps, (batch,), generator=generator, device=device)

    def compute_loss(self, actions: torch.Tensor, obs: torch.Tensor, state: torch.Tensor,
                     reasoning: torch.Tensor | None = None, generator: torch.Generator | None = None,
                     noise: torch.Tensor | None = None,
                     timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Diffusion loss: MSE between the prediction and its target (the noise, for epsilon) over the chunk.

        actions (B, chunk, A) raw; obs (B, obs_dim); state (B, S) raw; reasoning (B, reasoning_dim) or None;
        generator draws noise (B, chunk, A) and then timesteps (B,) (on the tensors' device), unless ``noise`` and
        ``timesteps`` are given (a data-parallel trainer draws them for the global batch and passes each process
        its rows). Returns (loss, {"diffusion": float}).

        Chunks that run past an episode's end are trained on their padding (the last target held), like
        LeRobot's diffusion policy by default. Hiding padded steps from attention, as this module once did,
        trains a model that :meth:`sample` (which sees whole chunks) never runs: its chunks near an episode's
        end were wrong even on training frames whose loss was tiny.
        """
        self._check(obs, state, reasoning)
        B, T, A = actions.shape
        if (T, A) != (self.config.chunk_size, self.config.action_dim):
            raise ValueError(f"actions must be (B, {self.config.chunk_size}, {self.config.action_dim}), "
                             f"got {tuple(actions.shape)}")
        x0 = self.normalizer.normalize_action(actions)  # (B, chunk, A) in [-1, 1]
        if noise is None or timesteps is None:
            noise, timesteps = self.draw_noise(B, generator, x0.device)
        t = timesteps
        pred = self(self.scheduler.add_noise(x0, noise, t), t, obs, state, reasoning)
        target = {"epsilon": noise, "sample": x0}.get(self.config.prediction_type)
        if target is None:  # v_prediction
            target = self.scheduler.get_velocity(x0, noise, t)
        loss = F.mse_loss(pred, target)
        return loss, {"diffusion": loss.item()}

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, state: torch.Tensor, reasoning: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Denoise a chunk of raw actions with DDIM (``num_inference_steps``, eta = 0): deterministic given
        ``generator`` (on obs.device), which draws only the starting noise.

        One observation (the current step t) in, ``chunk_size`` actions out, one per 10 Hz step::

            step:    t  t+1                          t+15
            obs:    |o|                                     obs (B, obs_dim), state (B, S), reasoning (B, R)
            chunk:  |a|a|a|a|a|a|a|a|a|a|a|a|a|a|a|a|       returned (B, chunk, A): a[k] = [dx, dy, dz, grip]
                                                            to apply at step t + k
        """
        self._check(obs, state, reasoning)
        cfg = self.config
        x = torch.randn((obs.shape[0], cfg.chunk_size, cfg.action_dim), generator=generator, device=obs.device,
                        dtype=obs.dtype)  # (B, chunk, A) pure noise
        self.scheduler.set_timesteps(cfg.num_inference_steps, device=obs.device)
        for t in self.scheduler.timesteps:
            pred = self(x, t.expand(obs.shape[0]), obs, state, reasoning)
            x = self.scheduler.step(pred, t, x).prev_sample  # clip_sample keeps x0 in [-1, 1]
        return self.normalizer.unnormalize_action(x)
