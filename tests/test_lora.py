"""LoRA through PEFT: adapters on sapwood's Decoder, the PEFT folder loaded by real ``peft`` on the exported
Hugging Face model, merging (logits equal within 1e-5), mixed-adapter batches, and LoRA fine-tuning."""

import json
import random

import pytest
import torch

from sapwood.errors import ConfigError, SapwoodError
from sapwood.model import lora
from sapwood.model.folder import load, read_weights

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def random_adapter(model, name, targets=("wq", "wv", "w2"), rank=4, alpha=8.0, seed=0, scale=0.05):
    """Adapter ``name`` with A and B drawn from ``seed`` alone: A uniform in +-1/sqrt(in) (PEFT's Kaiming
    bound), B normal with std ``scale`` (PEFT starts B at zero, which would make every test trivial). PEFT's
    own A init draws from the global RNG, whose state depends on the tests run before; both are overwritten
    here."""
    lora.add_adapter(model, name, lora.peft_config(rank, alpha, 0.0, list(targets)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            if name in layer.lora_B:
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                a.copy_((torch.rand(a.shape, generator=generator) * 2 - 1) / a.shape[1] ** 0.5)
                b.copy_(torch.randn(b.shape, generator=generator) * scale)
    return model


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, lm_folder):
    """Two PEFT adapter folders for the tiny test model."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for seed, (name, targets) in enumerate(
        {"alpha": ("wq", "wv"), "beta": ("wk", "wo", "w1", "w3", "w2")}.items()
    ):
        model = random_adapter(load(lm_folder), name, targets, seed=seed + 1)
        out[name] = lora.save_adapter(model, name, root / name, lm_folder)
    return out


def test_test_adapters_depend_on_their_seed_only_not_on_the_global_rng(lm_folder):
    states = []
    for global_seed in (0, 6):
        with torch.random.fork_rng():
            torch.manual_seed(global_seed)
            states.append(lora.adapter_state(random_adapter(load(lm_folder), "a", seed=3), "a"))
    assert states[0].keys() == states[1].keys() and all(
        torch.equal(v, states[1][k]) for k, v in states[0].items()
    )


TOKENS = torch.tensor([[5, 17, 60, 2, 99, 140, 7, 33], [8, 8, 250, 31, 4, 77, 190, 12]])


def test_only_adapters_train_and_the_model_stays_a_decoder(lm_folder):
    from sapwood.model.transformer import Decoder

    model = random_adapter(load(lm_folder), "a")
    assert isinstance(model, Decoder)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_peft_loads_the_adapter_on_the_exported_hf_model_with_the_same_logits(
    tmp_path, lm_folder, adapter_dirs
):
    from transformers import AutoModelForCausalLM

    from sapwood.model.hf import export_hf

    config = json.loads((adapter_dirs["beta"] / lora.ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == sorted(
        ["k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    export_hf(lm_folder, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32)
    for name, folder in adapter_dirs.items():
        with_adapter = peft.PeftModel.from_pretrained(hf, str(folder)).eval()
        ours = lora.load_adapter(load(lm_folder), folder, name).eval()
        with torch.no_grad():
            expected = with_adapter(TOKENS).logits
            got = ours(TOKENS)
            base = load(lm_folder)(TOKENS)
        assert (got - base).abs().max() > 1e-3  # the adapter changes the output
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        hf = with_adapter.unload()


def test_merged_checkpoint_equals_base_plus_adapter_within_1e_5(tmp_path, lm_folder, adapter_dirs):
    from sapwood.train.sft import merge_lora_folder

    merged_folder = merge_lora_folder(adapter_dirs["beta"], tmp_path / "merged")
    for name in ("tokenizer.json", "config.yaml", "model.safetensors"):
        assert (merged_folder / name).exists()
    merged = load(merged_folder)
    adapted = lora.load_adapter(load(lm_folder), adapter_dirs["beta"], "beta").eval()
    with torch.no_grad():
        # run in float64, so that what is compared is the merge (the merged weights are stored in fp32) and
        # not the different fp32 summation orders of W x + s B A x and (W + s B A) x
        torch.testing.assert_close(merged.double()(TOKENS), adapted.double()(TOKENS), atol=1e-5, rtol=1e-5)
    assert set(read_weights(merged_folder)) == set(read_weights(lm_folder))


def test_one_batch_mixes_adapters_row_by_row(lm_folder, adapter_dirs):
    from sapwood.infer.engine import Engine
    from sapwood.infer.sampling import SamplingParams

    model = load(lm_folder)
    for name, folder in adapter_dirs.items():
        lora.load_adapter(model, folder, name)
    with torch.no_grad(), lora.selecting(model, ["alpha", None, "beta"]):
        mixed = model(TOKENS[[0, 0, 0]])
    for row, name in enumerate(["alpha", None, "beta"]):
        alone = load(lm_folder)
        if name is not None:
            lora.load_adapter(alone, adapter_dirs[name], name)
        with torch.no_grad():
            torch.testing.assert_close(mixed[row], alone(TOKENS[:1])[0], atol=1e-5, rtol=1e-5)
    engine = Engine.from_folder(lm_folder)
    for name, folder in adapter_dirs.items():
        engine.load_adapter(name, folder)
    params = SamplingParams(max_tokens=8, greedy=True, ignore_eos=True)
    prompt = TOKENS[0].tolist()
    together = engine.generate([prompt] * 3, params, adapters=["alpha", None, "beta"])
    for request, name in zip(together, ["alpha", None, "beta"], strict=True):
        solo = Engine.from_folder(lm_folder)
        if name is not None:
            solo.load_adapter(name, adapter_dirs[name])
        assert request.output_ids == solo.generate([prompt], params, adapters=[name])[0].output_ids
    assert len({tuple(r.output_ids) for r in together}) > 1
    with pytest.raises(SapwoodError, match="adapter 'gamma' is not loaded; loaded: alpha, beta"):
        engine.make_request(prompt, params, "gamma")


def test_bad_adapter_folders_are_refused_in_one_line(tmp_path, lm_folder, adapter_dirs):
    import shutil

    with pytest.raises(SapwoodError, match="not a PEFT adapter folder"):
        lora.read_adapter(tmp_path)
    broken = tmp_path / "dora"
    shutil.copytree(adapter_dirs["alpha"], broken)
    config = json.loads((broken / lora.ADAPTER_CONFIG).read_text())
    (broken / lora.ADAPTER_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(SapwoodError, match="use_dora=true is not supported"):
        lora.read_adapter(broken)
    (broken / lora.ADAPTER_CONFIG).write_text(json.dumps({**config, "target_modules": ["lm_head"]}))
    with pytest.raises(SapwoodError, match="target module 'lm_head' is not supported"):
        lora.read_adapter(broken)


def test_lora_finetune_trains_only_the_adapter_and_merges(tmp_path, lm_folder, one_thread):
    from sapwood.demo.sft import instruction_records
    from sapwood.train.loop import Trainer
    from sapwood.train.sft import finetune_config, merge_lora_folder, training_state_bytes

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in instruction_records(40, seed=1)))
    runs = {}
    adapter = {"rank": 4, "alpha": 8, "targets": ["wq", "wv"]}
    for name, extra, precision in (
        ("full", {}, "fp32"), ("lora", {"lora": adapter}, "fp32"),
        ("lora-bf16", {"lora": {**adapter, "base_dtype": "bf16"}}, "bf16"),
        ("lora-int8", {"lora": {**adapter, "base_dtype": "int8"}}, "fp32"),
    ):
        config = {
            "sft": {
                "base": str(lm_folder), "data": str(data), "seq_len": 48, "eval_examples": 4,
                "max_new_tokens": 4, **extra,
            },
            "train": {
                "steps": 4, "batch_size": 4, "micro_batch_size": 4, "lr": 1e-2, "min_lr": 1e-3,
                "eval_every": 100, "save_every": 100, "progress": False, "device": "cpu",
                "precision": precision, "out_dir": str(tmp_path / name),
            },
        }
        (tmp_path / f"{name}.yaml").write_text(json.dumps(config))
        trainer = Trainer(finetune_config(tmp_path / f"{name}.yaml"))
        summary = trainer.fit()
        block_linear_bytes = sum(
            p.numel() * 4
            for n, p in load(lm_folder).named_parameters()
            if n.startswith("layers.") and n.rsplit(".", 2)[-2] in lora.HF_TARGETS
        )
        runs[name] = {
            **summary,
            **training_state_bytes(trainer.model, trainer.optimizer),
            "block_linear_bytes": block_linear_bytes,
        }
    assert runs["lora"]["state_bytes"] < runs["full"]["state_bytes"] / 10
    assert runs["lora-bf16"]["state_bytes"] == runs["lora"]["state_bytes"]  # fp32 adapters either way
    assert runs["lora-bf16"]["weight_bytes"] < 0.6 * runs["lora"]["weight_bytes"]
    assert runs["lora-int8"]["state_bytes"] == runs["lora"]["state_bytes"]
    int8_saved = runs["lora"]["weight_bytes"] - runs["lora-int8"]["weight_bytes"]
    assert int8_saved > 0.7 * 0.75 * runs["lora"]["block_linear_bytes"]  # int8 data and per-row scales
    # the int8 base trains like the fp32 one: same held-out loss within 2 % after the same steps
    assert runs["lora-int8"]["val_loss"] == pytest.approx(runs["lora"]["val_loss"], rel=0.02)
    assert runs["lora-int8"]["val_loss"] != runs["lora"]["val_loss"]  # the base really was quantized
    assert (
        lora.read_adapter(tmp_path / "lora-bf16" / "final")[1]["layers.0.attention.wq.lora_A.weight"].dtype
        == torch.float32
    )
    for base_dtype, precision, words in (
        ("bf16", "fp32", "base_dtype='bf16' needs train.precision: bf16"),
        ("int8", "bf16", "base_dtype='int8' needs train.precision: fp32"),
    ):
        config["sft"]["lora"]["base_dtype"], config["train"]["precision"] = base_dtype, precision
        (tmp_path / "bad.yaml").write_text(json.dumps(config))
        with pytest.raises(ConfigError, match=words):
            Trainer(finetune_config(tmp_path / "bad.yaml"))
    final = tmp_path / "lora" / "final"
    assert sorted(p.name for p in final.iterdir()) == [lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS]
    _, state, base = lora.read_adapter(final)
    assert base == str(lm_folder) and any(v.abs().max() > 0 for k, v in state.items() if ".lora_B." in k)
    merged = load(merge_lora_folder(final, tmp_path / "merged"))
    before = read_weights(lm_folder)
    after = {k: v for k, v in merged.state_dict().items() if k in before}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".wq." in k or ".wv." in k for k in changed)  # only adapted weights moved


def conversions(count: int, seed: int, exclude: set[str] = frozenset()) -> list[dict[str, str]]:
    """``count`` distinct unit conversions "Convert 37 km to m." -> "37000", none in ``exclude``."""
    units = (("km", "m", 3), ("m", "cm", 2), ("m", "mm", 3), ("kg", "g", 3), ("L", "mL", 3), ("cm", "mm", 1))
    rng = random.Random(seed)
    records: dict[str, str] = {}
    while len(records) < count:
        source, target, power = rng.choice(units)
        value = rng.randint(1, 999)
        question = f"Convert {value} {source} to {target}."
        if question not in exclude:
            records[question] = str(value * 10**power)
    return [{"instruction": k, "output": v} for k, v in records.items()]


def test_lora_finetuning_answers_held_out_questions_the_base_cannot(tmp_path, lm_folder, one_thread):
    """LoRA on every linear layer of the tiny random test model learns unit conversions: its greedy answers to
    held-out questions (none seen in training) match exactly far more often than the base's."""
    from sapwood.train.loop import Trainer
    from sapwood.train.sft import SFTTask, exact_match, finetune_config

    held_out = conversions(50, seed=1)
    training = conversions(400, seed=0, exclude={r["instruction"] for r in held_out})
    train_path, val_path = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    for path, records in ((train_path, training), (val_path, held_out)):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {
        "sft": {
            "base": str(lm_folder), "data": str(train_path), "val_data": str(val_path), "seq_len": 48,
            "eval_examples": 50, "max_new_tokens": 8,
            "lora": {"rank": 32, "alpha": 32, "targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]},
        },
        "train": {
            "steps": 300, "batch_size": 16, "micro_batch_size": 16, "lr": 5e-3, "min_lr": 5e-4,
            "warmup_steps": 5, "weight_decay": 0.0, "eval_every": 1000, "save_every": 1000, "seed": 0,
            "progress": False, "device": "cpu", "out_dir": str(tmp_path / "run"),
        },
    }
    (tmp_path / "lora.yaml").write_text(json.dumps(config))
    config = finetune_config(tmp_path / "lora.yaml")
    task = SFTTask(config)
    before = exact_match(load(lm_folder), task.tokenizer, task.val_examples, 8)
    summary = Trainer(config).fit()
    assert before == 0.0 and summary["exact_match"] >= 0.15
