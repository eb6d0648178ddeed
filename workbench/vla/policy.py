"""The ChatVLA-2 policy: a Qwen2-VL backbone with MoE layers that first *reasons* in text, and a diffusion
action expert that *follows* that reasoning.

One control cycle (10 Hz steps, chunks of ``chunk_size`` = 16, ``n_action_steps`` = 8 executed)::

    episode start:  [board, table, instruction] --VLM.generate--> reasoning text  (once per episode)
    every chunk:    [board, table, instruction, reasoning] --VLM forward--> hidden states h (B, L, H)
                      obs  = mean of h over the prompt tokens
                      why  = [mean of h over the reasoning tokens ; Fourier features of the boxes it states]
                    ActionExpert.sample(obs, state, why) -> actions (16, 4); the first 8 are executed

Reasoning is generated once per episode, at the first call after :meth:`ChatVLA2Policy.reset`: it states
facts that do not change while the robot acts (equation, answer, which card and where; object, target,
side) and, as ChatVLA-2's reasoning does, *where* the things to act on are: boxes on the table camera in
Qwen2-VL's grounding format (what to pick, the target, where to put it; :mod:`workbench.world.grounding`).
At the start the arm occludes neither camera. Later chunks re-read the *same* reasoning against the current
images, so its hidden states follow the scene.

Deviation from the paper, stated plainly: the paper's action expert reads the reasoning through its hidden
states alone. Here the reasoning path also gets the boxes the reasoning states, read back by the parser
(:func:`~workbench.world.language.parse_reasoning`), as numbers (:func:`box_features`;
``PolicyConfig.reasoning_boxes=False`` turns them off). The pooled hidden states of a 128-wide model keep too
little of *where* a box is; the numbers keep all of it, for any object the VLM can ground, seen in robot data or
not. (An earlier version found things with language-queried keypoints over the table camera's tokens, read
from the reasoning's word embeddings; they could not find objects whose names no robot episode contains.)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..world.env import STATE_DIM, actions_towards, commanded_targets
from ..world.language import SOLVE_QUESTION, ReasoningFacts, mentions_board, parse_reasoning, split_board_answer
from ..world.scene import WORKSPACE_HIGH, WORKSPACE_LOW
from .action_expert import ActionExpert, ActionExpertConfig, ActionNormalizer
from .moe import MoEConfig, moe_config_of, routing_context, upcycle
from .observation import CAMERA_ORDER, Observation, check_instruction

#: data types for static routing and logging
IMAGE_TEXT, ROBOT = 0, 1
POLICY_FILES = ("policy_config.json", "model.safetensors", "tokenizer.json", "processor_config.json")


# ---------------------------------------------------------------------------------------------- config
@dataclass
class PolicyConfig:
    """Everything needed to rebuild a policy folder (besides the VLM's own config)."""

    moe: dict = field(default_factory=lambda: MoEConfig().to_dict())
    action: dict = field(default_factory=dict)  # ActionExpertConfig fields (obs/reasoning dims are derived)
    n_action_steps: int = 8  # actions executed from each predicted chunk before predicting again
    max_reasoning_tokens: int = 192
    #: the reasoning path also gets the boxes the reasoning states (what to pick, where to put it) as numbers
    reasoning_boxes: bool = True
    #: for an instruction about the whiteboard, the backbone first answers ``SOLVE_QUESTION`` and reasons on from
    #: its answer (a two-turn chat, :meth:`ChatVLA2Policy.conversation`); training takes no LM loss on that answer
    board_first: bool = False

    def __post_init__(self):
        MoEConfig.from_dict(self.moe)  # validates
        chunk = self.action.get("chunk_size", ActionExpertConfig().chunk_size)
        if not (isinstance(self.n_action_steps, int) and 1 <= self.n_action_steps <= chunk):
            raise ValueError(f"n_action_steps must be an int in [1, chunk_size={chunk}], got {self.n_action_steps!r}")
        if not (isinstance(self.max_reasoning_tokens, int) and self.max_reasoning_tokens > 0):
            raise ValueError(f"max_reasoning_tokens must be a positive int, got {self.max_reasoning_tokens!r}")
        for name in ("reasoning_boxes", "board_first"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- model
#: Fourier frequencies (times pi) of the box coordinates given to the reasoning path
BOX_FREQUENCIES = (1.0, 2.0, 4.0, 8.0)
#: the boxes of :class:`~workbench.world.language.ReasoningFacts` the reasoning path reads
BOX_SLOTS = ("pick_box", "place_box")
#: per box: centre (u, v) as sines and cosines at each frequency, and whether the reasoning stated it
BOX_FEATURES = len(BOX_SLOTS) * (4 * len(BOX_FREQUENCIES) + 1)


def box_features(facts: list[ReasoningFacts]) -> torch.Tensor:
    """(B, :data:`BOX_FEATURES`): Fourier features of the centres of what each reasoning says to pick and where
    to put it (0-1000 table-camera boxes, scaled to [-1, 1]); zeros and a 0 flag for a box it does not state."""
    f = torch.tensor(BOX_FREQUENCIES) * torch.pi
    rows = []
    for fact in facts:
        row = []
        for slot in BOX_SLOTS:
            box = getattr(fact, slot)
            if box is None:
                row.append(torch.zeros(4 * len(BOX_FREQUENCIES) + 1))
                continue
            x1, y1, x2, y2 = (min(max(float(v), 0.0), 1000.0) for v in box)
            centre = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2]) / 500.0 - 1.0  # (2,) in [-1, 1]
            angles = (centre[:, None] * f).flatten()
            row.append(torch.cat([angles.sin(), angles.cos(), torch.ones(1)]))
        rows.append(torch.cat(row))
    return torch.stack(rows) if rows else torch.zeros(0, BOX_FEATURES)


