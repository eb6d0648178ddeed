"""The simulated world: Gymnasium API, determinism, splits, expert, caller options, bad input."""

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from PIL import Image

from workbench.world import grounding as G
from workbench.world import language
from workbench.world.catalog import (
    CARD_SLOTS,
    EQUATIONS,
    OBJECTS,
    SPLITS,
    WRITING_STYLES,
    Equation,
    get_split,
)
from workbench.world.env import TabletopEnv
from workbench.world.expert import ScriptedExpert
from workbench.world.rollout import rollout
from workbench.world.scene import CAMERAS
from workbench.world.writing import render_text

TASK_SPLITS = [("math_matching", "in_domain"), ("math_matching", "open_world"),
               ("toy_placement", "in_domain"), ("toy_placement", "open_world")]


@pytest.fixture(scope="module")
def envs():
    made = {}

    def get(task, split="in_domain", cameras=()):
        key = (task, split, cameras)
        if key not in made:
            made[key] = TabletopEnv(task, split, cameras=cameras)
        return made[key]

    yield get
    for e in made.values():
        e.close()


@pytest.mark.parametrize("task", ["math_matching", "toy_placement"])
def test_check_env(task):
    import gymnasium as gym

    import workbench  # noqa: F401 - registers the environments

    env = gym.make({"math_matching": "workbench/MathMatching-v0",
                    "toy_placement": "workbench/ToyPlacement-v0"}[task], render_mode="rgb_array").unwrapped
    check_env(env, skip_render_check=False)
    obs, info = env.reset(seed=0)
    assert obs["board"].shape == (96, 192, 3) and obs["board"].dtype == np.uint8
    assert obs["table"].shape == (176, 256, 3)
    assert obs["state"].shape == (4,)
    assert env.render().shape == (240, 320, 3)
    assert info["is_success"] is False and info["task"] == task
    env.close()


def test_same_seed_same_episode():
    a, b = TabletopEnv("toy_placement"), TabletopEnv("toy_placement")
    oa, ia = a.reset(seed=7)
    ob, ib = b.reset(seed=7)
    assert ia == ib
    rng = np.random.default_rng(0)
    for _ in range(5):
        act = rng.uniform(a.action_space.low, a.action_space.high).astype(np.float32)
        oa, *_ = a.step(act)
        ob, *_ = b.step(act)
    for k in oa:
        np.testing.assert_array_equal(oa[k], ob[k])
    _, ic = a.reset(seed=8)
    assert ic != ia
    a.close()
    b.close()


def test_splits_are_disjoint():
    md, mo = SPLITS[("math_matching", "in_domain")], SPLITS[("math_matching", "open_world")]
    assert set(md.equations).isdisjoint(mo.equations) and md.equations and mo.equations
    assert set(md.writing_styles).isdisjoint(mo.writing_styles)
    assert {e.op for e in md.equations} == {"+", "-"}
    assert {"×", "÷"} <= {e.op for e in mo.equations}
    td, to = SPLITS[("toy_placement", "in_domain")], SPLITS[("toy_placement", "open_world")]
    assert set(td.scene_objects).isdisjoint(to.objects)  # open-world objects never appear in-domain
    assert len(OBJECTS) >= 12
    assert all(0 <= e.answer <= 9 for eqs in EQUATIONS.values() for e in eqs)
    styles = {s for sp in SPLITS.values() for s in sp.writing_styles}
    assert styles <= set(WRITING_STYLES) and any(WRITING_STYLES[s].kind == "hand" for s in md.writing_styles)


@pytest.mark.parametrize("task,split", TASK_SPLITS)
def test_random_episodes_respect_split(envs, task, split):
    env, spec = envs(task, split), get_split(task, split)
    for seed in range(20):
        _, info = env.reset(seed=seed)
        if task == "math_matching":
            assert Equation.parse(info["equation"]) in spec.equations
            assert info["writing_style"] in spec.writing_styles
            assert len(info["cards"]) == 4 and info["answer"] in info["cards"]
        else:
            assert info["object"] in spec.objects
            assert set(info["toys"]) <= set(spec.scene_objects)


