"""Memory-lean training options of ``train:``: chunked cross-entropy, 8-bit AdamW states (torchao),
pure bf16 with stochastic rounding, the optimizer step fused into backward. Each really trains, and
keeps the memory property it exists for."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sapwood.config import Config, validate
from sapwood.errors import ConfigError
from sapwood.train.chunked_loss import chunked_cross_entropy
from sapwood.train.loop import Trainer
from sapwood.train.metrics import read_events
from sapwood.train.optim import OptimizerInBackward

# hidden 64: the attention and FFN matrices have >= 4096 elements, so torchao quantizes their states.
MODEL = {
    "vocab_size": 320, "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 128,
    "trained_context": 32,
}
STEPS = 40
# Loss of each option at the end of STEPS steps vs plain AdamW (fp32). At 300 steps every option
# lands within 1.4% of plain AdamW (`python scripts/memory_parity.py --steps 300`); 3% over 40 steps
# catches a broken option (a run that does not learn stays ~5% above plain AdamW's loss here).
PARITY = 0.03


pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(tokens_dir, out_dir, **train) -> Config:
    settings = {"steps": STEPS, "batch_size": 8, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 4,
                "eval_every": 1000, "eval_batches": 2, "save_every": 1000, "log_every": 1, "device": "cpu",
                "out_dir": str(out_dir), "progress": False}
    settings.update(train)
    return validate(Config, {"model": dict(MODEL), "train": settings, "data": {"path": str(tokens_dir)}})


def train_losses(config: Config) -> list[float]:
    Trainer(config).fit()
    return [r["loss"] for r in read_events(config.train.out_dir + "/metrics.jsonl", "train")]


def tail_mean(losses: list[float], n: int = 5) -> float:
    return sum(losses[-n:]) / n


@pytest.fixture(scope="module")
def plain(tokens_dir, tmp_path_factory) -> list[float]:
    return train_losses(make_config(tokens_dir, tmp_path_factory.mktemp("plain")))


# --- chunked cross-entropy ------------------------------------------------------------------------


def _largest_saved(fn) -> int:
    """Elements of the largest tensor autograd saves for backward while ``fn`` runs forward."""
    largest = 0

    def pack(tensor):
        nonlocal largest
        largest = max(largest, tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return largest, out


def test_chunked_cross_entropy_equals_full_and_never_saves_full_logits():
    torch.manual_seed(0)
    tokens, hidden, vocab, chunk = 96, 16, 200, 32
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden, requires_grad=True)
    t = torch.randint(0, vocab, (tokens,))
    full_saved, full = _largest_saved(lambda: F.cross_entropy(F.linear(h, w).float(), t))
    grads_full = torch.autograd.grad(full, (h, w))
    chunked_saved, chunked = _largest_saved(lambda: chunked_cross_entropy(h, w, t, chunk))
    grads_chunked = torch.autograd.grad(chunked, (h, w))
    assert torch.allclose(chunked, full, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_chunked, grads_full, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert full_saved >= tokens * vocab  # the plain loss keeps the whole [tokens x vocab] logits
    assert chunked_saved < tokens * vocab and chunked_saved <= max(chunk * hidden, vocab * hidden)


def test_chunked_loss_trains_like_the_full_loss(tokens_dir, tmp_path, plain):
    losses = train_losses(make_config(tokens_dir, tmp_path, loss_chunk=24))
    assert losses == pytest.approx(plain, rel=1e-4)


# --- 8-bit AdamW, pure bf16, fused into backward ---------------------------------------------------


def test_adamw8bit_keeps_uint8_moments_and_learns_like_adamw(tokens_dir, tmp_path, plain):
    config = make_config(tokens_dir, tmp_path, optimizer="adamw8bit")
    trainer = Trainer(config)
    trainer.fit()
    losses = [r["loss"] for r in read_events(tmp_path / "metrics.jsonl", "train")]
    w1 = trainer.model.layers["0"].feed_forward.w1.weight
    moment = trainer.optimizer.state[w1]["exp_avg"]
    assert moment.codes.dtype == torch.uint8 and moment.codes.numel() == w1.numel()
    assert moment.scale.numel() == w1.numel() // 256  # one fp32 scale per block of 256
    assert tail_mean(losses) == pytest.approx(tail_mean(plain), rel=PARITY)
    assert tail_mean(losses) < losses[0] - 0.5


def test_pure_bf16_holds_bf16_weights_and_learns_like_fp32(tokens_dir, tmp_path, plain):
    config = make_config(tokens_dir, tmp_path, precision="bf16-pure")
    trainer = Trainer(config)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    assert trainer.model.inv_freq.dtype == torch.float32  # rotary frequencies are buffers and stay fp32
    trainer.fit()
    losses = [r["loss"] for r in read_events(tmp_path / "metrics.jsonl", "train")]
    assert tail_mean(losses) == pytest.approx(tail_mean(plain), rel=PARITY)


def test_stochastic_rounding_moves_a_weight_by_updates_below_bf16_spacing():
    from sapwood.train.optim import make_optimizer

    # Just below 1.0 bf16 has a spacing of 2**-8; an update of ~1e-4 rounded to nearest is lost every time.
    torch.manual_seed(0)
    moved = {}
    for precision in ("bf16", "bf16-pure"):  # plain AdamW on bf16 weights vs the stochastic-rounding update
        weights = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        optimizer = make_optimizer([{"params": [weights], "weight_decay": 0.0}], "adamw", precision,
                                   torch.device("cpu"), lr=1e-4, betas=(0.9, 0.95))
        for _ in range(50):
            weights.grad = torch.ones_like(weights)
            optimizer.step()
        moved[precision] = 1.0 - weights.float().mean().item()
    assert moved["bf16"] == 0.0
    assert moved["bf16-pure"] == pytest.approx(50 * 1e-4, rel=0.1)  # in expectation every update counts


def test_optimizer_in_backward_equals_adamw_with_accumulation(tokens_dir, tmp_path):
    expected = train_losses(make_config(tokens_dir, tmp_path / "a", steps=6, grad_clip=None))
    fused = train_losses(
        make_config(tokens_dir, tmp_path / "b", steps=6, grad_clip=None, optimizer_in_backward=True)
    )
    assert fused == pytest.approx(expected, rel=1e-5)


def record_live_gradients(trainer: Trainer) -> list[int]:
    """As each parameter's gradient completes (after the trainer's own hooks ran), how many
    parameters hold a gradient."""
    params = list(trainer.model.parameters())
    counts: list[int] = []
    for param in params:
        param.register_post_accumulate_grad_hook(
            lambda _: counts.append(sum(q.grad is not None for q in params))
        )
    return counts


def test_optimizer_in_backward_frees_each_gradient_as_it_steps(tokens_dir, tmp_path):
    """One micro-batch per step: when any parameter's gradient completes, no other gradient exists
    (those done earlier in backward were stepped and freed), so no full set of gradients is ever alive;
    plain AdamW holds all of them at the end of backward."""
    fused = Trainer(make_config(tokens_dir, tmp_path / "fused", steps=2, batch_size=4, grad_clip=None,
                                optimizer_in_backward=True))
    assert isinstance(fused.optimizer, OptimizerInBackward)
    fused_counts = record_live_gradients(fused)
    fused.fit()
    plain = Trainer(make_config(tokens_dir, tmp_path / "plain", steps=2, batch_size=4, grad_clip=None))
    plain_counts = record_live_gradients(plain)
    plain.fit()
    n_params = len(list(plain.model.parameters()))
    assert len(fused_counts) == 2 * n_params and max(fused_counts) == 0
    assert max(plain_counts) == n_params


def test_optimizer_in_backward_with_clipping_is_one_line_error(tokens_dir, tmp_path):
    with pytest.raises(ConfigError) as info:
        Trainer(make_config(tokens_dir, tmp_path, optimizer_in_backward=True, grad_clip=1.0))
    assert "grad_clip" in str(info.value) and "\n" not in str(info.value)


def test_memory_options_save_and_resume_exactly(tokens_dir, tmp_path):
    """8-bit states, bf16 weights and per-parameter optimizers go through the training checkpoint:
    resumed from its step-4 checkpoint, a run repeats its own steps 5..8 exactly."""
    import shutil

    options = {
        "optimizer": "adamw8bit", "precision": "bf16-pure", "optimizer_in_backward": True, "grad_clip": None,
    }
    config = make_config(tokens_dir, tmp_path, steps=8, save_every=4, **options)
    whole = train_losses(config)
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000008")
    Trainer(config, resume=True).fit()
    events = read_events(tmp_path / "metrics.jsonl", "train")
    assert [r["step"] for r in events[-4:]] == [5, 6, 7, 8]
    assert [r["loss"] for r in events[-4:]] == pytest.approx(whole[4:], rel=1e-6)


def test_tensorboard_option_writes_the_logged_scalars(tokens_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = make_config(tokens_dir, tmp_path, steps=3, eval_every=3, tensorboard=True)
    Trainer(config).fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = {r["step"]: r["loss"] for r in read_events(tmp_path / "metrics.jsonl", "train")}
    scalars = {e.step: e.value for e in events.Scalars("train/loss")}
    assert scalars == pytest.approx(logged, rel=1e-6) and sorted(scalars) == [1, 2, 3]
    assert [e.step for e in events.Scalars("eval/val_loss")] == [3]


@pytest.mark.parametrize("plan", [{"tp": 2}, {"pp": 2}])
def test_cube_surrogate_with_tensor_or_pipeline_parallel_is_one_line_error(tmp_path, plan):
    from sapwood.config import CubeModelConfig, ParallelConfig, TrainConfig

    config = Config(
        model=dict(MODEL, vocab_size=1), cube=CubeModelConfig(levels=3, lat=8, lon=16, patch=2),
        parallel=ParallelConfig(**plan), train=TrainConfig(task="cube", steps=1, out_dir=str(tmp_path)),
    )
    with pytest.raises(ConfigError) as info:
        Trainer(config)
    message = str(info.value)
    assert "cube surrogate" in message and "tp: 1 and pp: 1" in message and "\n" not in message
