"""The method matrix: every method x task on the builtin tiny Llama, through apply -> train -> save -> load -> predict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bitsandbytes.nn.modules as bnb_modules
import pytest
import torch
from pydantic import ValidationError
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, set_seed

from adapters_impl import METHODS, ApplyContext, count_parameters, get_method
from adapters_impl.adapter import AdapterSettings
from tasks.config import RunConfig
from tasks.generation import generate
from tasks.load import load_data
from tasks.modeling import ModelSource, load_base_model, load_tokenizer, resolve_model
from tasks.objectives import OBJECTIVES, tasks_of
from tasks.settings import DataSettings, ModelSettings, ProbeSettings
from tasks.tokenization import TokenizedRef, make_collator, tokenize_dataset

# Every combination that makes sense; `head` only classifies.
MATRIX = [(name, task) for name, method in METHODS.items() for task in tasks_of(method)]
EXACT_MERGE_TOLERANCE = 1e-4
# Learning rates as the field uses them: virtual tokens and scaling vectors want more, bottleneck adapters less.
LEARNING_RATE = {"prompt": 3e-2, "prefix": 3e-2, "ia3": 3e-2, "adapter": 1e-3}
# Prefixes with a fresh classification head overshoot at 3e-2 on this batch (its loss jumps, then wanders).
LEARNING_RATE_FOR_TASK = {("prefix", "classification"): 1e-2}


@pytest.fixture(scope="module")
def source(tiny_model: str) -> ModelSource:
    return resolve_model(ModelSettings(name_or_path=tiny_model))


@pytest.fixture(scope="module")
def tokenized(source: ModelSource, tmp_path_factory: pytest.TempPathFactory) -> dict[str, TokenizedRef]:
    """Every objective's data, tokenized once for the module (instruction rows: alpaca format, plain template;
    preference rows: prompt, chosen, rejected, batched as their chosen then their rejected rows)."""
    folder = tmp_path_factory.mktemp("matrix")
    samples = Path(__file__).resolve().parent.parent / "tasks" / "builtin"
    refs = {}
    chats = {"instruction": {"template": "tokenizer", "loss_on": "assistant"}, "preference": {"template": "tokenizer"}}
    for task, name in [
        ("causal_lm", "stories"),
        ("classification", "reviews"),
        ("instruction", "instructions"),
        ("preference", "preferences"),
    ]:
        file = folder / f"{name}.jsonl"
        file.write_text("\n".join((samples / f"sample_{name}.jsonl").read_text().splitlines()[:40]) + "\n")
        data = load_data(DataSettings(train=str(file)), OBJECTIVES[task], folder / "data")
        options = chats.get(task)
        refs[task] = tokenize_dataset(data, source, task, 32, folder / "tok", options)
    return refs


def fixed_batch(source: ModelSource, tokenized: TokenizedRef, size: int = 8) -> dict[str, torch.Tensor]:
    train, _ = tokenized.splits()
    collator = make_collator(load_tokenizer(source), tokenized.task)
    return dict(collator([train[i] for i in range(size)]))


def fresh_base(source: ModelSource, task: str, tokenized: TokenizedRef, settings: Any) -> nn.Module:
    method = get_method(settings.name)
    return load_base_model(
        source, OBJECTIVES[task].head, load_tokenizer(source), tokenized.label_names, **method.base_loading(settings)
    )


def adapted_model(source: ModelSource, task: str, tokenized: TokenizedRef, settings: Any) -> nn.Module:
    set_seed(0)
    base = fresh_base(source, task, tokenized, settings)
    return get_method(settings.name).apply(base, settings, ApplyContext(task=task, model_path=source.name_or_path))  # type: ignore[arg-type]


def train_steps(model: nn.Module, batch: dict[str, torch.Tensor], steps: int = 8, lr: float = 1e-2) -> list[float]:
    """A few optimizer steps on one fixed batch; returns the losses."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits.float()