@pytest.mark.parametrize("task,split", TASK_SPLITS)
def test_expert_solves_seeded_episodes(envs, task, split):
    env = envs(task, split)
    results = [rollout(env, seed=s) for s in range(5)]
    assert all(ep.error is None for ep in results)
    assert sum(ep.success for ep in results) == 5, [repr(ep) for ep in results if not ep.success]
    ep = results[0]
    assert len(ep.phases) == len(ep.actions) == len(ep.states)
    assert {"reach", "grasp", "carry", "release"} <= set(ep.phases)


@pytest.mark.parametrize("task", ["math_matching", "toy_placement"])
def test_the_env_tells_which_card_is_on_the_pad_and_where_a_toy_rests(envs, task):
    env = envs(task)
    ep = rollout(env, seed=4)
    gt = ep.ground_truth
    assert ep.success
    if task == "math_matching":
        assert env.card_on_pad(gt["answer"])
        assert not any(env.card_on_pad(d) for d in gt["cards"] if d != gt["answer"])
    else:
        assert env.toy_placed(gt["object"], gt["target"], gt["direction"])
        others = [d for d in ("left", "right", "front", "behind") if d != gt["direction"]]
        assert not any(env.toy_placed(gt["object"], gt["target"], d) for d in others)


@pytest.mark.parametrize("task", ["math_matching", "toy_placement"])
def test_retargeted_episode_checks_and_demonstrates_the_new_task(envs, task):
    """retarget(): success, termination and the expert follow the new task; the scene's own task is not done."""
    env = envs(task)

    class Retargeted:  # a controller that hands the env another task right after the reset
        def start(self, env, obs, info, seed=None):
            self.want, self.kind = env.counterfactual_task(np.random.default_rng(seed))
            env.retarget(self.want)
            self.act = ScriptedExpert(env).act

        def __call__(self, obs):
            return self.act(obs)

    controller = Retargeted()
    ep = rollout(env, controller, seed=6)
    scene, want = ep.ground_truth, controller.want
    assert ep.success and env.ground_truth() == want and want["instruction"] == scene["instruction"]
    assert env.achieved(want) and not env.achieved(scene)
    if task == "math_matching":
        assert controller.kind == "card" and want["answer"] != scene["answer"] and want["cards"] == scene["cards"]
    else:
        assert (want["object"], want["direction"]) != (scene["object"], scene["direction"])


def test_the_task_a_reasoning_states_in_the_scene(envs):
    env = envs("math_matching")
    _, info = env.reset(seed=2)
    other = next(d for d in info["cards"] if d != info["answer"])
    absent = next(d for d in range(10) if d not in info["cards"])
    stated = env.stated_task(language.parse_reasoning(f"I'll move the card {other} to the pad."))
    assert stated["answer"] == other and stated["answer_card_slot"] == info["cards"][other]
    env.retarget(stated)  # a task of this scene
    assert env.stated_task(language.parse_reasoning(f"I'll move the card {absent} to the pad.")) is None
    assert env.stated_task(language.parse_reasoning("no card named")) is None
    env = envs("toy_placement")
    _, info = env.reset(seed=2)
    side = next(d for d in ("left", "right", "front", "behind") if d != info["direction"])
    facts = language.ReasoningFacts(object=info["object"], target=info["target"], direction=side)
    assert env.stated_task(facts)["direction"] == side
    assert env.stated_task(language.ReasoningFacts(object="a whale", target=info["target"], direction=side)) is None


def test_retarget_refuses_another_scene(envs):
    env = envs("math_matching")
    _, info = env.reset(seed=1)
    absent = next(d for d in range(10) if d not in info["cards"])
    with pytest.raises(ValueError, match="not on the table"):
        env.retarget({**info, "answer": absent})
    with pytest.raises(ValueError, match=r"\['cards'\] differ"):
        env.retarget({**info, "cards": {absent: "front_left"}})
    env = envs("toy_placement")
    _, info = env.reset(seed=1)
    with pytest.raises(ValueError, match="two toys of the scene"):
        env.retarget({**info, "target": info["object"]})
    with pytest.raises(ValueError, match="direction must be one of"):
        env.retarget({**info, "direction": "up"})


def test_doing_nothing_fails_and_truncates(envs):
    env = envs("math_matching")
    ep = rollout(env, controller=lambda obs: (np.zeros(4, np.float32), "reach"), seed=0)
    assert not ep.success and len(ep) == env.max_steps


def test_failing_policy_ends_episode_cleanly(envs):
    def broken(obs):
        raise RuntimeError("model crashed")

    ep = rollout(envs("math_matching"), controller=broken, seed=0)
    assert not ep.success and "model crashed" in ep.error


