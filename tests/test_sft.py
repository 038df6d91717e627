"""Supervised fine-tuning: chat-template rendering, assistant-only labels, packing with document masks, the
masked loss, a fine-tuning run that learns, exact resume, and the CLI."""

import json

import pytest
import torch
import torch.nn.functional as F

from sapwood.errors import SapwoodError
from sapwood.infer.tokenizer import TextTokenizer
from sapwood.model.folder import load
from sapwood.train.sft_data import (
    IGNORE,
    DocumentMask,
    PackedRows,
    document_mask,
    messages_of,
    pack,
    read_conversations,
    render_example,
)

# The ChatML template as Qwen2 / Hugging Face document it (tokenizer_config.json "chat_template").
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Convert 3 km to m."},
    {"role": "assistant", "content": "3000"}, {"role": "user", "content": "And 4 km?"},
    {"role": "assistant", "content": "4000"},
]


@pytest.fixture(scope="module")
def chatml_folder(tmp_path_factory, lm_folder):
    """The tiny test model with the ChatML template in tokenizer_config.json."""
    import shutil

    folder = tmp_path_factory.mktemp("chatml") / "model"
    shutil.copytree(lm_folder, folder)
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": CHATML, "eos_token": "<|endoftext|>"})
    )
    return folder


def spans(example, tokenizer):
    """The text of each maximal run of trained tokens."""
    out, run = [], []
    for token, trained in zip(example.ids, example.trained, strict=True):
        if trained:
            run.append(token)
        elif run:
            out.append(run)
            run = []
    if run:
        out.append(run)
    return [tokenizer.tokenizer.decode(r, skip_special_tokens=False) for r in out]


def test_chatml_conversation_labels_exactly_the_assistant_turns(chatml_folder):
    tokenizer = TextTokenizer.from_folder(chatml_folder)
    example = render_example(tokenizer, CONVERSATION)
    assert spans(example, tokenizer) == ["3000<|im_end|>\n<|endoftext|>", "4000<|im_end|>\n<|endoftext|>"]
    # the prompt of the last turn is what the server feeds the model for that conversation
    server_prompt = tokenizer.apply_chat_template(CONVERSATION[:-1])
    assert (
        tokenizer.tokenizer.decode(example.prompt_ids, skip_special_tokens=False).replace("<|endoftext|>", "")
        == server_prompt
    )
    assert example.answer == "4000"
    untrained = tokenizer.tokenizer.decode(
        [t for t, m in zip(example.ids, example.trained, strict=True) if not m]
    )
    assert "Convert 3 km to m." in untrained and "3000" not in untrained


def test_default_template_and_instruction_lines(lm_folder):
    tokenizer = TextTokenizer.from_folder(lm_folder)
    messages = messages_of({"instruction": "Convert units.", "input": "5 m to cm", "output": "500"}, "x:1")
    assert messages == [
        {"role": "user", "content": "Convert units.\n\n5 m to cm"},
        {"role": "assistant", "content": "500"},
    ]
    example = render_example(tokenizer, messages)
    assert spans(example, tokenizer) == [" 500\n<|endoftext|>"]
    assert tokenizer.encode(tokenizer.apply_chat_template(messages[:1])) == example.prompt_ids


@pytest.mark.parametrize(
    "line, words",
    [
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "role in system, user, assistant"),
        ('{"instruction": "x", "output": 3}', "'output' must be a string"),
        ('{"prompt": "x", "completion": "y"}', 'expected {"messages"'), ("not json", "not JSON"),
    ],
)
def test_bad_lines_name_the_file_line_and_what_is_allowed(tmp_path, line, words):
    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n' + line + "\n")
    with pytest.raises(SapwoodError) as info:
        read_conversations(path)
    assert f"{path}:2" in str(info.value) and words in str(info.value)


