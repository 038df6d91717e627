"""The inference engine: exact greedy parity (naive loop, single vs batched, transformers), per-request
sampling, stop strings, cancellation, per-request context and the KV cache sized to need."""

from __future__ import annotations

import itertools

import pytest
import torch

from sapwood.config import ModelConfig
from sapwood.infer import (
    ContextLengthError,
    Engine,
    KVBudgetError,
    QueueFullError,
    SamplingParams,
    SchedulerConfig,
)
from sapwood.infer.request import Request
from sapwood.infer.sampling import apply_repetition_penalty, filter_top_k_top_p
from sapwood.infer.scheduler import prefill_groups
from sapwood.model.transformer import Decoder

SMALL = dict(
    vocab_size=128, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, trained_context=32, max_context=96,
    init_std=0.25,
)


def small_model(seed: int = 0, **overrides) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(ModelConfig(**{**SMALL, **overrides})).eval()


def naive_greedy(model: Decoder, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding by re-running the full sequence each step (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def random_prompts(count: int, vocab: int, seed: int = 1, longest: int = 24) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (count,), generator=g)
    return [torch.randint(0, vocab, (int(n),), generator=g).tolist() for n in lengths]


def test_greedy_batched_equals_single_and_naive_loop():
    model = small_model()
    prompts = random_prompts(16, 128)
    greedy = SamplingParams(max_tokens=20, temperature=0.0)
    # 16 requests through 5 slots: requests join and leave the running batch at every step.
    batched = Engine(model, scheduler_config=SchedulerConfig(max_batch=5)).generate(prompts, greedy)
    single = Engine(model, scheduler_config=SchedulerConfig(max_batch=1))
    for prompt, request in zip(prompts, batched, strict=True):
        assert request.finish_reason == "length" and len(request.output_ids) == 20
        assert request.output_ids == single.generate([prompt], greedy)[0].output_ids
    for prompt, request in list(zip(prompts, batched, strict=True))[:6]:
        assert request.output_ids == naive_greedy(model, prompt, 20)


def test_mixed_lengths_and_late_arrivals_keep_exact_outputs():
    model = small_model(seed=3)
    engine = Engine(model, scheduler_config=SchedulerConfig(max_batch=8))
    prompts = random_prompts(10, 128, seed=5)
    lengths = [3, 17, 9, 30, 1, 12, 25, 6, 14, 2]
    requests = []
    for i, (prompt, n) in enumerate(zip(prompts, lengths, strict=True)):
        requests.append(
            engine.add_request(engine.make_request(prompt, SamplingParams(max_tokens=n, temperature=0)))
        )
        for _ in range(i % 3):  # new requests arrive while others are mid-generation
            engine.step()
    while engine.has_work:
        engine.step()
    for prompt, n, request in zip(prompts, lengths, requests, strict=True):
        assert request.output_ids == naive_greedy(model, prompt, n)
    assert engine.scheduler.running == () and engine.kv_cache_usage == 0.0
    assert engine.runner.cache.bytes_allocated == 0  # the cache gave its memory back


def test_greedy_matches_transformers_generate_on_exported_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    from sapwood.config import Config
    from sapwood.model.folder import load, save_folder
    from sapwood.model.hf import export_hf

    model = small_model(seed=7, rope_scaling={"type": "yarn", "factor": 3.0})
    save_folder(model, Config(model=model.cfg), tmp_path / "ck")
    export_hf(tmp_path / "ck", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompts = random_prompts(6, 128, seed=11)
    new_tokens = 40  # prompts + 40 run past trained_context=32 into the YaRN-scaled range
    ours = Engine(load(tmp_path / "ck")).generate(
        prompts, SamplingParams(max_tokens=new_tokens, temperature=0)
    )
    for prompt, request in zip(prompts, ours, strict=True):
        ids = torch.tensor([prompt])
        out = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )
        assert out[0, len(prompt) :].tolist() == request.output_ids


def test_seeded_sampling_is_reproducible_whatever_the_batch():
    model = small_model()
    prompts = random_prompts(6, 128, seed=2)
    params = SamplingParams(
        max_tokens=15, temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.2, seed=123
    )
    together = Engine(model).generate(prompts, params)
    alone = Engine(model).generate([prompts[3]], params)[0]
    assert together[3].output_ids == alone.output_ids
    other_seed = Engine(model).generate([prompts[3]], SamplingParams(**{**params.__dict__, "seed": 124}))[0]
    assert other_seed.output_ids != alone.output_ids


def test_top_k_one_and_tiny_top_p_equal_greedy():
    model = small_model(seed=4)
    prompts = random_prompts(4, 128, seed=8)
    greedy = Engine(model).generate(prompts, SamplingParams(max_tokens=12, temperature=0))
    top1 = Engine(model).generate(prompts, SamplingParams(max_tokens=12, temperature=1.5, top_k=1, seed=0))
    nucleus = Engine(model).generate(
        prompts, SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-6, seed=0)
    )
    assert [r.output_ids for r in greedy] == [r.output_ids for r in top1] == [r.output_ids for r in nucleus]


