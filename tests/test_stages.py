"""The model stages on the builtin tiny Llama: tokenize, apply LoRA, evaluate, merge."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from adapters_impl._peft import linear_module_names
from adapters_impl.lora import LoraSettings
from adapters_impl.model_heads import CAUSAL_LM
from tasks.adapting import apply_method, forget, load_adapted, remember, take
from tasks.errors import UserInputError
from tasks.load import load_data
from tasks.measuring import causal_lm_nll
from tasks.modeling import load_base_model, load_tokenizer, resolve_model
from tasks.objectives import OBJECTIVES
from tasks.settings import DataSettings, ModelSettings
from tasks.tokenization import IGNORE_INDEX, make_collator, tokenize_dataset


@pytest.fixture
def source(tiny_model: str):
    return resolve_model(ModelSettings(name_or_path=tiny_model))


def test_causal_tokenization_masks_only_padding(source, stories_file: Path, tmp_path: Path) -> None:
    data = load_data(DataSettings(train=str(stories_file)), OBJECTIVES["causal_lm"], tmp_path / "d")
    ref = tokenize_dataset(data, source, "causal_lm", 24, tmp_path / "t")
    train, _ = ref.splits()
    tokenizer = load_tokenizer(source)
    row = train[0]
    assert row["labels"] == row["input_ids"] and len(row["input_ids"]) <= 24
    assert row["input_ids"][-1] == tokenizer.eos_token_id
    short = {
        "input_ids": [5, 6, tokenizer.eos_token_id],
        "attention_mask": [1, 1, 1],
        "labels": [5, 6, tokenizer.eos_token_id],
    }
    batch = make_collator(tokenizer, "causal_lm")([row, short])
    assert batch["labels"][1].tolist()[3:] == [IGNORE_INDEX] * (batch["labels"].shape[1] - 3)
    assert batch["labels"][1].tolist()[:3] == short["labels"]  # eos kept even when eos doubles as pad


def test_classification_maps_string_labels_and_keeps_names(source, reviews_file: Path, tmp_path: Path) -> None:
    data = load_data(DataSettings(train=str(reviews_file)), OBJECTIVES["classification"], tmp_path / "d")
    ref = tokenize_dataset(data, source, "classification", 32, tmp_path / "t")
    assert ref.label_names == ["negative", "positive"]
    train, _ = ref.splits()
    assert set(train["labels"]) == {0, 1}


def test_eval_labels_must_occur_in_train(source, reviews_file: Path, tmp_path: Path) -> None:
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text('{"text": "meh", "label": "neutral"}\n')
    data = load_data(
        DataSettings(train=str(reviews_file), eval=str(eval_file)), OBJECTIVES["classification"], tmp_path / "d"
    )
    with pytest.raises(UserInputError, match=r"data.label_column: eval labels \['neutral'\] never occur in train"):
        tokenize_dataset(data, source, "classification", 32, tmp_path / "t")


def test_unknown_target_module_lists_the_models_linear_layers(source, stories_file: Path, tmp_path: Path) -> None:
    data = load_data(DataSettings(train=str(stories_file)), OBJECTIVES["causal_lm"], tmp_path / "d")
    ref = tokenize_dataset(data, source, "causal_lm", 24, tmp_path / "t")
    with pytest.raises(UserInputError) as caught:
        apply_method(source, LoraSettings(target_modules=["q_proj", "qkv"]), "causal_lm", ref, str(tmp_path), 0)
    message = str(caught.value)
    assert message.startswith("method.target_modules: 'qkv' is not a linear module of this model")
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in message


def test_all_linear_adapts_every_linear_layer(source, stories_file: Path, tmp_path: Path) -> None:
    data = load_data(DataSettings(train=str(stories_file)), OBJECTIVES["causal_lm"], tmp_path / "d")
    ref = tokenize_dataset(data, source, "causal_lm", 24, tmp_path / "t")
    narrow = apply_method(source, LoraSettings(r=4), "causal_lm", ref, str(tmp_path / "a"), 0)
    wide = apply_method(
        source, LoraSettings(r=4, target_modules="all-linear"), "causal_lm", ref, str(tmp_path / "b"), 0
    )
    assert 0 < narrow.trainable_params < wide.trainable_params < wide.total_params
    model = take(wide.adapter_dir)
    adapted = {name.rsplit(".", 2)[-2] for name, _ in model.named_modules() if name.endswith("lora_A")}
    assert adapted == set(linear_module_names(load_base_model(source, CAUSAL_LM, load_tokenizer(source))))
    assert (Path(wide.adapter_dir) / "adapter_model.safetensors").exists()


def test_eval_loss_is_weighted_by_real_tokens(source) -> None:
    """A long and a short sequence in one padded batch: every real token counts once, padding never."""
    tokenizer = load_tokenizer(source)
    model = load_base_model(source, CAUSAL_LM, tokenizer)
    long_ids = tokenizer("Once upon a time, Lily had a little cat and a big dog.")["input_ids"]
    short_ids = tokenizer("The cat")["input_ids"]
    rows = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids} for ids in (long_ids, short_ids)]
    total, count = causal_lm_nll(model, rows, make_collator(tokenizer, "causal_lm"), batch_size=2)
    assert count == (len(long_ids) - 1) + (len(short_ids) - 1)
    expected = 0.0
    with torch.no_grad():
        for ids in (long_ids, short_ids):
            tensor = torch.tensor([ids])
            expected += float(model(input_ids=tensor, labels=tensor).loss) * (len(ids) - 1)
    assert math.isclose(total, expected, rel_tol=1e-4)


@pytest.fixture
def pickle_only_model(tiny_model: str, tmp_path: Path) -> Path:
    """The tiny model with its weights as pytorch_model.bin (a pickle) instead of safetensors."""
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "pickle-model"
    shutil.copytree(tiny_model, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_weights_need_allow_pickle(pickle_only_model: Path) -> None:
    from tasks.config import validate_config

    assert validate_config({"data": {"train": "x.jsonl"}}).flat()["model.allow_pickle"] is False  # an MLflow param
    with pytest.raises(UserInputError, match=r"model.name_or_path: .*pytorch_model.bin.*model.allow_pickle: true"):
        resolve_model(ModelSettings(name_or_path=str(pickle_only_model)))
    source = resolve_model(ModelSettings(name_or_path=str(pickle_only_model), allow_pickle=True))
    assert load_base_model(source, CAUSAL_LM, load_tokenizer(source)) is not None
    # A source that slipped past the folder check (a hub id) still never loads pickles.
    unchecked = source.model_copy(update={"allow_pickle": False})
    with pytest.raises(UserInputError, match=r"model.name_or_path: .*no safetensors weights.*model.allow_pickle"):
        load_base_model(unchecked, CAUSAL_LM, load_tokenizer(source))


def test_saved_adapters_load_only_from_safetensors(source, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from adapters_impl import ApplyContext, get_method

    tokenizer = load_tokenizer(source)
    for name in ("lora", "full"):
        method = get_method(name)
        settings = method.settings(name=name)
        context = ApplyContext(task="causal_lm", model_path=source.name_or_path)
        model = method.apply(load_base_model(source, CAUSAL_LM, tokenizer), settings, context)
        folder = tmp_path / name
        method.save(model, folder)
        (weights,) = folder.glob("*.safetensors")
        torch.save(load_file(str(weights)), weights.with_suffix(".bin"))
        weights.unlink()
        with pytest.raises(OSError, match="safetensors"):
            method.load(load_base_model(source, CAUSAL_LM, tokenizer), folder, False)


def _save(model: torch.nn.Module, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "weights.pt")
    return folder


def test_the_live_model_is_handed_over_once_and_only_the_newest_is_kept(tmp_path: Path) -> None:
    first, second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    remember(_save(first, tmp_path / "a"), first)
    remember(_save(second, tmp_path / "b"), second)  # one model at a time: `first` is dropped
    assert take(tmp_path / "a") is None
    assert take(tmp_path / "b" / ".." / "b") is second  # the same folder, however it is spelled
    assert take(tmp_path / "b") is None  # taken: the caller owns it now
    remember(tmp_path / "b", second)
    forget()
    assert take(tmp_path / "b") is None
    remember(tmp_path / "never-saved", first)  # nothing on disk to match it with later: not kept
    assert take(tmp_path / "never-saved") is None


def test_a_folder_saved_again_is_loaded_from_disk_not_from_the_stale_live_model(
    source, stories_file: Path, tmp_path: Path
) -> None:
    """A retry or a resumed run writes the folder again after its model was handed on: the next stage must load
    what is on disk now."""
    data = load_data(DataSettings(train=str(stories_file)), OBJECTIVES["causal_lm"], tmp_path / "d")
    ref = tokenize_dataset(data, source, "causal_lm", 24, tmp_path / "t")
    adapted = apply_method(source, LoraSettings(r=4), "causal_lm", ref, str(tmp_path / "run"), 0)
    stale = take(adapted.adapter_dir)
    other = apply_method(source, LoraSettings(r=4), "causal_lm", ref, str(tmp_path / "other"), 1)  # another seed
    fresh = take(other.adapter_dir)
    assert stale is not None and fresh is not None
    remember(adapted.adapter_dir, stale)
    time.sleep(0.05)  # past the file system's timestamp granularity, as any real save is
    saved = Path(adapted.adapter_dir) / "adapter_model.safetensors"
    saved.write_bytes((Path(other.adapter_dir) / "adapter_model.safetensors").read_bytes())  # same size, in place
    loaded = load_adapted(adapted, adapted.adapter_dir)
    assert loaded is not stale
    name = next(n for n, _ in fresh.named_parameters() if "lora_A" in n)
    assert torch.equal(dict(loaded.named_parameters())[name], dict(fresh.named_parameters())[name])
    assert not torch.equal(dict(stale.named_parameters())[name], dict(fresh.named_parameters())[name])


def test_full_fine_tuning_writes_no_copy_of_the_base_before_training(
    source, stories_file: Path, reviews_file: Path, tmp_path: Path
) -> None:
    """Causal LM: the untrained full model is the base as loaded, so no weights are written; another process
    (a DDP rank, a grid worker) loads the base in its place. A classification head is new: it is saved."""
    from adapters_impl.full import FullSettings

    data = load_data(DataSettings(train=str(stories_file)), OBJECTIVES["causal_lm"], tmp_path / "d")
    ref = tokenize_dataset(data, source, "causal_lm", 24, tmp_path / "t")
    adapted = apply_method(source, FullSettings(), "causal_lm", ref, str(tmp_path / "run"), 0)
    assert [p.name for p in Path(adapted.adapter_dir).iterdir()] == ["init-is-base"]
    forget()  # as in another process: nothing live
    loaded = load_adapted(adapted, adapted.adapter_dir, trainable=True)
    base = load_base_model(source, CAUSAL_LM, load_tokenizer(source))
    assert all(p.requires_grad for p in loaded.parameters())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), base.state_dict().values(), strict=True))

    reviews = load_data(DataSettings(train=str(reviews_file)), OBJECTIVES["classification"], tmp_path / "rd")
    classes = tokenize_dataset(reviews, source, "classification", 24, tmp_path / "rt")
    head = apply_method(source, FullSettings(), "classification", classes, str(tmp_path / "cls"), 0)
    assert (Path(head.adapter_dir) / "model.safetensors").is_file()
    forget()