@pytest.mark.parametrize(("name", "task"), MATRIX)
def test_method_trains_saves_loads_and_predicts(
    name: str, task: str, source: ModelSource, tokenized: dict[str, TokenizedRef], tmp_path: Path
) -> None:
    settings = METHODS[name].settings(name=name)
    ref = tokenized[task]
    batch = fixed_batch(source, ref)
    model = adapted_model(source, task, ref, settings)

    losses = train_steps(model, batch, lr=LEARNING_RATE_FOR_TASK.get((name, task), LEARNING_RATE.get(name, 1e-2)))
    assert all(map(torch.isfinite, torch.tensor(losses)))
    # Averaged over three steps: a classification head's first steps may overshoot.
    assert losses[-1] < losses[0] and sum(losses[-3:]) < sum(losses[:3]), (
        f"{name}/{task} loss did not go down: {losses}"
    )

    method = get_method(name)
    trained_logits = logits(model, batch)
    method.save(model, tmp_path / "adapter")
    reloaded = method.load(fresh_base(source, task, ref, settings), tmp_path / "adapter", False)
    assert torch.allclose(logits(reloaded, batch), trained_logits, atol=1e-5), "save + load changed the outputs"
    assert count_parameters(reloaded)[0] == 0, "a model loaded for inference has nothing trainable"

    if task != "classification":
        prompt = load_tokenizer(source)(["Once upon a time"], return_tensors="pt")
        generated = reloaded.generate(**prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)  # type: ignore[operator]
        assert generated.shape[1] == prompt["input_ids"].shape[1] + 6
    else:
        assert trained_logits.shape == (batch["labels"].shape[0], len(ref.label_names or []))


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.mergeable])
def test_merge_matches_the_adapted_model(name: str, source: ModelSource, tokenized: dict[str, TokenizedRef]) -> None:
    tasks = tasks_of(METHODS[name])
    task = "classification" if "classification" in tasks else tasks[0]  # where supported: the head must merge too
    settings = METHODS[name].settings(name=name)
    ref = tokenized[task]
    batch = fixed_batch(source, ref)
    model = adapted_model(source, task, ref, settings)
    train_steps(model, batch, steps=3)
    before = logits(model, batch)
    method = get_method(name)
    merged = method.merge(model, lambda: fresh_base(source, task, ref, METHODS["full"].settings(name="full")))  # type: ignore[misc]
    diff = float((logits(merged, batch) - before).abs().max())
    assert not any("lora" in n for n, _ in merged.named_modules()), "merged models carry no peft layers"
    if method.lossy_merge:
        # QLoRA: merged into a full-precision base, so it differs from the 4-bit model by quantization error.
        assert all(p.dtype == torch.float32 for p in merged.parameters())
        assert 0 < diff < 5
    else:
        assert diff < EXACT_MERGE_TOLERANCE


def test_trainable_parameters_follow_the_method(source: ModelSource, tokenized: dict[str, TokenizedRef]) -> None:
    ref = tokenized["causal_lm"]
    counts = {
        name: count_parameters(adapted_model(source, "causal_lm", ref, METHODS[name].settings(name=name)))
        for name in ["prompt", "prefix", "lora", "full", "ia3", "adapter"]
    }
    trainable = {name: c[0] for name, c in counts.items()}
    assert trainable["prompt"] < trainable["prefix"] < trainable["lora"] < trainable["full"]
    assert trainable["ia3"] < trainable["lora"] and trainable["adapter"] < trainable["full"]
    assert trainable["full"] == counts["full"][1]