def test_filters_and_repetition_penalty_exact():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    out = filter_top_k_top_p(logits, torch.tensor([2, 0]), torch.tensor([1.0, 0.5]))
    inf = float("-inf")
    assert out.tolist() == [[inf, 3.0, 2.0, inf], [inf, inf, 5.0, inf]]
    seen = torch.tensor([[True, False, True, True], [False] * 4])
    penalized = apply_repetition_penalty(
        torch.tensor([[2.0, 1.0, -1.0, 0.5], [2.0, 1.0, -1.0, 0.5]]), seen, torch.tensor([2.0, 2.0])
    )
    assert penalized.tolist() == [[1.0, 1.0, -2.0, 0.25], [2.0, 1.0, -1.0, 0.5]]


def test_repetition_penalty_matches_transformers_processor():
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    history = torch.randint(0, 50, (3, 7))
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter(1, history, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, seen, torch.full((3,), 1.3)), expected)


def test_bad_sampling_values_name_the_value():
    for kwargs, text in [
        ({"max_tokens": 0}, "max_tokens=0"), ({"temperature": 2.5}, "temperature=2.5"),
        ({"top_p": 0.0}, "top_p=0.0"), ({"top_k": -1}, "top_k=-1"),
    ]:
        with pytest.raises(Exception, match=text):
            SamplingParams(**kwargs)


def test_stop_strings_cut_the_text(lm_folder):
    engine = Engine.from_folder(lm_folder)
    prompt = engine.tokenizer.encode("def main():")
    free = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0))[0]
    text = free.stream.text
    assert len(text) > 6
    stop = text[3:5]
    stopped = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0, stop=[stop]))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.stream.text == text[: text.find(stop)]


def test_cancellation_frees_the_slot_and_others_continue():
    model = small_model()
    engine = Engine(model, scheduler_config=SchedulerConfig(max_batch=2))
    prompts = random_prompts(3, 128, seed=9)
    params = SamplingParams(max_tokens=25, temperature=0)
    requests = [engine.add_request(engine.make_request(p, params)) for p in prompts]
    for _ in range(3):
        engine.step()
    assert len(engine.scheduler.running) == 2 and requests[2] in engine.scheduler.waiting
    engine.cancel(requests[0])
    engine.step()
    assert requests[0].finish_reason == "cancelled" and requests[0] not in engine.scheduler.running
    assert requests[2] in engine.scheduler.running  # took the freed slot
    while engine.has_work:
        engine.step()
    assert requests[1].output_ids == naive_greedy(model, prompts[1], 25)
    assert requests[2].output_ids == naive_greedy(model, prompts[2], 25)


def test_engine_loop_signals_when_it_runs_dry():
    """``wait_idle`` returns once every submitted request has finished and its last output was delivered
    (queued ones included); a loop not started or stopped answers False at once."""
    from sapwood.infer.background import EngineLoop

    engine = Engine(small_model(), scheduler_config=SchedulerConfig(max_batch=2))
    loop = EngineLoop(engine)
    assert not loop.wait_idle(timeout=0)
    loop.start()
    assert loop.wait_idle(timeout=60)
    finished, params = [], SamplingParams(max_tokens=6, temperature=0)
    for prompt in random_prompts(5, 128, seed=4):
        loop.submit(prompt, params, lambda output: finished.append(output.finished))
    assert loop.wait_idle(timeout=60)
    assert finished.count(True) == 5 and not engine.has_work
    loop.stop()
    assert not loop.wait_idle(timeout=0)


