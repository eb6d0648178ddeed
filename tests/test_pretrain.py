"""VLM pretraining: safe checkpoints, resume after a kill, the CLI, config validation."""

import dataclasses
import json
import os

import pytest
import torch

from workbench import checkpoint as ck
from workbench.vlm import pretrain as P


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    path = ck.save_checkpoint(str(tmp_path), 7, lambda d: None, opt, {"phase": "see", "phase_step": 7},
                              {"head.weight": torch.ones(2)})
    assert ck.latest_checkpoint(str(tmp_path)) == path
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.5)
    state, extra = ck.load_checkpoint_state(path, opt2)
    assert state["step"] == 7 and state["phase"] == "see" and torch.equal(extra["head.weight"], torch.ones(2))
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"]
    for k in a["state"]:
        assert torch.equal(a["state"][k]["exp_avg"], b["state"][k]["exp_avg"])
    assert not any(f.endswith((".pt", ".bin", ".pkl")) for f in os.listdir(path))


def test_incomplete_checkpoints_are_ignored_and_old_ones_pruned(tmp_path):
    for step in (1, 2, 3):
        ck.save_checkpoint(str(tmp_path), step, lambda d: None, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == ["step-000002", "step-000003"]
    os.makedirs(root / "step-000009")  # a folder without trainer_state.json: never complete
    assert ck.latest_checkpoint(str(tmp_path)).endswith("step-000003")
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        ck.load_checkpoint_state(str(root / "step-000009"))


def test_failed_save_leaves_no_checkpoint(tmp_path):
    def broken(d):
        raise OSError("disk full")

    with pytest.raises(OSError):
        ck.save_checkpoint(str(tmp_path), 1, broken)
    assert os.listdir(tmp_path / "checkpoints") == []


def test_lr_schedule():
    lrs = [P.lr_at(s, 100, 1e-3) for s in range(100)]
    assert lrs[0] < lrs[4] == pytest.approx(1e-3) and lrs[-1] < 1e-4 and min(lrs) > 0


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"see_lr": 2.0}, {"answer_steps": -1}, {"see_batch_size": 1.5},
                                 {"dense_coef": -0.1}, {"same_table": 2}])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        P.PretrainConfig(**bad)