def test_callers_whiteboard_image_and_cards(envs):
    env = envs("math_matching", cameras=("board",))
    board = render_text("9-2=?", "hand_script", seed=3)
    obs, info = env.reset(seed=0, options={"whiteboard": np.asarray(board), "answer": 7,
                                           "cards": {7: "front left", 1: "back right"}})
    assert info["answer"] == 7 and info["cards"] == {7: "front left", 1: "back right"}
    assert info["answer_card_slot"] == "front left" and info["equation"] is None
    assert obs["board"].std() > 10  # the board shows writing
    ep = rollout(env, seed=0, options={"equation": "6÷3", "writing_style": "stix", "cards": [2, 5, 8]})
    assert ep.success and ep.ground_truth["answer"] == 2


def test_callers_instruction_and_layout(envs):
    env = envs("toy_placement")
    text = "Pick the pink donut and place it to the right of the black box"
    ep = rollout(env, seed=1, options={"instruction": text,
                                       "toys": {"pink donut": (0.45, 0.1), "black box": (0.6, 0.05)}})
    gt = ep.ground_truth
    assert (gt["object"], gt["target"], gt["direction"]) == ("pink donut", "black box", "right")
    assert gt["instruction"] == text and ep.success


@pytest.mark.parametrize("options,match", [
    ({"equation": "3+4", "whiteboard": Image.new("RGB", (64, 32))}, "either"),
    ({"whiteboard": Image.new("RGB", (64, 32))}, "answer"),
    ({"whiteboard": Image.new("RGB", (64, 32)), "answer": 12}, "answer"),
    ({"whiteboard": None, "answer": 3}, "None"),
    ({"whiteboard": np.zeros((1, 1, 3), np.uint8), "answer": 3}, "1x1"),
    ({"whiteboard": np.zeros((10, 10, 7), np.uint8), "answer": 3}, "shape"),
    ({"whiteboard": "board.png", "answer": 3}, "PIL image"),
    ({"equation": "7×8"}, "single-digit"),
    ({"equation": "seven"}, "cannot read"),
    ({"cards": [3, 12]}, "out of range"),
    ({"equation": "3+4", "cards": [1, 2]}, "answer card 7"),
    ({"cards": {7: "under the table"}, "equation": "3+4"}, "unknown card slot"),
    ({"cards": {7: (2.0, 0.0)}, "equation": "3+4"}, "off the reachable"),
    ({"writing_style": "comic sans"}, "unknown writing_style"),
    ({"instruction": ""}, "non-empty"),
    ({"object": "x"}, "unknown reset option"),
    ({"equation": "3+4", "cards": [7, 7, 7, 7]}, "repeat a digit"),
    ({"whiteboard": np.full((64, 128, 3), 255, np.uint8), "answer": True}, "answer=<int 0-9>"),
    ({"equation": "3+4", "cards": {True: "back left", 7: "front left"}}, "out of range"),
])
def test_math_bad_options(envs, options, match):
    with pytest.raises(ValueError, match=match):
        envs("math_matching").reset(seed=0, options=options)


@pytest.mark.parametrize("options,match", [
    ({"object": "unicorn", "target": "red cube", "direction": "left"}, "unknown object 'unicorn'"),
    ({"object": "red cube", "target": "red cube", "direction": "left"}, "must differ"),
    ({"object": "red cube", "target": "red mug", "direction": "above"}, "unknown direction"),
    ({"instruction": "Pick the unicorn and place it left of the moon"}, "Known objects"),
    ({"object": "red cube", "target": "red mug", "direction": "left", "toys": ["red cube"]}, "not among"),
    ({"object": "red cube", "target": "red mug", "direction": "left", "toys": ["red cube", "yeti"]},
     "unknown toy"),
    ({"equation": "3+4"}, "unknown reset option"),
    ({"instruction": "Pick the red cube and place it to the left of the red mug", "object": "yellow duck"},
     "make them agree"),
    ({"instruction": "Pick the red cube and place it to the left of the red mug", "direction": "right"},
     "make them agree"),
    ({"object": "red cube", "target": "red mug", "direction": "left", "toys": ["red cube", "red mug", "red cube"]},
     "twice"),
    ({"object": "red cube", "target": "red mug", "direction": "left",
      "toys": {"red cube": (0.5, 0.0), "red mug": (0.51, 0.01)}}, "overlap"),
])
def test_toy_bad_options(envs, options, match):
    with pytest.raises(ValueError, match=match):
        envs("toy_placement").reset(seed=0, options=options)