def test_queue_bound():
    engine = Engine(small_model(), scheduler_config=SchedulerConfig(max_batch=1, max_waiting=2))
    params = SamplingParams(max_tokens=4, temperature=0)
    for _ in range(2):
        engine.add_request(engine.make_request([1, 2], params))
    with pytest.raises(QueueFullError, match="2 waiting"):
        engine.add_request(engine.make_request([1, 2], params))


def test_context_limit_names_the_maximum():
    engine = Engine(small_model())
    with pytest.raises(ContextLengthError, match="maximum context length is 96 tokens.*needs 100"):
        engine.make_request(list(range(60)), SamplingParams(max_tokens=40))
    engine.make_request(list(range(60)), SamplingParams(max_tokens=36))  # exactly 96 is allowed


def test_dynamic_ntk_applies_past_trained_context_per_request():
    """A request reaching 2x the trained context decodes exactly like the model with static NTK factor 2;
    a short request in the same batch keeps plain RoPE."""
    dynamic = small_model(seed=5, rope_scaling={"type": "dynamic_ntk", "factor": 4.0})
    plain = small_model(seed=5)
    static2 = small_model(seed=5, rope_scaling={"type": "ntk", "factor": 2.0})
    long_prompt, short_prompt = random_prompts(2, 128, seed=3, longest=24)
    long_prompt = (long_prompt * 3)[:24]
    engine = Engine(dynamic)
    long_params = SamplingParams(max_tokens=64 - len(long_prompt), temperature=0)  # total = 64 = 2 x 32
    short_params = SamplingParams(max_tokens=32 - len(short_prompt), temperature=0)  # total <= 32
    long_req, short_req = engine.generate([long_prompt, short_prompt], [long_params, short_params])
    assert long_req.rope.inv_freq.tolist() == static2.inv_freq.tolist()
    assert long_req.output_ids == naive_greedy(static2, long_prompt, long_params.max_tokens)
    assert short_req.output_ids == naive_greedy(plain, short_prompt, short_params.max_tokens)


def test_kv_cache_is_sized_to_need_and_shrinks_back():
    model = small_model(max_context=4096)
    engine = Engine(model, scheduler_config=SchedulerConfig(max_batch=4))
    cache = engine.runner.cache
    short = engine.add_request(engine.make_request([1, 2, 3], SamplingParams(max_tokens=10, temperature=0)))
    engine.step()
    assert (cache.rows, cache.capacity) == (4, 64)  # one row block, one position block; not 4096 positions
    long = engine.add_request(
        engine.make_request(list(range(70)), SamplingParams(max_tokens=80, temperature=0))
    )
    engine.step()
    assert cache.capacity == 192  # 150 positions rounded up to whole 64-position blocks
    assert (
        cache.bytes_allocated == 2 * 2 * 4 * 2 * 192 * 16 * 4
    )  # k+v, layers, rows, kv_heads, positions, dim
    while short.finish_reason is None:
        engine.step()
    while long.finish_reason is None:
        engine.step()
    assert cache.bytes_allocated == 0 and (cache.rows, cache.capacity) == (0, 0)


