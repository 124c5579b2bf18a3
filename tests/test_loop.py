"""Training-loop infrastructure: logger + curves, atomic/verified checkpoints, `mlpo train` CLI, policy_update."""

import copy
import json
import random

import numpy as np
import pytest
import torch

from mlpo_agents.trainers.loop import Checkpointer, CheckpointError, TrainLogger, config_from_args, rng_state
from mlpo_agents.trainers.lora import LoraSettings, attach_lora
from mlpo_agents.trainers.update import policy_update


def small_lora(seed=0):
    torch.manual_seed(seed)
    model = attach_lora("tiny-test", LoraSettings(r=4, alpha=8))
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def synthetic_batch():
    from tests.ddp_update_script import synthetic_batch as make

    return make()


def lora_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_logger_writes_jsonl_tensorboard_and_curves(tmp_path):
    logger = TrainLogger(tmp_path, {"lr": 1e-4})
    for step in range(1, 4):
        logger.log(step, {"reward/mean": step / 4, "loss": 0.1, "version": f"step-{step}"})
    logger.log(3, {"eval/team_accuracy": 0.5})
    plot = logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 3] and rows[0]["version"] == "step-1"
    assert plot is not None and plot.stat().st_size > 0
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 1e-4}
    resumed = TrainLogger(tmp_path, resume=True)
    resumed.truncate(2)
    assert [r["step"] for r in resumed.history] == [1, 2]
    resumed.close()


def test_checkpoint_roundtrip_restores_adapter_optimizer_and_rng(tmp_path):
    model, optimizer = small_lora()
    policy_update(model, optimizer, synthetic_batch(), micro_batch_size=3, aggregation="token")
    checkpointer = Checkpointer(tmp_path, every=1)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    folder = checkpointer.save(
        3, model=model, optimizer=optimizer, state={"cursor": 12}, base_model="tiny-test"
    )
    ckpt = checkpointer.latest()
    assert ckpt.folder == folder and ckpt.step == 3 and ckpt.state == {"cursor": 12}
    assert (ckpt.adapter / "adapter_config.json").is_file()
    assert ckpt.optimizer_state()["state"], "optimizer moments are saved"
    random.seed(0)
    from mlpo_agents.trainers.loop import set_rng_state

    set_rng_state(ckpt.rng())
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert set(rng_state()) == {"python", "numpy", "torch"}


def test_corrupted_checkpoint_is_a_clear_error_and_the_previous_one_stays(tmp_path):
    model, optimizer = small_lora()
    checkpointer = Checkpointer(tmp_path, every=2, keep=3)
    good = checkpointer.save(2, model=model, optimizer=optimizer, state={}, base_model="tiny-test")
    bad = checkpointer.save(4, model=model, optimizer=optimizer, state={}, base_model="tiny-test")
    (tmp_path / "checkpoints" / ".step-000006.tmp-crashed").mkdir()  # a crash mid-save: ignored
    with open(bad / "optimizer.pt", "r+b") as f:
        f.truncate(10)
    with pytest.raises(
        CheckpointError, match=r"step-000004 is corrupted \(optimizer.pt does not match.*step-000002"
    ):
        checkpointer.latest()
    assert checkpointer.load(good).step == 2
    (bad / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="adapter/adapter_model.safetensors is missing"):
        checkpointer.load(bad)


def test_checkpointer_keeps_the_last_n(tmp_path):
    model, optimizer = small_lora()
    checkpointer = Checkpointer(tmp_path, every=1, keep=2)
    for step in (1, 2, 3):
        checkpointer.save(step, model=model, optimizer=optimizer, state={}, base_model="tiny-test")
    assert [p.name for p in checkpointer.complete()] == ["step-000002", "step-000003"]
    assert checkpointer.due(4) and not Checkpointer(tmp_path, every=0).due(4)


@pytest.mark.parametrize("aggregation", ["token", "sequence", "dr_grpo"])
def test_micro_batches_accumulate_to_the_full_batch_gradient(aggregation):
    results = []
    for micro in (6, 4, 1):
        model, optimizer = small_lora()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        metrics = policy_update(
            model,
            optimizer,
            synthetic_batch(),
            micro_batch_size=micro,
            max_grad_norm=None,
            aggregation=aggregation,
            max_tokens=8,
        )
        results.append((lora_state(model), metrics))
    (full, m_full), *others = results
    for weights, metrics in others:
        for key in full:
            torch.testing.assert_close(weights[key], full[key], rtol=1e-4, atol=1e-6)
        assert metrics["loss"] == pytest.approx(m_full["loss"], rel=1e-4, abs=1e-6)
    assert m_full["trained_tokens"] == 6 * 7 and m_full["tokens_per_s"] > 0
    assert any((v != 0).any() for k, v in full.items() if "lora_B" in k), "the step changed the adapter"


