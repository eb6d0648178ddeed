"""Mixture-of-experts language model: every decoder MLP of the Qwen2-VL becomes experts (ChatVLA-2).

    >>> cfg = MoEConfig()                            # dynamic: 8 experts, learned top-2 router
    >>> upcycle(model, cfg)                          # each expert a copy of the layer's pretrained MLP
    >>> with routing_context(model, inputs["attention_mask"], data_type=torch.tensor([1])):
    ...     out = model(**inputs, labels=labels)
    >>> loss = out.loss + cfg.aux_loss_coef * load_balancing_loss(model)
    >>> routing(model)[layer].experts                # (B, T, k): which experts each token used

Variants, with the paper's ablation result (open-world math matching successes):

* ``dynamic``: ``num_experts`` experts, learned top-``top_k`` router (ChatVLA-2; 43/52)
* ``shared_dynamic``: an always-on shared expert + ``dynamic`` (25/52)
* ``static_dynamic``: one of 2 experts chosen by the sample's data type + ``dynamic`` (11/52)
* ``static``: 2 experts chosen by data type, no router (ChatVLA)
* ``dense``: no MoE; ``upcycle`` leaves the model as it is (the paper's dense 3B: 2/52)

Every expert starts as a copy of the layer's pretrained MLP ("upcycling"), so a freshly upcycled model
computes what the dense one did (up to rounding). HF decoder layers call ``mlp(hidden_states)`` only; padding
and data type reach the MoE layers through :func:`routing_context`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("dense", "dynamic", "static", "shared_dynamic", "static_dynamic")
DATA_TYPES = ("image_text", "robot")  # data_type value -> name; the static experts are one per data type


@dataclass
class MoEConfig:
    """How :func:`upcycle` turns each decoder MLP into experts.

    variant: one of :data:`VARIANTS` (see the module docstring).
    num_experts, top_k: routed experts per layer and how many of them each token uses (the dynamic variants).
    aux_loss_coef: weight of :func:`load_balancing_loss` in the training loss; applied by the caller.
    router_init_std: router weights start ~ N(0, std²); 0 gives uniform routing.
    """

    variant: str = "dynamic"
    num_experts: int = 8
    top_k: int = 2
    aux_loss_coef: float = 0.01
    router_init_std: float = 0.02

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown MoE variant {self.variant!r}; expected one of {list(VARIANTS)}")
        for name in ("num_experts", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        for name in ("aux_loss_coef", "router_init_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")

    @property
    def routed(self) -> bool:
        """Whether the layers have a learned router (``dynamic``, ``shared_dynamic``, ``static_dynamic``)."""
        return self.variant.endswith("dynamic")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MoEConfig:
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown MoEConfig keys {unknown}; expected some of {names}")
        return cls(**d)


@dataclass
class Routing:
    """What one MoE layer did in its last forward. B, T: that forward's batch and tokens (during KV-cached
    decoding, only the new tokens). E = num_experts, k = top_k.

    logits: (B, T, E) float32 router logits; None without a router (``static``).
    experts: (B, T, k) long, the routed experts of each token, most probable first; None without a router.
    weights: (B, T, k) float32, their router probabilities renormalised to sum to 1; None without a router.
    static: (B, T) long, the static expert (= the sample's data type) of each token; None without one.
    mask: (B, T) bool, True for real tokens, False for padding.
    """

    logits: torch.Tensor | None
    experts: torch.Tensor | None
    weights: torch.Tensor | None
    static: torch.Tensor | None
    mask: torch.Tensor

    def load_balancing_loss(self) -> torch.Tensor:
        """Switch-Transformer loss ``E * sum_e f_e * P_e`` over the real tokens: f_e = fraction of tokens
        with e among their top-k (sum_e f_e = k, no gradient), P_e = mean router probability of e.
        Equals k under uniform routing and grows as routing concentrates. Scalar float32."""
        E, k = self.logits.shape[-1], self.experts.shape[-1]
        m = self.mask.reshape(-1, 1).float()  # (N, 1)
        n = m.sum().clamp(min=1)
        probs = self.logits.reshape(-1, E).softmax(-1)  # (N, E)
        chosen = F.one_hot(self.experts.reshape(-1, k), E).sum(1).float()  # (N, E), k ones per row
        f, p = (chosen * m).sum(0) / n, (probs * m).sum(0) / n  # (E,), (E,)
        return E * (f * p).sum()


class Router(nn.Module):
    """Learned top-k gate, a bias-free linear layer: x (N, H) -> logits (N, E) float32, experts (N, k) long,
    weights (N, k) float32 (softmax in float32 over all E, top-k kept and renormalised to sum to 1)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, init_std: float = 0.02):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.randn(num_experts, hidden_size) * init_std)  # (E, H)

    def forward(self, x: torch.Tensor):
        logits = F.linear(x, self.weight).float()  # (N, E)
        weights, experts = logits.softmax(-1).topk(self.top_k, dim=-1)  # (N, k), (N, k)
        return logits, experts, weights / weights.sum(-1, keepdim=True)

    def extra_repr(self) -> str:
        return f"hidden_size={self.weight.shape[1]}, num_experts={self.weight.shape[0]}, top_k={self.top_k}"