def test_packed_rows_never_attend_across_examples(lm_folder):
    """Logits of a packed row equal the logits of each example run alone; targets only on assistant tokens."""
    tokenizer = TextTokenizer.from_folder(lm_folder)
    examples = [
        render_example(
            tokenizer,
            [
                {"role": "user", "content": f"Convert {v} km to m."},
                {"role": "assistant", "content": f"{v}000"},
            ],
        )
        for v in (7, 42, 913)
    ]
    lengths = [len(e.ids) - 1 for e in examples]
    rows = pack(examples, [0, 1, 2], seq_len=sum(lengths) + 5, packed=True)
    assert len(rows) == 1 and sum(lengths) + 5 <= 160  # within the test model's max_context
    row = rows[0]
    assert row.positions[: sum(lengths)].tolist() == [p for n in lengths for p in range(n)]
    mask = document_mask(row.documents[None])[0, 0]
    assert not mask[lengths[0], : lengths[0]].any() and mask[lengths[0], lengths[0]]  # 2nd doc starts fresh
    assert mask[-1].sum() == 1  # a padding position sees only itself
    model = load(lm_folder)
    with torch.no_grad():
        packed = model(
            row.tokens[None], positions=row.positions[None], kv_cache=DocumentMask(row.documents[None])
        )[0]
        start = 0
        for example, n in zip(examples, lengths, strict=True):
            alone = model(torch.tensor([example.ids[:-1]]))[0]
            torch.testing.assert_close(packed[start : start + n], alone, atol=1e-5, rtol=1e-5)
            targets = row.targets[start : start + n]
            expected = [t if m else IGNORE for t, m in zip(example.ids[1:], example.trained[1:], strict=True)]
            assert targets.tolist() == expected
            start += n
    assert (row.targets[start:] == IGNORE).all()