def test_bad_constructor_and_actions(envs):
    with pytest.raises(ValueError, match="expected one of"):
        TabletopEnv("juggling")
    with pytest.raises(ValueError, match="open_world"):
        TabletopEnv("math_matching", "test")
    with pytest.raises(ValueError, match="camera"):
        TabletopEnv("math_matching", cameras=("wrist",))
    env = envs("math_matching")
    env.reset(seed=0)
    with pytest.raises(ValueError, match="4 finite numbers"):
        env.step([0.0, 0.0])
    with pytest.raises(ValueError, match="4 finite numbers"):
        env.step([np.nan, 0, 0, 0])
    with pytest.raises(ValueError, match="4 finite numbers"):
        env.step(np.zeros((2, 2)))  # not silently reshaped


def test_actions_are_clipped_to_bounds(envs):
    env = envs("math_matching")
    obs, _ = env.reset(seed=0)
    obs2, *_ = env.step(np.array([5.0, 0, 0, 0], np.float32))  # far beyond MAX_STEP
    assert obs2["state"][0] - obs["state"][0] < 0.06


@pytest.mark.parametrize("task", ["math_matching", "toy_placement"])
def test_reasoning_templates_parse_back(envs, task):
    env = envs(task, "open_world")
    for seed in range(12):
        _, info = env.reset(seed=seed)
        rng = np.random.default_rng(seed)
        text = language.episode_reasoning(info, rng)
        facts = language.parse_reasoning(text)
        if task == "math_matching":
            assert all(language.math_score_parts(facts, info).values()), (text, facts)
            card = env.scene.body_position(env.scene.cards[info["answer"]])[:2]
            assert G.box_hit(facts.pick_box, G.card_box(card)), text  # the listed slot's box finds the card
            want = {"pick_box": G.card_box(CARD_SLOTS[info["answer_card_slot"]]), "place_box": G.pad_box()}
        else:
            assert (facts.object, facts.target, facts.direction) == (info["object"], info["target"],
                                                                     info["direction"]), text
            toys = info["toys"]
            want = {"pick_box": G.toy_box(info["object"], (*toys[info["object"]], 0)),
                    "target_box": G.toy_box(info["target"], (*toys[info["target"]], 0)),
                    "place_box": G.affordance_box(toys[info["target"]], info["direction"])}
            assert G.placement_ok(facts.place_box, toys[info["target"]], info["direction"])
        # the boxes it states are the simulator's, rounded to the 0-1000 grid
        for slot, box in want.items():
            assert np.abs(np.subtract(getattr(facts, slot), box)).max() <= 1, (slot, text)
        for phase in language.PHASES:
            assert language.step_reasoning(phase, info, rng)


def test_reasoning_has_several_phrasings(envs):
    _, info = envs("math_matching").reset(seed=0)
    texts = {language.episode_reasoning(info, np.random.default_rng(s)) for s in range(30)}
    assert len(texts) >= 3


def test_math_reasoning_lists_the_cards_and_the_parser_reads_the_answer_card_from_the_list(envs):
    env = envs("math_matching", "open_world")
    for seed in range(6):
        _, info = env.reset(seed=seed)
        text = language.episode_reasoning(info, np.random.default_rng(seed))
        for d, slot in info["cards"].items():  # every card, with its slot, as the VLM lists them
            assert f"card {d} at the {slot}" in text, (d, slot, text)
        assert "box_start" not in text.split("green pad")[0]  # the card is named by its digit, located by the list
    # the chosen card is the boxed / last-named one; its slot and box are the list's, whatever is restated after it
    text = ("2 + 3 = 5. On the table: card 1 at the back left, card 5 at the front right. So I need the card 5, at "
            "the back middle: <|object_ref_start|>the card 5<|object_ref_end|><|box_start|>(700,700),(800,900)"
            "<|box_end|>.")
    f = language.parse_reasoning(text)
    want = tuple(round(v) for v in G.card_box(CARD_SLOTS["front right"]))
    assert (f.card, f.card_slot, f.pick_box) == (5, "front right", want)
    f = language.parse_reasoning("2 + 3 = 5. The cards: card 1 at the back left, card 5 at the front right. I'll "
                                 "move the card 5 to the pad.")
    assert (f.card, f.card_slot, f.pick_box) == (5, "front right", want)
    # without a listing, the slot and box after the card count (the earlier phrasing, and the VLM's answers)
    f = language.parse_reasoning("I need <|object_ref_start|>the card 4<|object_ref_end|><|box_start|>(1,2),(3,4)"
                                 "<|box_end|> at the back middle.")
    assert (f.card, f.card_slot, f.pick_box) == (4, "back middle", (1, 2, 3, 4))
    # the first slot after the card, wherever the names sort; another card's listed slot is never borrowed
    assert language.parse_reasoning("The card 7 is at the back left, not the front right.").card_slot == "back left"
    f = language.parse_reasoning("card 3 at the back left, card 5 at the front right. So I need the card 7.")
    assert (f.card, f.card_slot, f.cards, f.pick_box) == (7, None, {"back left": 3, "front right": 5}, None)