#: parse_reasoning, remembered per text: an episode's reasoning is re-read at every chunk and training step
_parsed = functools.lru_cache(maxsize=4096)(parse_reasoning)


@dataclass
class Summaries:
    """What the action side reads from the VLM's last hidden states for a batch of B robot frames (cacheable
    when the VLM is frozen).

    prompt: (B, H) mean over the prompt (images + instruction); reasoning: (B, H) mean over the reasoning;
    boxes: (B, :data:`BOX_FEATURES`) the :func:`box_features` of the boxes the reasoning states.
    """

    prompt: torch.Tensor
    reasoning: torch.Tensor
    boxes: torch.Tensor

    def rows(self) -> list[dict]:
        """One dict per frame (the hidden-state means float16, the box features float32), for caches."""
        return [{"prompt": self.prompt[i].half(), "reasoning": self.reasoning[i].half(), "boxes": self.boxes[i]}
                for i in range(len(self.prompt))]

    @classmethod
    def stack(cls, rows: list[dict]) -> Summaries:
        """The inverse of :meth:`rows` (float32)."""
        return cls(*(torch.stack([r[k].float() for r in rows]) for k in ("prompt", "reasoning", "boxes")))


@dataclass
class Features:
    """What the action expert is conditioned on. obs: (B, H) the observation vector; reasoning: (B, R) the
    reasoning vector (R = H, plus :data:`BOX_FEATURES` with ``reasoning_boxes``)."""

    obs: torch.Tensor
    reasoning: torch.Tensor


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of h (B, L, H) over positions where mask (B, L) is true: (B, H)."""
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


class ChatVLA2Policy(nn.Module):
    """VLM (Qwen2-VL + MoE) + diffusion action expert. Build one with :meth:`from_vlm`
    (stage 1) or :func:`load_policy`; use :meth:`predict_action_chunk` / :meth:`select_action` /
    :meth:`reset` like a LeRobot policy."""

    def __init__(self, vlm, processor, config: PolicyConfig, normalizer: ActionNormalizer | None = None):
        super().__init__()
        self.vlm, self.processor, self.config = vlm, processor, config
        hidden = vlm.config.text_config.hidden_size
        acfg = ActionExpertConfig.from_dict({**config.action, "obs_dim": hidden,
                                             "reasoning_dim": hidden + (BOX_FEATURES if config.reasoning_boxes else 0),
                                             "state_dim": STATE_DIM})
        self.action_expert = ActionExpert(acfg, normalizer)
        self.reset()

    @classmethod
    def from_vlm(cls, vlm, processor, stats: dict, config: PolicyConfig | None = None) -> ChatVLA2Policy:
        """Stage 1 ("knowledge freezing"): upcycle the pretrained VLM's MLPs into experts (per
        ``config.moe``) and attach a fresh action expert; its normaliser scales targets by the workspace and
        states by dataset ``stats`` (``meta/stats.json``)."""
        config = config or PolicyConfig()
        upcycle(vlm, MoEConfig.from_dict(config.moe))
        state = stats["observation.state"]
        # the action expert predicts commanded targets [x, y, z, grip]: always inside the workspace
        normalizer = ActionNormalizer([*WORKSPACE_LOW, 0.0], [*WORKSPACE_HIGH, 1.0], state["min"], state["max"])
        return cls(vlm, processor, config, normalizer)

    # ------------------------------------------------------------------ features
    def features(self, batch: dict, data_type: torch.Tensor | None = None, with_lm_loss: bool = False,
                 n_robot: int | None = None, lm_rows: torch.Tensor | None = None):
        """Run the VLM on a collated batch whose assistant turn is the reasoning (labels mark it).

        Returns (:class:`Features` of the first ``n_robot`` rows (default all), LM loss (the mean over the labelled
        tokens of the ``lm_rows``, a (B,) bool mask; default all rows) or None). ``batch``:
        :func:`workbench.vlm.api.collate` output (plus ``pixel_values`` when vision features are not cached); robot
        rows come first, each with both cameras; ``data_type``: (B,) 0/1."""
        h = self.hidden_states(batch, data_type)
        lm_loss = None
        if with_lm_loss:
            labels = batch.get("lm_labels", batch["labels"])
            labels = labels if lm_rows is None else labels.masked_fill(~lm_rows[:, None], -100)
            logits, targets, _ = self.answer_logits(h, labels)
            lm_loss = nn.functional.cross_entropy(logits, targets) if len(targets) else logits.sum()
        n = h.shape[0] if n_robot is None else n_robot
        robot = {k: batch[k][:n] for k in ("input_ids", "labels", "attention_mask")}
        return self.condition(self.summaries(h[:n], robot)), lm_loss

    def answer_logits(self, h: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From last hidden states h (B, L, H) and labels (B, L): the float32 logits (N, vocab) at the N positions
        whose next token is labelled (teacher forcing), those tokens (N,), and how many of them each row has (B,)."""
        answer = labels[:, 1:] != -100
        return self.vlm.lm_head(h[:, :-1][answer]).float(), labels[:, 1:][answer], answer.sum(1)

    def answer_log_probs(self, batch: dict, data_type: torch.Tensor | None = None
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per row of a collated batch, the (answer tokens, vocab) log-probabilities at its labelled positions, and
        those answer tokens."""
        logits, targets, counts = self.answer_logits(self.hidden_states(batch, data_type), batch["labels"])
        return list(torch.log_softmax(logits, -1).split(counts.tolist())), list(targets.split(counts.tolist()))

    def hidden_states(self, batch: dict, data_type: torch.Tensor | None = None) -> torch.Tensor:
        """The language model's last hidden states (B, L, H), after the final norm."""
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "lm_labels")}
        b = batch["input_ids"].shape[0]
        data_type = torch.full((b,), ROBOT) if data_type is None else data_type
        with routing_context(self.vlm, attention_mask=batch["attention_mask"], data_type=data_type):
            return self.vlm.model(**inputs).last_hidden_state

    def vlm_summaries(self, batch: dict) -> Summaries:
        """What the action side reads from the VLM for a robot batch: :meth:`summaries` of its hidden states."""
        return self.summaries(self.hidden_states(batch), batch)

    def summaries(self, h: torch.Tensor, batch: dict) -> Summaries:
        """:class:`Summaries` from the last hidden states h (B, L, H) of a collated batch (labels mark the
        reasoning)."""
        reasoning = batch["labels"] != -100  # (B, L)
        prompt = batch["attention_mask"].bool() & (reasoning.long().cumsum(1) == 0)
        texts = [self.processor.tokenizer.decode(ids[mask]) for ids, mask in zip(batch["input_ids"], reasoning)]
        boxes = box_features([_parsed(t) for t in texts]).to(h)
        return Summaries(masked_mean(h, prompt), masked_mean(h, reasoning), boxes)

    def condition(self, s: Summaries) -> Features:
        """:class:`Features` for the action expert from :class:`Summaries`."""
        reasoning = torch.cat([s.reasoning, s.boxes], -1) if self.config.reasoning_boxes else s.reasoning
        return Features(s.prompt, reasoning)

    # ------------------------------------------------------------------ acting
    def reset(self, seed: int | None = None) -> None:
        """Forget the episode: the next call generates new reasoning; the action queue is emptied.
        ``seed``: the diffusion noise of this episode's chunks (:meth:`select_action`) is drawn from a generator
        seeded with it, so a seeded episode is reproduced exactly; ``None`` draws from torch's global RNG."""
        if seed is not None and (isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer))
                                 or not 0 <= seed < 2**63):
            raise ValueError(f"seed must be None or an int in [0, 2**63), got {seed!r}")
        self._generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        self._queue: deque = deque()
        self.reasoning: str | None = None
        self.facts: ReasoningFacts | None = None
        self._instruction: str | None = None
        self.last_features: Features | None = None
        self.last_chunk: np.ndarray | None = None  # (chunk_size, 4): the latest chunk, as env actions
        self.last_targets: np.ndarray | None = None  # (chunk_size, 4): the same chunk as commanded targets
        self._command: np.ndarray | None = None  # (3,) the end-effector target commanded so far

    def images(self, obs: Observation) -> list:
        return [getattr(obs, n) for n in CAMERA_ORDER]

    def conversation(self, instruction: str, reasoning: str) -> tuple[str, str, tuple]:
        """The chat in which the backbone says ``reasoning``, as (question, answer, follow-ups) of
        :func:`~workbench.vlm.api.encode_example`: the instruction answered by the reasoning; or, with
        ``config.board_first``, an instruction about the whiteboard and a reasoning that opens with the solved
        equation, two turns: :data:`~workbench.world.language.SOLVE_QUESTION` answered by the equation, then the
        instruction answered by the rest. (The action side's prompt summary then covers the cameras and
        ``SOLVE_QUESTION``, the tokens before the first answer; the instruction comes after it.)"""
        split = split_board_answer(reasoning) if self.config.board_first and mentions_board(instruction) else None
        if split is None or not split[1]:
            return instruction, reasoning, ()
        return SOLVE_QUESTION, split[0], ((instruction, split[1]),)

    def encode_reasoning(self, images, instruction: str, reasoning: str) -> dict:
        """A training item (:func:`~workbench.vlm.api.encode_example`) of the :meth:`conversation` for
        ``reasoning``; a board answer that opens it is context, not an LM target (``lm_labels``)."""
        from ..vlm.api import encode_example

        question, answer, follow_ups = self.conversation(instruction, reasoning)
        return encode_example(self.processor, images, question, answer, follow_ups, learn_first=not follow_ups)

    def reasoning_batch(self, observation, instruction: str, reasoning: str) -> dict:
        """Model inputs (with pixels) of the :meth:`conversation` for ``reasoning``, with ``labels`` marking it."""
        from ..vlm.api import answer_labels, build_inputs

        batch = build_inputs(self.processor, self.images(Observation.coerce(observation)),
                             *self.conversation(instruction, reasoning))
        batch["labels"] = answer_labels(self.processor, batch["input_ids"][0])[None]
        return batch

    @torch.no_grad()
    def generate_reasoning(self, observation, instruction: str, streamer=None) -> str:
        """Reasoning text for ``instruction`` given the cameras (greedy, KV-cached ``generate``; ``streamer``
        receives its tokens as they come, see :func:`workbench.vlm.api.ask_stream`). With ``config.board_first``
        and an instruction about the whiteboard, the backbone first answers
        :data:`~workbench.world.language.SOLVE_QUESTION`; the solved equation it states (if it states one) opens
        the reasoning, and the rest is its answer to the instruction after that turn (the streamer gets the opening,
        then the rest as it comes)."""
        from ..vlm.api import ask

        obs = Observation.coerce(observation)
        instruction = check_instruction(instruction)
        images, limit = self.images(obs), self.config.max_reasoning_tokens
        with routing_context(self.vlm, data_type=torch.tensor([ROBOT])):
            if self.config.board_first and mentions_board(instruction):
                opening = split_board_answer(ask(self.vlm, self.processor, images, SOLVE_QUESTION, max_new_tokens=24))
                if opening is not None:
                    if streamer is not None:  # the stated equation streams first, as the text will show it
                        streamer.on_finalized_text(f"{opening[0]}. ")
                    rest = ask(self.vlm, self.processor, images, instruction, max_new_tokens=limit,
                               what="instruction", streamer=streamer, before=((SOLVE_QUESTION, opening[0]),))
                    return f"{opening[0]}. {rest}"
            return ask(self.vlm, self.processor, images, instruction, max_new_tokens=limit, what="instruction",
                       streamer=streamer)

    def set_reasoning(self, reasoning: str, instruction: str) -> None:
        """Use ``reasoning`` for this episode's chunks (as if generated): the reasoning-following path acts on it."""
        from ..world.language import check_text

        reasoning = check_text(reasoning, "reasoning", max_chars=4000, grounding=True)
        self.reasoning, self._instruction = reasoning, check_instruction(instruction)
        self.facts = parse_reasoning(reasoning)

    @torch.no_grad()
    def predict_action_chunk(self, observation, instruction: str, generator: torch.Generator | None = None,
                             reasoning: str | None = None):
        """Actions for the next ``chunk_size`` steps, and the episode's reasoning text.

        Args:
            observation: :class:`Observation` or the env's observation dict.
            instruction: the task text.
            reasoning: use this reasoning for the episode instead of generating it (counterfactuals, or
                ground-truth "oracle" reasoning to separate reasoning errors from action errors).
        Returns:
            (actions (chunk_size, 4) float32 numpy array [dx, dy, dz, grip] per 10 Hz step, reasoning str).
            The action expert predicts *commanded targets* [x, y, z, grip] (``self.last_targets``); they are
            turned into the env's delta actions from the target commanded so far (tracked by
            :meth:`select_action`; at an episode's start, the measured end-effector position).
            ``self.facts`` holds the parsed conclusion (:class:`~workbench.world.language.ReasoningFacts`).
        """
        obs = Observation.coerce(observation)
        instruction = check_instruction(instruction)
        was_training = self.training
        self.eval()
        if reasoning is not None:
            self.set_reasoning(reasoning, instruction)
        elif self.reasoning is None or instruction != self._instruction:
            self.reasoning = self.generate_reasoning(obs, instruction) or "."
            self.facts, self._instruction = parse_reasoning(self.reasoning), instruction
        feats, _ = self.features(self.reasoning_batch(obs, instruction, self.reasoning))
        self.last_features = feats
        state = torch.from_numpy(obs.state)[None]
        targets = self.action_expert.sample(feats.obs, state, feats.reasoning, generator=generator)[0]
        self.train(was_training)
        self.last_targets = targets.numpy().astype(np.float32)
        start = obs.state[:3] if self._command is None else self._command
        self.last_chunk = actions_towards(start, self.last_targets)
        return self.last_chunk, self.reasoning

    def select_action(self, observation, instruction: str, reasoning: str | None = None) -> np.ndarray:
        """The next (4,) action; predicts a new chunk when the queue of ``n_action_steps`` runs out
        (``reasoning``: see :meth:`predict_action_chunk`). Keeps track of the commanded target, as the env
        does, so that chunks are turned into actions from where the command really is."""
        obs = Observation.coerce(observation)
        if self._command is None:  # an episode's first step: the command is where the hand is (home)
            self._command = obs.state[:3].astype(np.float64)
        if not self._queue:
            chunk, _ = self.predict_action_chunk(obs, instruction, generator=self._generator, reasoning=reasoning)
            self._queue.extend(chunk[: self.config.n_action_steps])
        action = self._queue.popleft()
        self._command = commanded_targets(action[None], self._command)[0, :3]
        return action

    def extra_repr(self) -> str:
        moe = moe_config_of(self.vlm)
        return (f"moe={moe.variant if moe else 'dense'}, reasoning_boxes={self.config.reasoning_boxes}, "
                f"n_action_steps={self.config.n_action_steps}")