def dispatch(experts: nn.ModuleList, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sparse mixture ``out[n] = sum_j weights[n, j] * experts[idx[n, j]](x[n])``. x (N, H), idx (N, k) long,
    weights (N, k) -> (N, H). Each expert runs only on the rows routed to it (N * k rows in all)."""
    out = torch.zeros_like(x)
    if x.shape[0] == 1:  # one token (a decoding step): call only its k experts, summed in the same order as below
        chosen = idx[0].tolist()
        for slot in sorted(range(len(chosen)), key=chosen.__getitem__):
            out += experts[chosen[slot]](x) * weights[0, slot].to(x.dtype)
        return out
    for e, expert in enumerate(experts):
        rows, slot = (idx == e).nonzero(as_tuple=True)  # (n_e,), (n_e,)
        if rows.numel():
            y = expert(x.index_select(0, rows)) * weights[rows, slot, None].to(x.dtype)  # (n_e, H)
            out.index_add_(0, rows, y)
    return out


class MoEMLP(nn.Module):
    """Drop-in replacement for a decoder layer's MLP: hidden_states (B, T, H) -> (B, T, H).

    Sub-modules (every expert a copy of the pretrained MLP ``mlp``):
      ``router`` + ``experts`` (num_experts)    dynamic variants
      ``shared_expert``                          shared_dynamic
      ``static_experts`` (2, one per data type)  static variants

    Output: ``dynamic`` the routed mixture; ``static`` the data-type expert; ``shared_dynamic`` and
    ``static_dynamic`` the *mean* of the always-on expert and the routed mixture. The paper does not say how
    it combines them; the mean keeps a fresh upcycle equal to the dense model (the sum would double the MLP).
    Padding tokens are routed like any token (attention keeps them from real tokens) but are left out of
    the load-balancing loss. Each forward stores a :class:`Routing` in ``last_routing``.
    """

    def __init__(self, mlp: nn.Module, config: MoEConfig):
        super().__init__()
        self.variant = config.variant
        self.top_k = config.top_k if config.routed else 0
        ref = next(mlp.parameters())
        self.router = (Router(mlp.hidden_size, config.num_experts, config.top_k, config.router_init_std)
                       .to(device=ref.device, dtype=ref.dtype) if config.routed else None)
        self.experts = nn.ModuleList(copy.deepcopy(mlp) for _ in range(config.num_experts if config.routed else 0))
        self.shared_expert = copy.deepcopy(mlp) if config.variant == "shared_dynamic" else None
        static = config.variant.startswith("static")
        self.static_experts = nn.ModuleList(copy.deepcopy(mlp) for _ in range(len(DATA_TYPES) if static else 0))
        self.context: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)  # set by routing_context
        self.last_routing: Routing | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        B, T, H = hidden_states.shape
        x = hidden_states.reshape(B * T, H)  # (N, H)
        mask, data_type = self.context
        if mask is None or mask.shape != (B, T):  # no mask, or a KV-cached step that sees only new tokens
            mask = torch.ones(B, T, dtype=torch.bool, device=x.device)
        logits = experts = weights = static = None
        outs = []
        if self.router is not None:
            logits, experts, weights = self.router(x)  # (N, E), (N, k), (N, k)
            outs.append(dispatch(self.experts, x, experts, weights))
        if self.shared_expert is not None:
            outs.append(self.shared_expert(x))
        if len(self.static_experts):
            static = self._static_choice(data_type, B, T).to(x.device)  # (B, T)
            outs.append(dispatch(self.static_experts, x, static.reshape(-1, 1), x.new_ones(B * T, 1)))
        unflat = lambda t: None if t is None else t.reshape(B, T, -1)
        self.last_routing = Routing(unflat(logits), unflat(experts), unflat(weights), static, mask.to(x.device))
        return (sum(outs) / len(outs)).reshape(B, T, H)

    def _static_choice(self, data_type: torch.Tensor | None, B: int, T: int) -> torch.Tensor:
        """(B,) data type -> (B, T) static expert of each token."""
        if data_type is None:
            raise ValueError(f"MoE variant {self.variant!r} routes each sample by its data type: run the model "
                             "inside routing_context(model, data_type=...) with data_type a (B,) long tensor "
                             "(0 = image-text, 1 = robot)")
        if data_type.shape != (B,):
            raise ValueError(f"data_type has shape {tuple(data_type.shape)}, expected ({B},) for this batch")
        return data_type.reshape(B, 1).expand(B, T)

    def extra_repr(self) -> str:
        routed = f", num_experts={len(self.experts)}, top_k={self.top_k}" if self.router is not None else ""
        static = f", static_experts={len(self.static_experts)}" if len(self.static_experts) else ""
        return f"variant={self.variant!r}{routed}{static}"


def moe_layers(model: nn.Module) -> list[MoEMLP]:
    """The MoE layers of ``model`` (or ``model`` itself if it is one), in layer order."""
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


def upcycle(model: nn.Module, config: MoEConfig) -> nn.Module:
    """Replace, in place, every decoder MLP of a ``Qwen2VLForConditionalGeneration``
    (``model.model.language_model.layers[i].mlp``) by a :class:`MoEMLP` whose experts are copies of it;
    returns ``model``. The config is recorded as ``model.config.moe`` (so ``save_pretrained`` writes it to
    config.json; see :func:`moe_config_of`). ``dense`` returns the model untouched. Router weights are drawn
    from torch's global RNG, so seed first for reproducible routers."""
    if moe_layers(model):
        raise ValueError("model is already upcycled (its decoder MLPs are MoEMLPs); upcycle a dense model")
    try:
        layers = model.get_submodule("model.language_model.layers")
    except AttributeError as exc:
        raise ValueError("upcycle expects a Qwen2VLForConditionalGeneration (decoder layers at "
                         f"model.model.language_model.layers), got {type(model).__name__}") from exc
    if config.variant == "dense":
        return model
    for layer in layers:
        layer.mlp = MoEMLP(layer.mlp, config)
    model.config.moe = config.to_dict()
    return model


def moe_config_of(model: nn.Module) -> MoEConfig | None:
    """The :class:`MoEConfig` recorded by :func:`upcycle` (also on a model loaded with ``from_pretrained``
    from a saved upcycled folder, which comes back dense), or None for a dense model. To rebuild a saved
    folder: ``upcycle(model, moe_config_of(model))`` then load its safetensors state dict."""
    d = getattr(model.config, "moe", None)
    return None if d is None else MoEConfig.from_dict(d)


@contextlib.contextmanager
def routing_context(model: nn.Module, attention_mask=None, data_type=None):
    """Hand the MoE layers of ``model`` what HF decoder layers do not pass their MLPs.

    attention_mask: (B, T) of the full input, 1 = real token. Padding is left out of the load-balancing loss.
        Used only by forwards whose hidden states are (B, T): in KV-cached decoding steps all tokens are real.
    data_type: (B,) long, 0 = image-text, 1 = robot (:data:`DATA_TYPES`); required by the static variants,
        which send every token of a sample to that sample's static expert. Ignored by the others.
    """
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask).bool()
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be (B, T), got shape {tuple(attention_mask.shape)}")
    if data_type is not None:
        data_type = torch.as_tensor(data_type)
        if data_type.dim() != 1 or data_type.is_floating_point() or not bool(
                ((data_type >= 0) & (data_type < len(DATA_TYPES))).all()):
            raise ValueError(f"data_type must be a (B,) integer tensor of 0 = image-text / 1 = robot, got {data_type}")
        if attention_mask is not None and len(data_type) != len(attention_mask):
            raise ValueError(f"data_type has {len(data_type)} samples but attention_mask has {len(attention_mask)}")
        data_type = data_type.long()
    layers = moe_layers(model)
    saved = [m.context for m in layers]
    for m in layers:
        m.context = (attention_mask, data_type)
    try:
        yield model
    finally:
        for m, c in zip(layers, saved):
            m.context = c