def test_parse_reasoning_never_raises():
    for junk in ["", "???", "card", "12 + = 4", None, "the back left 5 × 9 = 45"]:
        language.parse_reasoning(junk)
    f = language.parse_reasoning("the board says 12 - 5 = ? so 12 - 5 = 7; card 7 at the back left")
    assert (f.equation, f.answer, f.card, f.card_slot) == ("12-5", 7, 7, "back left")


def test_grounded_phrases_are_read_by_what_they_name():
    text = ("On the table are <|object_ref_start|>the yellow duck<|object_ref_end|><|box_start|>(10,20),(30,40)"
            "<|box_end|> and <|object_ref_start|>the red cube<|object_ref_end|><|box_start|>(500,500),(560,580)"
            "<|box_end|>. I need to place the yellow duck <|object_ref_start|>behind the red cube<|object_ref_end|>"
            "<|box_start|>(600,480),(700,590)<|box_end|>.")
    f = language.parse_reasoning(text)
    assert (f.object, f.target, f.direction) == ("yellow duck", "red cube", "behind")
    assert (f.pick_box, f.target_box, f.place_box) == ((10, 20, 30, 40), (500, 500, 560, 580), (600, 480, 700, 590))
    # a malformed box is skipped, not guessed; the grounding tokens are allowed in reasoning, not in instructions
    assert language.parse_reasoning(text.replace("(10,20),(30,40)", "(10,20)")).pick_box is None
    assert language.check_text(text, "reasoning", grounding=True) == text
    with pytest.raises(ValueError, match="box_start"):
        language.check_text(text, "instruction")


def test_card_slots_and_positions():
    for name, (x, y) in CARD_SLOTS.items():
        assert language.describe_position(x + 0.01, y - 0.01) == name


def test_grasp_holds_while_carrying(envs):
    env = envs("toy_placement")
    obs, _ = env.reset(seed=3)
    expert = ScriptedExpert(env)
    heights = []
    body, _ = env.pick_and_place_targets()
    for _ in range(60):
        action, phase = expert.act(obs)
        obs, *_ , term, trunc, _ = env.step(action)
        if phase == "carry":
            heights.append(env.scene.body_center(body)[2])
        if term or trunc:
            break
    assert heights and min(heights) > 0.08  # lifted and carried, not dragged or dropped


@pytest.mark.parametrize("task", ["math_matching", "toy_placement"])
def test_grounding_boxes_land_on_the_named_objects(envs, task):
    """The boxes the reasoning states (ground truth -> Camera.project): the table camera shows the object at each
    box's centre, and the box is about its size."""
    env = envs(task, cameras=("table",))
    obs, _ = env.reset(seed=5)
    gt = env.ground_truth()
    if task == "math_matching":
        boxes = [G.card_box(gt["answer_card_xy"]), G.pad_box()]
    else:
        boxes = [G.toy_box(name, (*gt["toys"][name], 0)) for name in (gt["object"], gt["target"])]
    table = obs["table"].astype(int)
    background = table[2, 2]  # the table's colour, far from every object
    for box in boxes:
        u, v = G.box_centre(box)
        r, c = int(v / 1000 * 176), int(u / 1000 * 256)
        assert np.abs(table[r, c] - background).sum() > 60, box  # something other than bare table
        assert 20 < box[2] - box[0] < 300 and 20 < box[3] - box[1] < 300, box
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        CAMERAS["table"].project([[0.5, 0.0]])
