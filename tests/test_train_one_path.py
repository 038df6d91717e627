"""One training path: the trainer holds a :class:`~sapwood.train.parallel.ParallelModel` on every
layout (one process included), compiles per block in one place, steps a pipeline with the task's own
loss, and scales fp16 losses under pipeline parallelism before the GradScaler unscales them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sapwood.config import Config, validate
from sapwood.errors import ConfigError
from sapwood.train.loop import Trainer
from sapwood.train.parallel import ParallelModel, apply_training_parallelism, is_compiled
from sapwood.train.task import PipelinedTask, build_task

MODEL = {
    "vocab_size": 320, "hidden": 32, "layers": 3, "heads": 4, "kv_heads": 2, "ffn": 64, "trained_context": 16,
}
WORKERS = Path(__file__).parent / "train_workers"

pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(tokens_dir, out_dir, parallel=None, **train) -> Config:
    settings = {
        "steps": 2, "batch_size": 4, "micro_batch_size": 2, "eval_every": 2, "eval_batches": 1,
        "save_every": 1000, "log_every": 1, "device": "cpu", "out_dir": str(out_dir), "progress": False,
    }
    settings.update(train)
    raw = {"model": dict(MODEL), "train": settings, "data": {"path": str(tokens_dir)}}
    if parallel:
        raw["parallel"] = parallel
    return validate(Config, raw)


def test_one_process_trainer_holds_a_parallel_model_compiled_per_block(tokens_dir, tmp_path):
    trainer = Trainer(make_config(tokens_dir, tmp_path, compile=True, activation_checkpointing="every_layer"))
    assert isinstance(trainer.parallel, ParallelModel) and not trainer.parallel.pipelined
    assert trainer.model is trainer.parallel.model and not hasattr(trainer.model, "pipeline")
    assert not is_compiled(trainer.model)  # one strategy: blocks, never the whole model
    assert all(is_compiled(block) for block in trainer.model.layers.values())


def test_evaluation_calls_the_parallel_model_like_the_model(tokens_dir, tmp_path):
    trainer = Trainer(make_config(tokens_dir, tmp_path))
    tokens = torch.randint(0, MODEL["vocab_size"], (1, 8))
    with torch.no_grad():
        assert torch.equal(trainer.parallel(tokens), trainer.model(tokens))
    assert trainer.parallel.get_buffer("inv_freq") is trainer.model.inv_freq
    assert set(trainer.evaluate()) == {"val_loss", "val_perplexity", "val_accuracy"}


def test_blocks_compiled_with_checkpointing_share_one_graph():
    """Per-block compile over activation-checkpointed blocks traces one frame for all of them (no
    recompilation per block, which would hit dynamo's cache limit at 8 blocks on a 56-layer model)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from sapwood.model.transformer import Decoder
    from sapwood.train.activation import apply_activation_checkpointing
    from sapwood.train.parallel import apply_compile

    cfg = validate(Config, {"model": dict(MODEL, layers=4)}).model
    torch.manual_seed(0)
    eager, compiled = Decoder(cfg), Decoder(cfg)
    compiled.load_state_dict(eager.state_dict())
    for model in (eager, compiled):
        apply_activation_checkpointing(model, "every_layer")
    torch._dynamo.reset()
    counters.clear()
    assert len(apply_compile(compiled, backend="eager")) == 4
    tokens = torch.randint(0, MODEL["vocab_size"], (2, 16))
    for _ in range(2):
        loss_eager, loss_compiled = eager(tokens).square().mean(), compiled(tokens).square().mean()
        loss_eager.backward()
        loss_compiled.backward()
        assert torch.allclose(loss_eager, loss_compiled)
    assert counters["frames"]["total"] == 1 and counters["stats"]["unique_graphs"] == 1
    grads = [(a.grad, b.grad) for a, b in zip(eager.parameters(), compiled.parameters(), strict=True)]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in grads)
    torch._dynamo.reset()


def test_growth_compiles_the_blocks_it_adds(tokens_dir, tmp_path):
    from sapwood.model.transformer import Block

    trainer = Trainer(make_config(tokens_dir, tmp_path, compile=True))
    trainer.model.layers["3"] = Block(trainer.model.cfg)
    assert not is_compiled(trainer.model.layers["3"])
    trainer.model_changed()
    assert is_compiled(trainer.model.layers["3"])


def test_text_task_loss_is_its_output_loss(tokens_dir, tmp_path):
    config = make_config(tokens_dir, tmp_path)
    task = build_task(config)
    assert isinstance(task, PipelinedTask)
    torch.manual_seed(0)
    from sapwood.model import build_model

    model = build_model(config)
    batch = next(task.train_batches(2))
    inputs, targets = task.split_batch(batch)
    loss, _ = task.loss(model, batch)
    assert torch.equal(loss, task.output_loss(model(inputs), targets))


def test_pipeline_needs_a_task_with_an_output_loss(tokens_dir, tmp_path):
    config = make_config(tokens_dir, tmp_path, parallel={"pp": 2})
    with torch.device("meta"):
        model = build_task(config).build_model(config)
    with pytest.raises(ConfigError) as info:
        apply_training_parallelism(model, config, torch.device("cpu"), loss_fn=None)
    message = str(info.value)
    assert "parallel.pp=2" in message and "output_loss" in message and "\n" not in message


@pytest.mark.distributed
@pytest.mark.slow
def test_fp16_pipeline_scales_the_loss_before_unscaling(tokens_dir, tmp_path):
    """pp=2 under torchrun, fp32 and fp16: the fp16 run's gradient norm (logged after ``unscale_``)
    equals the fp32 run's; were the schedule's loss not multiplied by the loss scale, ``unscale_``
    would divide true gradients by 65536 and the norm would be 65536x smaller."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent.parent))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(WORKERS / "pipeline_fp16.py"), str(tokens_dir), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    fp32 = json.loads((tmp_path / "pp_fp32.json").read_text())
    fp16 = json.loads((tmp_path / "pp_fp16.json").read_text())
    assert fp32["pipelined"] and fp16["pipelined"]
    assert len(fp32["train"]) == len(fp16["train"]) == 3
    for a, b in zip(fp32["train"], fp16["train"], strict=True):
        assert b["scale"] >= 2.0**15 and b["overflow"] is False
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=0.05)
        assert b["loss"] == pytest.approx(a["loss"], rel=0.02)
    assert fp16["val_loss"] == pytest.approx(fp32["val_loss"], rel=0.02)