def test_fast_run_resumes_after_a_kill_and_read_trains_the_language_side_only(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    cfg = P.PretrainConfig.fast(see_steps=4, read_steps=2, answer_steps=4, checkpoint_every=2, batch_size=4)
    work = str(tmp_path / "run")
    original_talk = P.Pretrainer.talk

    def killed_in_answer(self, phase, *a, **k):
        if phase == "answer":
            raise KeyboardInterrupt
        return original_talk(self, phase, *a, **k)

    monkeypatch.setattr(P.Pretrainer, "talk", killed_in_answer)
    with pytest.raises(KeyboardInterrupt):
        P.Pretrainer(cfg, work, progress=False).run()
    assert ck.latest_checkpoint(work).endswith("step-000006")  # see (4) and read (2) are saved
    # *read* froze the vision side (tower, merger) and trained the language model
    after_see, after_read = (load_file(os.path.join(work, "checkpoints", f"step-00000{n}", "vlm", "model.safetensors"))
                             for n in (4, 6))
    vision = [k for k in after_see if k.startswith("visual.")]  # Qwen2-VL's checkpoint names
    language = [k for k in after_see if k.startswith("model.layers.")]
    assert vision and language
    assert all(torch.equal(after_see[k], after_read[k]) for k in vision)
    assert not all(torch.equal(after_see[k], after_read[k]) for k in language)
    monkeypatch.undo()
    started = []
    original_see = P.Pretrainer.see
    monkeypatch.setattr(P.Pretrainer, "see", lambda self, *a, **k: started.append("see") or original_see(self, *a, **k))
    monkeypatch.setattr(P.Pretrainer, "talk", lambda self, phase, *a, **k: started.append((phase, k.get("start")))
                        or original_talk(self, phase, *a, **k))
    model, processor = P.Pretrainer(cfg, work, progress=False).run()
    assert started == [("read", 2), ("answer", 0), ("scenes", 0)]  # resumed at the end of "read": nothing redone
    assert ck.latest_checkpoint(work).endswith("step-000012")
    rows = open(os.path.join(work, "log.csv")).read().splitlines()
    assert [sum(f",{p}," in r for r in rows) for p in P.PHASES] == [4, 2, 4, 2]
    # *scenes* froze the vision side again
    after_answer, after_scenes = (load_file(os.path.join(work, "checkpoints", f"step-0000{n}", "vlm",
                                                         "model.safetensors")) for n in (10, 12))
    assert all(torch.equal(after_answer[k], after_scenes[k]) for k in vision)
    assert not all(torch.equal(after_answer[k], after_scenes[k]) for k in language)
    with pytest.raises(ValueError, match="different config.*batch_size"):
        P.Pretrainer(P.PretrainConfig.fast(see_steps=4, read_steps=2, answer_steps=4, checkpoint_every=2,
                                           batch_size=5), work, progress=False)


def test_batches_are_fresh_and_replay_by_index():
    """Every batch is new (no corpus to memorise), and batch i is the same whenever it is drawn (exact resume)."""
    cfg = P.PretrainConfig.fast(see_batch_size=5)
    a, b = P.FreshBatches("see", cfg).batch(3), P.FreshBatches("see", cfg, start=3).batch(3)
    assert [x["sample"] for x in a] == [x["sample"] for x in b]
    assert all((i1 == i2).all() for x, y in zip(a, b) for i1, i2 in zip(x["images"], y["images"]))
    c = P.FreshBatches("see", cfg).batch(4)
    assert not {x["sample"].question + x["sample"].answer + str(x["sample"].board) for x in a} & \
        {x["sample"].question + x["sample"].answer + str(x["sample"].board) for x in c if x["sample"].board}
    with pytest.raises(ValueError, match="phase"):
        P.FreshBatches("listen", cfg)


def test_see_weights_choose_what_a_see_batch_shows():
    """``see_weights`` overrides the *see* mix: boards only, or the default's boards and tables."""
    boards_only = P.FreshBatches("see", P.PretrainConfig.fast(see_batch_size=6, see_weights="cards=0,objects=0"))
    assert {x["sample"].kind for x in boards_only.batch(0)} == {"ocr"}
    default = P.FreshBatches("see", P.PretrainConfig.fast(see_batch_size=12))
    assert {x["sample"].kind for x in default.batch(0)} - {"ocr"}  # tables too


def test_conversation_batches_carry_several_answers_per_rendered_scene():
    from workbench.vlm.processing import build_processor, tokenizer_texts

    proc = build_processor(tokenizer_texts(300), vocab_size=500)
    end = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = {turns: [int((it["labels"] == end).sum()) for it in
                       P.FreshBatches("scenes", P.PretrainConfig.fast(scenes_batch_size=12, text_batch=0, turns=turns),
                                      proc).batch(0)] for turns in (1, 3)}
    assert set(answers[1]) == {1}
    assert max(answers[3]) == 3 and sum(answers[3]) > 1.5 * len(answers[3])
    with pytest.raises(ValueError, match="turns"):
        P.PretrainConfig.fast(turns=0)


def test_a_scene_pool_asks_new_questions_about_scenes_rendered_once():
    """Pooled scenes (frozen-vision phases): a block's scenes are drawn from its seed, rendered once and asked about
    again with new questions; the next block has new scenes; boards are never pooled; the default (no pool) marks no
    scene."""
    from workbench.vlm.processing import build_processor, tokenizer_texts

    proc = build_processor(tokenizer_texts(300), vocab_size=500)
    cfg = P.PretrainConfig.fast(scenes_batch_size=12, text_batch=0, scene_pool=4, scene_refresh=2)
    data = P.FreshBatches("scenes", cfg, proc)
    a, b, c = data.batch(0), data.batch(1), data.batch(2)
    keys = [it["scene"] for it in a + b if it["scene"] is not None]
    assert len(keys) > len(set(keys)) and {k[0] for k in keys} == {0}  # scenes asked about again within a block
    again = {}
    for it in a + b:
        if it["scene"] is not None:
            again.setdefault(it["scene"], []).append(it)
    twice = next(its for its in again.values() if len(its) > 1)
    assert all((x == y).all() for x, y in zip(twice[0]["images"], twice[1]["images"]))  # one render
    assert {it["scene"][0] for it in c if it["scene"] is not None} == {1}
    assert all(it["sample"].kind in P.POOLED_KINDS for it in a + b + c if it["scene"] is not None)
    assert any(it["sample"].kind in ("ocr", "solve") for it in a + b + c)  # boards are asked about, always new
    assert all(s.kind in P.POOLED_KINDS for s in data.scenes(0))
    assert set(map(str, data.scenes(1))).isdisjoint(map(str, data.scenes(0)))
    replay = P.FreshBatches("scenes", cfg, proc, start=1).batch(1)  # a resumed run draws the same batch
    assert [it["sample"] for it in replay] == [it["sample"] for it in b]
    assert all(it["scene"] is None for it in P.FreshBatches("scenes", P.PretrainConfig.fast(text_batch=0),
                                                             proc).batch(0))
    with pytest.raises(ValueError, match="scene_pool"):
        P.PretrainConfig.fast(scene_pool=-1)


def test_training_figure_joins_a_continued_vlms_logs(tmp_path):
    """A continuation's log is drawn after the first run's: its steps and minutes follow on, the pause left out."""
    from workbench.viz import training_figure

    header = "time,phase,step,loss,lr,metric,value\n"
    (tmp_path / "a.csv").write_text(header + "0,see,1,3.0,0.1,,\n60,see,2,2.0,0.1,,\n60,eval,2,,,ocr,0.1\n")
    (tmp_path / "b.csv").write_text(header + "5000,scenes,1,1.0,0.1,,\n5120,scenes,2,0.5,0.1,,\n"
                                             "5120,eval,2,,,ocr,0.6\n")
    fig = training_figure(str(tmp_path / "a.csv"), str(tmp_path / "b.csv"))
    losses = {t.name: list(t.x) for t in fig.data if "loss" in t.name}
    assert losses == {"see loss (run 1)": [1, 2], "scenes loss (run 2)": [3, 4]}
    (ocr,) = [t for t in fig.data if t.name == "ocr"]
    assert list(ocr.x) == [1.0, 3.0] and list(ocr.y) == [0.1, 0.6]
    with pytest.raises(ValueError, match="at least one"):
        training_figure()


def test_cli_fast_run(tmp_path, capsys):
    from workbench import train

    train.main(["vlm", "--fast", "--see-steps", "2", "--answer-steps", "2",
                "--work", str(tmp_path / "w"), "--out", str(tmp_path / "vlm")])
    assert "OCR exact match" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "vlm" / "model.safetensors")
    summary = json.load(open(tmp_path / "w" / "summary.json"))
    assert summary["config"]["see_steps"] == 2


