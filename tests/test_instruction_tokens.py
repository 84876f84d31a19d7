"""Chat templates that add tokens (chatml on a tokenizer without them), and answers scored once.

The tokens are added to the tokenizer, the embeddings grown once on every load path, the new rows trained (LoRA:
as peft's trainable tokens; full: with every other weight; IA3, adapter, prefix, prompt: adaptflow's TokenRows),
saved and loaded again. Evaluation keeps the answers it scored and the report reuses them.
Stage functions on the builtin tiny model; one end-to-end run through the CLI (slow).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_config
from torch import nn

import tasks.generation
from adapters_impl import METHODS, get_method
from tasks.adapting import apply_method, forget, load_adapted, load_full_precision_base
from tasks.config import RunConfig, resolve_paths
from tasks.load import DataRef, load_data
from tasks.modeling import ModelSource, load_tokenizer, resize_for_tokens, resolve_model
from tasks.objectives import OBJECTIVES, ReportInput, get_objective
from tasks.objectives.instruction.chat import CHATML_TOKENS
from tasks.objectives.instruction.objective import answer_scores, base_model
from tasks.settings import DataSettings, ModelSettings
from tasks.tokenization import TokenizedRef, make_collator, tokenize_dataset
from tasks.tracking import start_run
from tasks.trials import expand_grid, run_trial

BIN = Path(sys.executable).parent
PETS = [("Lily", "cat"), ("Tom", "dog"), ("Mia", "bird"), ("Ben", "fish"), ("Sara", "cat"), ("Max", "dog")]
ROWS = [
    {"instruction": f"Which pet does {name} have? Say it in {style}.", "output": f"{name} has a {pet}."}
    for name, pet in PETS
    for style in ("short", "a sentence", "words", "one line")
]
OPTIONS = {"template": "chatml", "loss_on": "assistant", "eval_generations": 4, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def chat(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelSource, DataRef, TokenizedRef]:
    folder = tmp_path_factory.mktemp("chatml")
    file = folder / "pets.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    source = resolve_model(ModelSettings(name_or_path=tiny_model))
    data = load_data(DataSettings(train=str(file), eval_fraction=0.25), OBJECTIVES["instruction"], folder / "data")
    return source, data, tokenize_dataset(data, source, "instruction", 64, folder / "tok", dict(OPTIONS))


def _batch(source: ModelSource, tokenized: TokenizedRef) -> dict[str, torch.Tensor]:
    train, _ = tokenized.splits()
    return dict(make_collator(load_tokenizer(tokenized.model_source(source)), "instruction")(list(train)[:8]))


@torch.no_grad()
def _rows(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """The embeddings the model uses for these ids (peft's trainable tokens included)."""
    return model.get_input_embeddings()(torch.tensor(ids)).detach().clone()  # type: ignore[operator]


def _train(model: nn.Module, batch: dict[str, torch.Tensor], steps: int = 4) -> None:
    """A few AdamW steps on one batch: enough to move every trainable row."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@torch.no_grad()
def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()


# Trainable new-row parameters: peft's (the LoRA family) and adaptflow's own (the other adapter methods).
ROW_PARAMETERS = ("trainable_tokens_delta", "new_token_rows.")


@pytest.mark.parametrize("name", ["lora", "qlora", "full", "ia3", "adapter", "prefix", "prompt"])  # dora: as lora
def test_chatml_rows_are_added_trained_saved_and_loaded_once(
    name: str, chat: tuple[ModelSource, DataRef, TokenizedRef], tmp_path: Path
) -> None:
    source, _, tokenized = chat
    assert tokenized.encoding.added_tokens == list(CHATML_TOKENS)
    adapted = apply_method(source, METHODS[name].settings(name=name), "instruction", tokenized, str(tmp_path), 0)
    assert adapted.source.added_tokens == list(CHATML_TOKENS)  # every later load adds the same tokens
    tokenizer = load_tokenizer(adapted.source)
    new = tokenizer.convert_tokens_to_ids(list(CHATML_TOKENS))
    old = [5, 40, 100]
    assert min(new) >= len(load_tokenizer(source))
    model = load_adapted(adapted, adapted.adapter_dir, trainable=True)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)  # type: ignore[union-attr]
    if name != "full":
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert any(r in n for n in trainable for r in ROW_PARAMETERS), trainable
        assert not any(n.endswith("embed_tokens.weight") or "base_layer.weight" in n for n in trainable if "embed" in n)
    new_before, old_before = _rows(model, new), _rows(model, old)

    batch = _batch(source, tokenized)
    _train(model, batch)
    assert not torch.allclose(_rows(model, new), new_before), "the new rows did not train"
    if name != "full":
        assert torch.equal(_rows(model, old), old_before), "only the added rows train, not the others"
    trained = _logits(model, batch)

    method = get_method(name)
    method.save(model, tmp_path / "adapter")
    forget()
    reloaded = load_adapted(adapted, tmp_path / "adapter")  # from disk: base grown once, then the saved rows
    assert reloaded.get_input_embeddings().weight.shape[0] == len(tokenizer)  # type: ignore[union-attr]
    assert torch.allclose(_logits(reloaded, batch), trained, atol=1e-5), "save + load changed the outputs"
    if name != "full":
        assert all(f.stat().st_size < 200_000 for f in (tmp_path / "adapter").glob("*.safetensors")), "whole matrices"
        again = load_adapted(adapted, tmp_path / "adapter", trainable=True)  # what --resume loads
        assert any(p.requires_grad for n, p in again.named_parameters() if any(r in n for r in ROW_PARAMETERS))
        if method.merge is None:
            return
        merged = method.merge(reloaded, lambda: load_full_precision_base(adapted))  # type: ignore[misc]
        assert torch.allclose(_rows(merged, new), _rows(model, new), atol=1e-6), "the merge lost the trained rows"
        if not method.lossy_merge:  # QLoRA merges into a full-precision base: off by the quantization error
            assert torch.allclose(_logits(merged, batch), trained, atol=1e-4)
        base = load_full_precision_base(adapted)
        assert resize_for_tokens(base, tokenizer, adapted.source.added_tokens).token_ids == tuple(new)
        assert base.get_input_embeddings().weight.shape[0] == len(tokenizer), "grown once, never twice"  # type: ignore[union-attr]


def test_base_is_evaluated_with_the_added_tokens(chat: tuple[ModelSource, DataRef, TokenizedRef]) -> None:
    source, _, tokenized = chat
    metrics = get_objective("instruction").base_metrics(source, tokenized, 4)
    assert torch.isfinite(torch.tensor(metrics["base_eval_loss"])) and "base_eval_rouge_l" in metrics


def test_report_reuses_the_answers_evaluation_scored(
    chat: tuple[ModelSource, DataRef, TokenizedRef], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, data, tokenized = chat
    model, tokenizer = base_model(source, tokenized)
    calls: list[int] = []
    generate = tasks.generation.generate_from_ids

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return generate(*args, **kwargs)

    monkeypatch.setattr(tasks.generation, "generate_from_ids", counted)
    objective = get_objective("instruction")
    metrics = objective.metrics(model, tokenizer, tokenized, 2, tmp_path)
    generated = len(calls)
    assert generated == 2  # 4 held-out prompts, 2 a batch
    given = ReportInput(model, tokenizer, data, tokenized, metrics, ["b"] * 4, None, tmp_path, 2)
    objective.report(given)
    assert len(calls) == generated, "the report generated the tuned answers again"
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").open()]
    scores = answer_scores([r["tuned"] for r in rows], [r["reference"] for r in rows])
    assert scores["eval_rouge_l"] == metrics["eval_rouge_l"], "the report shows the answers that were scored"

    base = objective.base_metrics(source, tokenized, 3)  # the base's: scored once, reused by the report
    generated = len(calls)
    base_texts = objective.base_generations(source, data, tokenized)
    assert len(calls) == generated, "the base answers were generated again"
    references = [r["reference"] for r in rows]
    assert answer_scores(base_texts, references)["eval_rouge_l"] == base["base_eval_rouge_l"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "method",
    [
        {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
        {"name": "prompt", "num_virtual_tokens": 4},  # the rows as adaptflow's own, through peft's prompt learning
    ],
    ids=["lora", "prompt"],
)
def test_chatml_run_registers_a_package_that_loads_in_a_fresh_process(
    method: dict[str, Any], tmp_path: Path, tiny_model: str, mlflow_store: str
) -> None:
    data = tmp_path / "pets.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    run_config = write_config(
        tmp_path / "chatml.yaml",
        model={"name_or_path": tiny_model},
        task="instruction",
        data={"train": str(data), "max_length": 64, "eval_fraction": 0.25},
        instruction=OPTIONS,
        method=method,
        train={"max_steps": 6, "batch_size": 8, "learning_rate": 5e-3, "save_steps": 6, "logging_steps": 3},
        registry={"name": "chatml"},
    )
    run = subprocess.run(
        [str(BIN / "adaptflow"), "run", str(run_config), "--json"], capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["metrics"].get("merge_max_abs_diff", 0.0) < 1e-3
    assert isinstance(result["metrics"]["base_eval_rouge_l"], float)
    predictions = [json.loads(line) for line in (Path(result["run_dir"]) / "reports" / "predictions.jsonl").open()]
    assert predictions[0]["prompt"].endswith("<|im_start|>assistant\n")

    question = json.dumps([{"role": "user", "content": "Which pet does Tom have? Say it in short."}])
    done = subprocess.run(
        [str(BIN / "adaptflow"), "predict", "models:/chatml@champion", "--messages", question, "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])["predictions"][0]
    assert isinstance(answer, str) and "<|im_end|>" not in answer and "<|im_start|>" not in answer


def test_a_chatml_grid_trial_continued_from_its_checkpoint_ends_where_the_uninterrupted_one_ends(
    tmp_path: Path, tiny_model: str
) -> None:
    """A grid trial and a resume load the trained rows from a checkpoint (with their optimizer state) onto a base
    grown again, never twice: the continued trial's numbers are the uninterrupted one's."""
    data_file = tmp_path / "pets.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    config = RunConfig.model_validate(
        {
            "model": {"name_or_path": tiny_model},
            "task": "instruction",
            "instruction": OPTIONS,
            "data": {"train": str(data_file), "max_length": 64, "eval_fraction": 0.25},
            "method": {"name": "lora"},
            "train": {"max_steps": 4, "batch_size": 8, "learning_rate": 5e-3, "logging_steps": 1},
            "tracking": {"experiment": "chatml-grid"},
            "grid": {"r": [4], "target_modules": ["all-linear"]},
        }
    )
    train = config.train.model_copy(update={"output_dir": str(tmp_path / "runs")})
    config = resolve_paths(config.model_copy(update={"train": train}), tmp_path)
    source = resolve_model(config.model)
    data = load_data(config.data, config.objective, tmp_path / "cache" / "d")
    tokenized = tokenize_dataset(data, source, config.task, 64, tmp_path / "cache" / "t", config.task_options())
    parent = start_run(config, "parent")
    spec = expand_grid(config)[0]

    unpruned = run_trial(spec, source, tokenized, parent, None)
    first = run_trial(spec, source, tokenized, parent, None, stop_at=2)
    last = run_trial(spec, source, tokenized, parent, None, stop_at=4, previous=first)
    assert (unpruned.status, last.status, last.steps) == ("ok", "ok", 4), (unpruned.error, last.error)
    assert last.trained is not None and last.trained.resumed_from_step == 2
    assert last.trained.adapted.source.added_tokens == list(CHATML_TOKENS)
    assert last.metrics["eval_loss"] == pytest.approx(unpruned.metrics["eval_loss"], rel=1e-6)
    assert last.metrics["eval_rouge_l"] == pytest.approx(unpruned.metrics["eval_rouge_l"])


def test_an_untied_output_layer_trains_its_own_new_rows(
    tiny_model: str, chat: tuple[ModelSource, DataRef, TokenizedRef], tmp_path: Path
) -> None:
    """IA3 on a model whose output layer is not tied to the embedding: the new tokens' output rows train apart
    from their input rows, survive save + load, and the merge writes both into the weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    untied = AutoModelForCausalLM.from_pretrained(tiny_model, tie_word_embeddings=False)
    untied.lm_head.weight = nn.Parameter(untied.get_input_embeddings().weight.detach().clone())
    untied.save_pretrained(tmp_path / "untied")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "untied")
    source = resolve_model(ModelSettings(name_or_path=str(tmp_path / "untied")))
    _, data, _ = chat
    tokenized = tokenize_dataset(data, source, "instruction", 64, tmp_path / "tok", dict(OPTIONS))
    adapted = apply_method(source, METHODS["ia3"].settings(name="ia3"), "instruction", tokenized, str(tmp_path), 0)
    model = load_adapted(adapted, adapted.adapter_dir, trainable=True)
    rows = dict(model.named_parameters())
    assert {"new_token_rows.input_rows", "new_token_rows.output_rows"} <= {
        n for n, p in rows.items() if p.requires_grad
    }
    output_before = rows["new_token_rows.output_rows"].detach().clone()
    batch = _batch(source, tokenized)
    _train(model, batch)
    assert not torch.allclose(rows["new_token_rows.output_rows"], output_before), "the output rows did not train"
    trained = _logits(model, batch)
    get_method("ia3").save(model, tmp_path / "adapter")
    forget()
    reloaded = load_adapted(adapted, tmp_path / "adapter")
    assert torch.allclose(_logits(reloaded, batch), trained, atol=1e-5)
    merged = get_method("ia3").merge(reloaded, lambda: load_full_precision_base(adapted))  # type: ignore[misc]
    assert torch.allclose(_logits(merged, batch), trained, atol=1e-4), "the merge lost the trained output rows"