def test_unpacked_rows_hold_one_example_each_and_batches_resume_exactly(lm_folder):
    tokenizer = TextTokenizer.from_folder(lm_folder)
    examples = [
        render_example(
            tokenizer, [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": str(i)}]
        )
        for i in range(10)
    ]
    assert len(pack(examples, list(range(10)), 64, packed=False)) == 10
    batches = PackedRows(examples, 16, 3, seed=5, packed=True)
    first = [next(batches) for _ in range(4)]
    resumed = PackedRows(examples, 16, 3, seed=5, packed=True)
    resumed.load_state_dict(json.loads(json.dumps(PackedRows(examples, 16, 3, seed=5).state_dict())))
    later = PackedRows(examples, 16, 3, seed=5, packed=True)
    for _ in range(2):
        next(later)
    resumed.load_state_dict(later.state_dict())
    for expected in first[2:]:
        got = next(resumed)
        for key in expected:
            assert torch.equal(got[key], expected[key])


def sft_yaml(tmp_path, base, data, steps=6, lora=None, out="run", **train):
    sft = {
        "base": str(base), "data": str(data), "val_fraction": 0.2, "seq_len": 48, "eval_examples": 8,
        "max_new_tokens": 6,
    }
    if lora:
        sft["lora"] = lora
    config = {
        "sft": sft,
        "train": {
            "steps": steps, "batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "min_lr": 3e-4,
            "eval_every": 1000, "save_every": 3, "log_every": 1, "progress": False, "device": "cpu",
            "out_dir": str(tmp_path / out), **train,
        },
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def instructions(tmp_path_factory):
    from sapwood.demo.sft import instruction_records

    path = tmp_path_factory.mktemp("sft-data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in instruction_records(60, seed=3)))
    return path


def test_the_loss_is_the_mean_over_assistant_tokens(tmp_path, lm_folder, instructions, one_thread):
    """The task's loss on a packed batch equals cross-entropy over the assistant tokens of its examples, each
    example run alone and its targets taken from the example itself."""
    from sapwood.train.sft import SFTTask, finetune_config

    task = SFTTask(finetune_config(sft_yaml(tmp_path, lm_folder, instructions)))
    model = load(lm_folder)
    batch = next(task.train_batches(2))
    loss, metrics = task.loss(model, batch)
    total, count = 0.0, 0
    with torch.no_grad():
        for row_tokens, documents in zip(batch["tokens"], batch["documents"], strict=True):
            for document in documents.unique():
                if document < 0:
                    continue
                tokens = row_tokens[documents == document].tolist()
                example = next(e for e in task.train_examples if e.ids[:-1] == tokens)
                targets = torch.tensor(
                    [t if m else IGNORE for t, m in zip(example.ids[1:], example.trained[1:], strict=True)]
                )
                logits = model(torch.tensor([tokens]))[0]
                total += float(F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum"))
                count += int((targets != IGNORE).sum())
    assert count == metrics["assistant_tokens"] > 0
    assert float(loss.detach()) == pytest.approx(total / count, rel=1e-5)


def test_finetune_learns_writes_a_servable_folder_and_resumes_exactly(
    tmp_path, lm_folder, instructions, one_thread, crash_at
):
    from sapwood.config import load_config
    from sapwood.model.folder import read_weights
    from sapwood.train.loop import train
    from sapwood.train.sft import SFTTask, finetune_config

    straight = train(finetune_config(sft_yaml(tmp_path, lm_folder, instructions, steps=6, out="straight")))
    assert (
        straight["val_loss"]
        < SFTTask(finetune_config(sft_yaml(tmp_path, lm_folder, instructions))).evaluate(load(lm_folder), 2)[
            "val_loss"
        ]
    )
    assert 0.0 <= straight["exact_match"] <= 1.0
    final = tmp_path / "straight" / "final"
    assert (final / "tokenizer.json").exists() and load_config(final).model == load_config(lm_folder).model
    load(final)  # a normal checkpoint folder

    config = finetune_config(sft_yaml(tmp_path, lm_folder, instructions, steps=6, out="resumed"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, [crash_at(5)])  # the checkpoint of step 3 is the newest
    train(config, resume=True)
    a, b = read_weights(final), read_weights(tmp_path / "resumed" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_cli(capsys, *args):
    """``sapwood ARGS`` in this process: (exit status, stderr)."""
    from sapwood.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, capsys.readouterr().err


def test_cli_refuses_bad_finetune_configs_in_one_line(tmp_path, lm_folder, instructions, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(
        json.dumps(
            {"sft": {"base": str(tmp_path / "nowhere"), "data": str(instructions)}, "train": {"steps": 1}}
        )
    )
    status, err = run_cli(capsys, "finetune", str(path))
    assert status == 2 and err.count("\n") == 1 and "not a sapwood checkpoint folder" in err
    path.write_text(
        json.dumps(
            {
                "sft": {
                    "base": str(lm_folder),
                    "data": str(instructions),
                    "lora": {"rank": 4, "targets": ["wq", "qv"]},
                },
                "train": {"steps": 1},
            }
        )
    )
    status, err = run_cli(capsys, "finetune", str(path))
    assert status == 2 and err.count("\n") == 1 and "sft.lora.targets.1" in err


def test_the_demo_instruction_set_is_checkable_and_its_held_out_questions_are_unseen(tmp_path):
    import re

    from sapwood.demo.sft import DIGIT_WORDS, TASKS, UNITS, chance_level, write_instruction_set

    train_path, val_path = write_instruction_set(tmp_path, train=600, val=150)
    number = r"(\d(?: \d)*)"  # digits spaced one by one
    patterns = {
        "parity": rf"Even or odd: {number}",
        "last digit": rf"Last digit in words: {number}",
        "larger unit": rf"Which is more: {number} (\w+) or \1 (\w+)",
    }
    family = {unit: (f, f.index(unit)) for f in UNITS for unit in f}
    seen = set()
    for path in (train_path, val_path):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        questions = {r["instruction"] for r in records}
        assert len(questions) == len(records) and not questions & seen
        seen |= questions
        assert [r["task"] for r in records] == [TASKS[i % len(TASKS)] for i in range(len(records))]
        for r in records:
            found = re.fullmatch(patterns[r["task"]], r["instruction"])
            value = int(found.group(1).replace(" ", ""))
            if r["task"] == "parity":
                assert r["output"] == ("odd" if value % 2 else "even")
            elif r["task"] == "last digit":
                assert r["output"] == DIGIT_WORDS[value % 10]
            else:
                first, second = found.group(2, 3)
                assert family[first][0] == family[second][0] and first != second
                assert r["output"] == min(first, second, key=lambda unit: family[unit][1])
        # no constant answer is right for most questions of a type, or for a fifth of the whole set
        by_task = {t: [r for r in records if r["task"] == t] for t in TASKS}
        assert {len(v) for v in by_task.values()} == {len(records) // len(TASKS)}
        assert all(chance_level(v) < 0.65 for v in by_task.values()) and chance_level(records) < 0.25
        assert len({r["output"] for r in by_task["last digit"]}) == 10