def test_continuing_a_saved_vlm_runs_only_the_chosen_phases(tmp_path, root):
    """``init`` + ``phases``: a saved VLM continues with some phases (how the *where* continuation of
    docs/vlm_experiments.md ran); the probe's *where* term trains the vision side in *see* and *scenes* leaves it
    frozen."""
    from safetensors.torch import load_file

    shipped = os.path.join(root, "data_samples", "vlm")
    cfg = P.PretrainConfig.fast(init=shipped, phases="see,scenes", see_steps=2, scenes_steps=2, where_coef=1.0)
    P.Pretrainer(cfg, str(tmp_path / "b"), progress=False).run()
    rows = open(tmp_path / "b" / "log.csv").read().splitlines()
    assert [sum(f",{p}," in r for r in rows) for p in P.PHASES] == [2, 0, 0, 2]
    # the end of *see* reads held-out boards with the dense probe (logged as eval rows at its last step)
    assert [r.split(",")[5] for r in rows if r.split(",")[1:3] == ["eval", "2"]] == [
        "see_token_reading", "see_char_reading", "see_board_reading"]
    before = load_file(os.path.join(shipped, "model.safetensors"))
    after_see, after_scenes = (load_file(str(tmp_path / "b" / "checkpoints" / f"step-00000{n}" / "vlm" /
                                              "model.safetensors")) for n in (2, 4))
    vision = [k for k in before if k.startswith("visual.")]
    assert not all(torch.equal(before[k], after_see[k]) for k in vision)
    assert all(torch.equal(after_see[k], after_scenes[k]) for k in vision)


def test_keep_term_holds_the_vision_features_near_inits(tmp_path, root):
    """With the *where* term on, eight *see* steps move the features of a continued VLM far from init's (relative
    mean squared change ~2.5, measured on the VLM shipped before the *where* continuation); the *keep* term holds
    them near (~0.16 with ``keep_coef=20``)."""
    from workbench.vlm.api import load_vlm, vision_tokens

    shipped = os.path.join(root, "data_samples", "vlm")
    reference, processor = load_vlm(shipped)
    change = {}
    for keep in (0.0, 20.0):
        cfg = P.PretrainConfig.fast(init=shipped, phases="see", see_steps=8, see_lr=3e-3, where_coef=1.0,
                                    keep_coef=keep)
        P.Pretrainer(cfg, str(tmp_path / str(keep)), progress=False).run()
        model, _ = load_vlm(str(tmp_path / str(keep) / "checkpoints" / "step-000008" / "vlm"))
        images = [im for it in next(iter(P.FreshBatches("see", cfg, None))) for im in it["images"]]
        with torch.no_grad():
            after, _ = vision_tokens(model.model.visual, processor.image_processor, images)
            before, _ = vision_tokens(reference.model.visual, processor.image_processor, images)
        change[keep] = float((after - before).pow(2).mean() / before.pow(2).mean())
    assert change[20.0] < 0.25 * change[0.0], change


