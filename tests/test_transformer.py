import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ibq.engine.ar_schedule import ScheduleValues, apply_schedule, var_schedule
from ibq.errors import UserError
from ibq.models.transformer import Transformer, apply_rope, ffn_hidden_size, next_token_loss, rope_table

AR_SCALES = Path(__file__).resolve().parents[1] / "conf" / "model_scale"
PAPER_PARAMETERS = {"B": 343.0e6, "L": 649.6e6, "XL": 1.076e9, "XXL": 2.063e9}


def scale_kwargs(scale: str) -> dict:
    node = OmegaConf.to_container(OmegaConf.load(AR_SCALES / f"{scale}.yaml").transformer)
    assert node.pop("_target_") == "ibq.models.transformer.Transformer"
    return node


def small_model(**overrides) -> Transformer:
    """A few layers with visible gates and a random head, so every path changes the logits."""
    kwargs = dict(vocab_size=64, num_classes=5, block_size=16, depth=2, width=64, heads=2, alng=1.0,
                  class_dropout=0.0, embed_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    torch.manual_seed(0)
    model = Transformer(**{**kwargs, **overrides})
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


@pytest.mark.parametrize("scale", PAPER_PARAMETERS)
def test_parameter_counts_match_the_paper_scales(scale):
    kwargs = scale_kwargs(scale)
    assert kwargs["ffn_hidden"] == ffn_hidden_size(kwargs["width"])
    with torch.device("meta"):
        model = Transformer(**kwargs)
    total = model.parameter_counts()["total"]
    assert abs(total / PAPER_PARAMETERS[scale] - 1) < 0.01, total


def test_ffn_hidden_rule():
    assert [ffn_hidden_size(c) for c in (1024, 1280, 1536, 1920)] == [2816, 3584, 4096, 5120]


def test_fresh_model_predicts_uniformly():
    model = Transformer(**scale_kwargs("tiny")).eval()
    tokens = torch.randint(0, 1024, (2, 64))
    logits = model(tokens, torch.tensor([0, 17]))
    assert logits.shape == (2, 64, 1024)
    assert logits.abs().max() == 0  # zero-initialised head
    assert next_token_loss(logits, tokens).item() == pytest.approx(math.log(1024))


def test_logits_at_t_see_only_the_class_and_earlier_tokens():
    model = small_model().eval()
    tokens = torch.randint(0, 64, (2, 16))
    labels = torch.tensor([1, 3])
    t = 7
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 1) % 64
    before, after = model(tokens, labels), model(changed, labels)
    torch.testing.assert_close(before[:, : t + 1], after[:, : t + 1])
    assert (before[:, t + 1 :] - after[:, t + 1 :]).abs().amax(dim=-1).min() > 0
    assert (model(tokens, torch.tensor([2, 3]))[0] - before[0]).abs().amax(dim=-1).min() > 0  # the class reaches all positions


def test_cached_decoding_matches_teacher_forcing():
    model = small_model().eval()
    tokens = torch.randint(0, 64, (3, 16))
    labels = torch.tensor([0, 2, 4])
    model.setup_cache(batch=4)
    cached = [model.prefill(labels)] + [model.step(tokens[:, i], i) for i in range(15)]
    torch.testing.assert_close(torch.stack(cached, dim=1), model(tokens, labels), atol=1e-5, rtol=1e-5)
    # a given prefix enters the cache in one call
    torch.testing.assert_close(model.prefill(labels, tokens[:, :5]), model.next_token_logits(labels, tokens[:, :5]))
    torch.testing.assert_close(model.step(tokens[:, 5], 5), model.next_token_logits(labels, tokens[:, :6]), atol=1e-5, rtol=1e-5)
    model.reset_cache()
    with pytest.raises(RuntimeError, match="setup_cache"):
        model.prefill(labels)


def test_label_dropout_only_in_training():
    model = small_model(class_dropout=1.0)
    tokens = torch.randint(0, 64, (2, 16))
    labels = torch.tensor([1, 2])
    null = torch.full_like(labels, model.null_class)
    trained_view = model.train()(tokens, labels)
    model.eval()
    torch.testing.assert_close(trained_view, model(tokens, null))
    assert (model(tokens, labels) - trained_view).abs().max() > 1e-3