# ---------------------------------------------------------------------------------------------- files
def save_policy(policy: ChatVLA2Policy, path: str, extra: dict | None = None, half: bool = False) -> str:
    """Write the policy as one folder, atomically: ``policy_config.json`` (policy, MoE, action expert and
    VLM configs), ``model.safetensors`` (every weight, the action normaliser included) and the processor.
    ``half=True`` stores the weights in float16 (half the size; :func:`load_policy` loads them into float32)."""
    import copy

    from safetensors.torch import save_model

    from ..checkpoint import atomic_folder, file_sha256

    with atomic_folder(path) as tmp:
        save_model(copy.deepcopy(policy).half() if half else policy, os.path.join(tmp, "model.safetensors"))
        meta = {"policy": policy.config.to_dict(), "vlm_config": policy.vlm.config.to_dict(),
                "action_expert": policy.action_expert.config.to_dict(),
                "weights_dtype": "float16" if half else "float32", **(extra or {}),
                "weights_sha256": file_sha256(os.path.join(tmp, "model.safetensors"))}  # last: never overridden
        with open(os.path.join(tmp, "policy_config.json"), "w") as f:
            json.dump(meta, f, indent=1)
        policy.processor.save_pretrained(tmp)
    return path


def _current_fields(saved: dict, path: str) -> dict:
    """The saved policy config in today's terms: folders written before the reasoning path read boxes have no
    ``reasoning_boxes`` (they did not); keypoints are gone (a folder that used them cannot be loaded)."""
    saved = {"reasoning_boxes": False, **saved}
    if saved.pop("num_keypoints", 0) or saved.pop("keypoint_loss_coef", 0):
        raise ValueError(f"{path} holds a policy with keypoints (SpatialKeypoints), which this version no longer has: "
                         "retrain it (python -m workbench.train recipe chatvla2 ...)")
    return saved