def test_kv_budget_is_never_exceeded_and_refuses_what_cannot_fit():
    """A budget of one row block (4 rows) x 64 positions: requests wait for room instead of exceeding it,
    outputs stay exact, and a request that could never fit is refused when it is queued (the first one
    too)."""
    model = small_model()
    per_position = 2 * 2 * 2 * 16 * 4  # k+v, layers, kv_heads, head_dim, float32
    budget = 4 * 64 * per_position
    engine = Engine(model, scheduler_config=SchedulerConfig(max_batch=16, kv_memory_bytes=budget))
    with pytest.raises(KVBudgetError, match="needs .* MiB of KV cache"):
        engine.add_request(
            engine.make_request(list(range(60)), SamplingParams(max_tokens=36))
        )  # 96 positions
    prompts = random_prompts(8, 128, seed=4)
    params = SamplingParams(max_tokens=20, temperature=0)
    requests = [engine.add_request(engine.make_request(p, params)) for p in prompts]
    peak_running = 0
    while engine.has_work:
        engine.step()
        assert engine.runner.cache.bytes_allocated <= budget
        peak_running = max(peak_running, engine.scheduler.running_count)
    assert peak_running == 4  # 4 rows x <= 44 positions fit; a 5th would need a second row block
    for prompt, request in list(zip(prompts, requests, strict=True))[:3]:
        assert request.output_ids == naive_greedy(model, prompt, 20)
    assert engine.runner.cache.peak_bytes <= budget


def test_stop_hold_back_is_linear_in_the_text():
    """Long stop strings cost O(new text + stop) per push: 2,000 pushes with four 256-character stops that
    never match and a text whose every tail is a stop prefix finish, and hold back exactly the prefix."""
    from sapwood.infer.tokenizer import TextStream, TextTokenizer

    class Characters(TextTokenizer):
        def __init__(self):
            pass

        def decode(self, ids):
            return "".join(chr(97 + i) for i in ids)

    stops = ["a" * 255 + "b", "a" * 255 + "c", "a" * 255 + "d", "a" * 255 + "e"]
    stream = TextStream(Characters(), stops)
    ids, emitted = [], ""
    for _ in range(2000):
        ids.append(0)  # "a" forever: each tail of up to 255 characters is a prefix of every stop
        emitted += stream.push(ids)
    assert len(emitted) == 2000 - 255 and not stream.stopped
    ids.append(1)  # "b" completes the first stop
    stream.push(ids)
    assert stream.stopped and stream.text == "a" * (2001 - 256)


def _cost(groups: list[list[Request]], call_tokens: int) -> int:
    return sum(len(g) * max(len(r.prompt_ids) for r in g) + call_tokens for g in groups)


def test_prefill_groups_are_the_cheapest_split_of_the_sorted_prompts():
    def requests(lengths: list[int]) -> list[Request]:
        return [Request([0] * n, SamplingParams(), None) for n in lengths]

    assert len(prefill_groups(requests([20] * 8))) == 1  # equal lengths: one batch
    split = prefill_groups(requests([60, 4, 61, 3, 5, 59]), call_tokens=32)
    assert [[len(r.prompt_ids) for r in g] for g in split] == [[3, 4, 5], [59, 60, 61]]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # exact: no split of the sorted order into contiguous batches costs less
        batch = requests(torch.randint(1, 80, (7,), generator=g).tolist())
        groups = prefill_groups(batch, call_tokens=16)
        ordered = sorted(batch, key=lambda r: len(r.prompt_ids))
        assert [r for group in groups for r in group] == ordered
        cheapest = min(
            _cost([ordered[a:b] for a, b in itertools.pairwise([0, *cuts, 7])], 16)
            for k in range(7)
            for cuts in itertools.combinations(range(1, 7), k)
        )
        assert _cost(groups, 16) == cheapest


def test_prompts_of_very_different_lengths_prefill_in_separate_batches():
    model = small_model(seed=4)
    engine = Engine(model, scheduler_config=SchedulerConfig(max_batch=8))
    widths = []
    prefill = engine.runner.prefill

    def recorded(first_row, prompts, *args, **kwargs):
        widths.append([len(p) for p in prompts])
        return prefill(first_row, prompts, *args, **kwargs)

    engine.runner.prefill = recorded
    prompts = random_prompts(2, 128, seed=6, longest=3) + random_prompts(2, 128, seed=7, longest=3)
    prompts[2:] = [p * 20 for p in prompts[2:]]  # two short prompts, two long ones
    requests = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0))
    assert len(widths) == 2
    assert max(widths[0]) <= 3 < min(widths[1])
    for prompt, request in zip(prompts, requests, strict=True):
        assert request.output_ids == naive_greedy(model, prompt, 6)