def routing(model: nn.Module) -> list[Routing]:
    """One :class:`Routing` per MoE layer, in layer order, from the last forward (empty for a dense model)."""
    layers = moe_layers(model)
    if any(m.last_routing is None for m in layers):
        raise RuntimeError("no routing recorded yet: run a forward pass first")
    return [m.last_routing for m in layers]


def load_balancing_loss(model: nn.Module) -> torch.Tensor:
    """Mean over the routed MoE layers of :meth:`Routing.load_balancing_loss` for the last forward: a scalar
    float32 with gradient to the routers, ≈ top_k when routing is balanced. Computed on demand, in training
    or eval mode; a zero tensor when there is no router or no forward yet. Unscaled: the caller adds
    ``config.aux_loss_coef * load_balancing_loss(model)`` to its loss."""
    losses = [m.last_routing.load_balancing_loss() for m in moe_layers(model)
              if m.last_routing is not None and m.last_routing.logits is not None]
    if not losses:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.stack(losses).mean()


def count_moe_parameters(model: nn.Module) -> dict[str, int]:
    """total: all parameters (tied ones once); active: those one token uses, i.e. all but its idle experts
    (each layer runs top_k routed experts, plus the shared expert or one static expert)."""
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for m in moe_layers(model):
        expert = (list(m.experts) + list(m.static_experts))[0]
        idle_experts = len(m.experts) - m.top_k + max(len(m.static_experts) - 1, 0)
        idle += idle_experts * sum(p.numel() for p in expert.parameters())
    return {"total": total, "active": total - idle}