def test_2d_rope_depends_on_row_and_column_offsets_only():
    head_dim, side = 8, 4
    table = rope_table(side * side + 1, head_dim)[1:]  # grid positions, after the class token
    # The class token: zeroed as in the reference, or left unrotated on request.
    assert not rope_table(side * side, head_dim)[0].any()
    torch.testing.assert_close(rope_table(side * side, head_dim, class_token="identity")[0], torch.tensor([[1.0, 0.0]]).repeat(head_dim // 2, 1))
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(query_cell, key_cell):
        rq = apply_rope(q.view(1, 1, 1, -1), table[query_cell].unsqueeze(0))
        rk = apply_rope(k.view(1, 1, 1, -1), table[key_cell].unsqueeze(0))
        return (rq * rk).sum().item()

    cell = lambda row, col: row * side + col  # noqa: E731
    assert score(cell(2, 3), cell(1, 1)) == pytest.approx(score(cell(1, 2), cell(0, 0)), abs=1e-5)
    assert score(cell(2, 0), cell(0, 0)) != pytest.approx(score(cell(0, 2), cell(0, 0)), abs=1e-3)  # rows != columns


def test_bad_construction_and_overlong_input():
    with pytest.raises(UserError, match="transformer.heads"):
        Transformer(width=100, heads=3, depth=1)
    with pytest.raises(UserError, match="transformer.block_size"):
        Transformer(block_size=200, depth=1, width=64, heads=1)
    with pytest.raises(ValueError, match="block_size"):
        small_model()(torch.zeros(1, 17, dtype=torch.long), torch.zeros(1, dtype=torch.long))


SCHEDULE = dict(peak_lr=3e-4, warmup_steps=100, total_steps=1101, final_lr_ratio=0.1, weight_decay=0.05)


def test_var_schedule_lr():
    lr = lambda step, **kw: var_schedule(step, **{**SCHEDULE, **kw}).lr  # noqa: E731
    assert lr(0) == pytest.approx(0.005 * 3e-4)
    assert lr(50) == pytest.approx((0.005 + 0.995 * 0.5) * 3e-4)
    assert lr(100) == pytest.approx(3e-4)
    # flat for the first 5% of the 1000 post-warm-up intervals, then linear down to final_lr_ratio * peak
    assert lr(149) == pytest.approx(3e-4)
    assert lr(150) == pytest.approx(3e-4)
    assert lr(151) < 3e-4
    assert lr(600) == pytest.approx(3e-4 * (0.1 + 0.9 * 0.5 / 0.95))
    assert lr(1100) == pytest.approx(0.1 * 3e-4)
    assert lr(1100, final_lr_ratio=0.01) == pytest.approx(3e-6)


def test_var_schedule_weight_decay():
    wd = lambda step, **kw: var_schedule(step, **{**SCHEDULE, **kw}).weight_decay  # noqa: E731
    assert [wd(0), wd(550), wd(1100)] == pytest.approx([0.05] * 3)  # final_weight_decay 0: constant
    cosine = dict(final_weight_decay=0.08)
    assert wd(0, **cosine) == pytest.approx(0.05)
    assert wd(550, **cosine) == pytest.approx(0.065)
    assert wd(1100, **cosine) == pytest.approx(0.08)
    assert wd(275, **cosine) == pytest.approx(0.08 - 0.03 * (0.5 + 0.5 * math.cos(math.pi / 4)))


def test_apply_schedule_sets_every_group_or_only_decayed_ones():
    decayed, undecayed = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    for decay_all, expected in ((True, 0.07), (False, 0.0)):
        optimizer = torch.optim.AdamW(
            [{"params": [decayed], "weight_decay": 0.05}, {"params": [undecayed], "weight_decay": 0.0}], lr=1.0
        )
        for _ in range(2):
            apply_schedule(optimizer, ScheduleValues(lr=2e-4, weight_decay=0.07), decay_all_groups=decay_all)
        assert [g["lr"] for g in optimizer.param_groups] == [2e-4, 2e-4]
        assert [g["weight_decay"] for g in optimizer.param_groups] == [0.07, expected]


def test_var_schedule_rejects_a_warmup_as_long_as_training():
    with pytest.raises(UserError, match="warmup_steps"):
        var_schedule(0, **{**SCHEDULE, "warmup_steps": 1100})