def test_keep_term_on_tables_leaves_the_boards_free(tmp_path, root):
    """``keep_on="tables"``: the *keep* term counts only the table images' change, so the boards can learn to read
    better while what the language side reads on the tables stays put."""
    from workbench.vlm.api import load_vlm, vision_tokens

    shipped = os.path.join(root, "data_samples", "vlm")
    reference = load_vlm(shipped)[0].model.visual.eval()
    cfg = P.PretrainConfig.fast(init=shipped, phases="see", keep_coef=1.0, keep_on="tables")
    trainer = P.Pretrainer(cfg, str(tmp_path), progress=False)
    items = next(iter(P.FreshBatches("see", cfg, None)))
    views = [v for it in items for v in it["sample"].views]
    assert {"board", "table"} <= set(views)
    processor = load_vlm(shipped)[1]
    with torch.no_grad():
        feats, per_image = vision_tokens(reference, processor.image_processor,
                                         [im for it in items for im in it["images"]])
    moved = {view: torch.cat([f + (v == view) for f, v in zip(feats.split(per_image), views)]) for view in views}
    assert float(trainer._keep_loss(reference, processor, items, moved["board"], per_image)) < 1e-6
    assert float(trainer._keep_loss(reference, processor, items, moved["table"], per_image)) > 0.01


def _binding_on(model, processor, items) -> float:
    """The binding term of ``model`` on a fixed batch of talk items."""
    from workbench.vlm.api import collate, vision_tokens

    model.set_attn_implementation("eager")
    with torch.no_grad():
        feats, per_image = vision_tokens(model.model.visual, processor.image_processor,
                                         [im for it in items for im in it["images"]])
        for it, f in zip(items, feats.split(per_image)):
            it["feats"] = [f]
        batch = collate(items, processor.tokenizer.pad_token_id)
        out = model(**batch, output_attentions=True)
    marks = (*processor.tokenizer.convert_tokens_to_ids(["<|box_start|>", "<|box_end|>"]), model.config.image_token_id)
    boxes = list(P.grounded_boxes(batch["input_ids"], items, *marks))
    def eager_rows(layer, b, start, end):
        return out.attentions[layer + 1][b, P.BIND_HEAD, start:end, :end]

    eager = float(P.binding_loss(eager_rows, boxes, len(out.attentions) - 1))
    model.set_attn_implementation("sdpa")
    with torch.no_grad(), P.HeadAttention(model) as tap:  # the trainer's way: the same weights, recomputed
        model(**batch)
        tapped = float(P.binding_loss(tap.rows, boxes, len(tap.attention)))
    assert abs(tapped - eager) < 1e-4, (tapped, eager)
    return tapped


def test_binding_term_teaches_a_head_to_look_at_the_named_object(tmp_path, root, monkeypatch):
    """Six *scenes* steps with ``bind_coef`` on lower the binding term on other tables by more than a nat; the
    trainer's tap computes the weights the eager kernel returns. The shipped model was trained with the term on head
    0, so the test teaches head 3, which it never taught (measured: 7.5 nats before, 2.9 after)."""
    from workbench.vlm.api import load_vlm

    monkeypatch.setattr(P, "BIND_HEAD", 3)

    shipped = os.path.join(root, "data_samples", "vlm")
    cfg = P.PretrainConfig.fast(init=shipped, phases="scenes", scenes_steps=6, scenes_batch_size=8, turns=4,
                                scenes_lr=3e-3, bind_coef=1.0)
    P.Pretrainer(cfg, str(tmp_path), progress=False).run()
    logged = [r.split(",") for r in open(tmp_path / "log.csv").read().splitlines()[1:]]
    assert all(r[5] == "bind" for r in logged)
    model, processor = load_vlm(shipped)
    items = [it for it in P.FreshBatches("scenes", dataclasses.replace(cfg, seed=99, turns=1), processor).batch(0)
             if it["images"]]
    items = [it for it in items if it["sample"].kind in P.GROUNDED_KINDS]
    assert items
    before = _binding_on(model, processor, items)
    trained, _ = load_vlm(str(tmp_path / "checkpoints" / "step-000006" / "vlm"))
    after = _binding_on(trained, processor, items)
    assert after < before - 1.0, (before, after)