def is_policy_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "policy_config.json"))


def load_policy(path: str, verify: bool = True) -> ChatVLA2Policy:
    """A policy from a :func:`save_policy` folder (safetensors only; never unpickles). Raises
    ``FileNotFoundError`` / ``ValueError`` saying what is missing or wrong. ``verify``: check the weights
    against the SHA-256 recorded in ``policy_config.json`` (folders written before it was recorded load
    without the check)."""
    from safetensors.torch import load_model
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from ..checkpoint import verify_checksum
    from ..vlm.processing import TinyQwen2VLProcessor

    if not os.path.isdir(path):
        raise FileNotFoundError(f"no policy folder at {path!r}")
    missing = [f for f in POLICY_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        hint = " (it looks like a VLM checkpoint: make a policy with `python -m workbench.train stage " \
               "knowledge_freezing`)" if os.path.isfile(os.path.join(path, "config.json")) else ""
        raise FileNotFoundError(f"{path!r} is not a policy folder: {missing} missing{hint}")
    try:
        with open(os.path.join(path, "policy_config.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not read {path}/policy_config.json: {type(exc).__name__}: {exc}") from exc
    needed = [k for k in ("policy", "vlm_config") if not isinstance(meta, dict) or not isinstance(meta.get(k), dict)]
    if needed:
        raise ValueError(f"{path}/policy_config.json lacks {needed}: expected the JSON that save_policy writes "
                         f"(keys 'policy', 'vlm_config', 'action_expert', 'weights_dtype', 'weights_sha256')")
    if verify:
        verify_checksum(os.path.join(path, "model.safetensors"), meta.get("weights_sha256"))
    try:
        config = PolicyConfig(**_current_fields(meta["policy"], path))
        vlm = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_dict(meta["vlm_config"]))
        upcycle(vlm, MoEConfig.from_dict(config.moe))
        processor = TinyQwen2VLProcessor.from_pretrained(path)
        policy = ChatVLA2Policy(vlm, processor, config)
        load_model(policy, os.path.join(path, "model.safetensors"), strict=True)
    except Exception as exc:
        raise ValueError(f"could not load the policy at {path!r}: {type(exc).__name__}: {exc}") from exc
    return policy.eval()


__all__ = ["BOX_FEATURES", "ChatVLA2Policy", "Features", "Observation", "PolicyConfig", "Summaries", "box_features",
           "is_policy_folder", "load_policy", "save_policy", "IMAGE_TEXT", "ROBOT"]