@pytest.mark.parametrize("loss", ["grpo", "magrpo"])
def test_rows_with_zero_advantage_are_not_forwarded_and_the_step_is_unchanged(loss):
    """A group whose samples all scored the same has advantage 0: no forward for it, the same update."""
    from mlpo_agents.trainers.update import LOSSES

    def as_custom(logp, mb, ref_logp=None, **kw):  # a callable loss is never skipped: the reference path
        return LOSSES[loss](logp, mb, ref_logp=ref_logp, **kw)

    batch = synthetic_batch()
    batch.advantages[:4] = 0.0  # two of three groups of 2 scored alike
    results = []
    for fn in (loss, as_custom):
        model, optimizer = small_lora()
        seen: list[int] = []
        model.register_forward_pre_hook(lambda _m, _a, kw, seen=seen: seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
        metrics = policy_update(model, optimizer, batch, loss=fn, micro_batch_size=2, aggregation="token")
        results.append((lora_state(model), metrics, sum(seen)))
    (skipped, m_skipped, rows_skipped), (full, m_full, rows_full) = results
    assert rows_skipped == 2 and rows_full == 6
    for key in full:
        torch.testing.assert_close(skipped[key], full[key], rtol=1e-5, atol=1e-7)
    assert m_skipped["loss"] == pytest.approx(m_full["loss"], rel=1e-5, abs=1e-7)
    assert m_skipped["trained_tokens"] == 2 * 7


def test_a_batch_with_no_advantage_takes_no_step_and_no_forward():
    batch = synthetic_batch()
    batch.advantages[:] = 0.0
    model, optimizer = small_lora()
    policy_update(model, optimizer, synthetic_batch(), micro_batch_size=3, aggregation="token")  # Adam moments
    before, moments = lora_state(model), copy.deepcopy(optimizer.state_dict())
    seen = []
    model.register_forward_pre_hook(lambda *_: seen.append(1))
    metrics = policy_update(model, optimizer, batch, micro_batch_size=3, aggregation="token")
    assert not seen and metrics["update_skipped"] == 1.0 and metrics["trained_tokens"] == 0
    assert all(torch.equal(before[k], v) for k, v in lora_state(model).items()), "momentum must not move the weights"
    for was, now in zip(moments["state"].values(), optimizer.state_dict()["state"].values(), strict=True):
        assert all(torch.equal(was[k], now[k]) for k in was), "Adam's moments and step count stay as they were"


def test_magrpo_and_callable_losses():
    model, optimizer = small_lora()
    metrics = policy_update(model, optimizer, synthetic_batch(), loss="magrpo", micro_batch_size=2)
    assert "mean_seq_logp" in metrics

    def zero_loss(logp, mb, ref_logp=None):
        return (logp * 0).sum(), {"custom": 1.0}

    assert policy_update(model, optimizer, synthetic_batch(), loss=zero_loss)["custom"] == pytest.approx(1.0)


def test_kl_to_the_adapter_free_reference():
    model, optimizer = small_lora()
    policy_update(model, optimizer, synthetic_batch(), aggregation="token")
    metrics = policy_update(model, optimizer, synthetic_batch(), aggregation="token", kl_coef=0.1)
    assert metrics["ref_kl"] > 0


def _args(argv):
    from mlpo_agents.cli import build_parser

    return build_parser().parse_args(["train", *argv])


def test_cli_flags_map_onto_the_config():
    args = _args(
        [
            "--algo",
            "mlpo",
            "--team",
            "tiny",
            "--steps",
            "3",
            "--group-size",
            "3",
            "--questions-per-step",
            "2",
            "--lr",
            "0.001",
            "--out",
            "runs/x",
            "--seed",
            "7",
            "--save-every",
            "2",
            "--resume",
            "--set",
            "clip_eps=0.1",
            "--set",
            'task_options={"subset": "easy"}',
        ]
    )
    config = config_from_args(args)
    assert (config.team, config.steps, config.group_size, config.questions_per_step) == ("tiny", 3, 3, 2)
    assert (config.lr, config.out, config.seed, config.save_every, config.resume) == (
        0.001,
        "runs/x",
        7,
        2,
        True,
    )
    assert config.clip_eps == 0.1 and config.task_options == {"subset": "easy"}
    with pytest.raises(ValueError, match="no field.*'nonsense'"):
        config_from_args(_args(["--set", "nonsense=1"]))
    with pytest.raises(ValueError, match="group_size=1"):
        config_from_args(_args(["--group-size", "1"]))


def test_mlpo_help_lists_train(capsys):
    from mlpo_agents.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--algo",
        "--team",
        "--task",
        "--steps",
        "--group-size",
        "--questions-per-step",
        "--lr",
        "--out",
        "--resume",
        "--seed",
        "--save-every",
        "--offline",
        "--traces",
    ):
        assert flag in text


def test_mlpo_train_reports_magrpo_agents_that_never_updated():
    from mlpo_agents.trainers.loop import update_report

    history = [
        {"step": 0, "eval/team_accuracy": 0.1},
        {"step": 1, "drafter/loss": 0.2, "solver/loss": 0.0, "solver/update_skipped": 1.0},
        {"step": 2, "drafter/loss": 0.0, "drafter/update_skipped": 1.0, "solver/loss": 0.0, "solver/update_skipped": 1.0},
    ]
    updates, warning = update_report(history, 2, per_role=True)
    assert updates == {"drafter": 1, "solver": 0}
    assert warning is not None and warning.startswith("no update was made for solver:")
    both = {"step": 2, "drafter/loss": 0.1, "solver/loss": 0.1}
    assert str(update_report(history[:2] + [both], 2, per_role=True)[1]).startswith("1 of 2 steps made an update for solver;")
    one = [{"step": 1, "loss": 0.3}, {"step": 2, "loss": 0.0, "update_skipped": 1.0}]
    assert update_report(one, 2) == (1, "1 of 2 steps made an update; the others had equal rewards in every group "
                                        "(no learning signal)")  # fmt: skip