def test_untrained_bottleneck_adapters_equal_the_base_and_keep_the_cache(
    source: ModelSource, tokenized: dict[str, TokenizedRef]
) -> None:
    ref = tokenized["causal_lm"]
    settings = AdapterSettings()
    batch = fixed_batch(source, ref)
    base = fresh_base(source, "causal_lm", ref, settings)
    expected = logits(base, batch)
    model = adapted_model(source, "causal_lm", ref, settings)
    assert torch.equal(logits(model, batch), expected)
    layers = [m for n, m in model.named_modules() if n.endswith("adapter_attention")]
    assert len(layers) == model.config.num_hidden_layers
    # With the KV cache and without it, greedy generation agrees once the adapters are trained.
    train_steps(model, batch, steps=3)
    prompt = load_tokenizer(source)(["Once upon a time"], return_tensors="pt")
    cached = model.generate(**prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(**prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_prompt_tuning_initialised_from_text(source: ModelSource, tokenized: dict[str, TokenizedRef]) -> None:
    settings = METHODS["prompt"].settings(name="prompt", num_virtual_tokens=4, init_text="a short story")
    model = adapted_model(source, "causal_lm", tokenized["causal_lm"], settings)
    tokenizer = load_tokenizer(source)
    ids = tokenizer("a short story", add_special_tokens=False)["input_ids"][:4]
    embeddings = model.get_input_embeddings().weight[ids]  # type: ignore[operator]
    prompt = model.prompt_encoder["default"].embedding.weight  # type: ignore[index]
    assert torch.allclose(prompt[: len(ids)], embeddings)


def test_pooled_classifier_ignores_padding_side(source: ModelSource, tokenized: dict[str, TokenizedRef]) -> None:
    """Prompt tuning's classifier pools the last real token, so left and right padding agree."""
    settings = METHODS["prompt"].settings(name="prompt")
    model = adapted_model(source, "classification", tokenized["classification"], settings).eval()
    tokenizer = load_tokenizer(source)
    texts = ["a fine film", "the plot was dull and far too long"]
    outputs = []
    for side in ("right", "left"):
        tokenizer.padding_side = side
        outputs.append(logits(model, dict(tokenizer(texts, return_tensors="pt", padding=True))))
    # Row 0 is padded; the long row is not, so its logits are the reference for the pooling position.
    assert torch.allclose(outputs[0][1], outputs[1][1], atol=1e-5)
    single = logits(model, dict(tokenizer(texts[:1], return_tensors="pt")))
    assert torch.allclose(outputs[0][0], single[0], atol=1e-4)


def test_head_cannot_generate_text() -> None:
    with pytest.raises(ValidationError, match=r"method\.name: 'head' cannot do task 'causal_lm'"):
        RunConfig.model_validate({"data": {"train": "x.jsonl"}, "method": {"name": "head"}})


@pytest.fixture(scope="module")
def odd_source(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> ModelSource:
    """The tiny Llama's tokenizer on a model whose MLP width (172, like stories260k's) is not a multiple of 32."""
    folder = tmp_path_factory.mktemp("odd-model")
    tiny = LlamaConfig.from_pretrained(tiny_model)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**tiny.to_dict(), "intermediate_size": 172})).save_pretrained(str(folder))
    load_tokenizer(resolve_model(ModelSettings(name_or_path=tiny_model))).save_pretrained(str(folder))
    return resolve_model(ModelSettings(name_or_path=str(folder)))


@pytest.mark.parametrize("task", ["causal_lm", "classification"])
def test_qlora_evaluates_generates_and_merges_layer_sizes_the_cpu_4bit_kernel_cannot_block(
    task: str,
    odd_source: ModelSource,
    tokenized: dict[str, TokenizedRef],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Build the 4-bit layers as on a CPU with AVX512-BF16, where bitsandbytes' inference kernel would be taken
    # (it asserts "N must be divisible by block_n" on 172); elsewhere this is what the layers find anyway.
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    settings = METHODS["qlora"].settings(name="qlora")
    method = get_method("qlora")
    ref = tokenized[task]
    batch = fixed_batch(odd_source, ref)
    model = adapted_model(odd_source, task, ref, settings)
    train_steps(model, batch, steps=2)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()
    with torch.enable_grad():  # inputs that need grad: the path training computes
        training_path = model(**inputs).logits.float().detach()
    assert torch.equal(logits(model, batch), training_path), "evaluation computes what training computes"
    if task == "causal_lm":
        tokenizer = load_tokenizer(odd_source)
        assert len(generate(model, tokenizer, ["Once upon a time"], ProbeSettings(max_new_tokens=4), 0)) == 1
    method.save(model, tmp_path / "adapter")
    reloaded = method.load(fresh_base(odd_source, task, ref, settings), tmp_path / "adapter", False)
    assert torch.allclose(logits(reloaded, batch), training_path, atol=1e-5)
    merged = method.merge(model, lambda: fresh_base(odd_source, task, ref, METHODS["full"].settings(name="full")))  # type: ignore[misc]
    assert float((logits(merged, batch) - training_path).abs().max()) < 5