def test_pooled_scenes_get_their_vision_tokens_computed_once(tmp_path, root, monkeypatch):
    seen, computed = [], []
    real = P.vision_tokens

    def counting(visual, image_processor, images):
        computed.append(len(images))
        return real(visual, image_processor, images)

    monkeypatch.setattr(P, "vision_tokens", counting)
    cfg = P.PretrainConfig.fast(init=os.path.join(root, "data_samples", "vlm"), phases="scenes", scenes_steps=4,
                                scenes_batch_size=6, text_batch=0, scene_pool=3, scene_refresh=4,
                                workers=1)  # through a DataLoader worker, as real runs do
    real_collate = P.collate
    monkeypatch.setattr(P, "collate", lambda items, pad: seen.append(items) or real_collate(items, pad))
    P.Pretrainer(cfg, str(tmp_path), progress=False).run()
    items = [it for batch in seen for it in batch]
    assert all(it["feats"][0].shape[-1] == 128 for it in items)
    fresh = sum(len(it["images"]) for it in items if it["scene"] is None)
    pooled = {it["scene"] for it in items if it["scene"] is not None}
    assert sum(computed) <= fresh + len(pooled) < sum(len(it["images"]) for it in items)


@pytest.mark.parametrize("bad, message", [({"phases": "read"}, "need init"),
                                          ({"phases": "scenes,see"}, "in that order"),
                                          ({"phases": "see,look"}, "distinct names"),
                                          ({"init": "/nonexistent"}, "not a saved VLM"),
                                          ({"where_coef": 2.0}, "where"),
                                          ({"keep_coef": -1.0, "init": "data_samples/vlm"}, "keep_coef"),
                                          ({"keep_coef": 1.0}, "needs init"),
                                          ({"bind_coef": -0.5}, "bind_coef"),
                                          ({"scenes_weights": "ocr=2,look=1"}, "scenes_weights"),
                                          ({"scenes_weights": "ocr=-1"}, "scenes_weights"),
                                          ({"see_weights": "solve=2"}, "see_weights.*'ocr', 'cards', 'objects'"),
                                          ({"see_weights": "ocr=0,cards=0,objects=0"}, "see_weights")])
def test_phase_selection_is_validated(bad, message):
    with pytest.raises(ValueError, match=message):
        P.PretrainConfig(**bad)


def test_where_term_is_low_only_when_features_say_where_they_are():
    """The *where* term can be driven to ~0 by features that encode each token's row and column, not by features
    that are the same everywhere (then it stays at log(rows) + log(cols)); grids larger than it labels are refused."""
    import math

    rows, cols = 3, 4
    informative = torch.cat([torch.eye(rows).repeat_interleave(cols, 0), torch.eye(cols).repeat(rows, 1)], 1)
    for feats, low in ((informative, True), (torch.ones(rows * cols, rows + cols), False)):
        head = torch.nn.Module()
        head.MAX_GRID = P.ReadingHead.MAX_GRID
        head.where = torch.nn.Linear(rows + cols, 2 * P.ReadingHead.MAX_GRID)
        opt = torch.optim.Adam(head.where.parameters(), lr=0.1)
        for _ in range(200):
            opt.zero_grad()
            loss = P.ReadingHead.where_loss(head, feats, [(rows, cols)])
            loss.backward()
            opt.step()
        assert (loss.item() < 0.05) if low else (loss.item() > math.log(rows) + math.log(cols) - 0.05)
    with pytest.raises(ValueError, match="exceed"):
        P.ReadingHead.where_loss(head, torch.zeros(80, rows + cols), [(2, 40)])


def test_frozen_probe_reads_a_saved_vlm_without_changing_it(root, monkeypatch):
    """``probe_reading(init=..., frozen=True)`` trains only the probe on a saved VLM's vision tokens: the tokens stay
    as they were, and the result says what was probed."""
    from workbench.vlm import api, probe

    shipped = os.path.join(root, "data_samples", "vlm")
    model, processor = api.load_vlm(shipped)
    before = {k: v.clone() for k, v in model.model.visual.state_dict().items()}
    monkeypatch.setattr(api, "load_vlm", lambda path: (model, processor))
    result = probe.probe_reading(minutes=0.05, batch=4, eval_boards=4, evals=1, init=shipped, frozen=True,
                                 progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.model.visual.state_dict().items())
    assert result["config"]["init"] == shipped and result["config"]["frozen"] and result["curve"][-1]["step"] >= 1
    assert 0 <= result["final"]["char_accuracy"] <= 1
