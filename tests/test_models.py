"""Model and tokenizer loading for every role, offline and with clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from itpo_batch.core.errors import ItpoError, ModelLoadError
from itpo_batch.model.loading import ValueModel, load_model, load_tokenizer, resolve_model_path


def test_resolve_tiny(tiny_dir: Path) -> None:
    assert resolve_model_path("tiny") == tiny_dir
    assert resolve_model_path(str(tiny_dir)) == tiny_dir
    assert resolve_model_path(tiny_dir) == tiny_dir


def test_missing_path_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model") as info:
        load_model(missing, role="policy")
    assert isinstance(info.value, ItpoError) and info.value.exit_code == 2
    with pytest.raises(ModelLoadError, match="no-such-model"):
        load_tokenizer(str(missing))


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        resolve_model_path(tmp_path / "weights")


def test_broken_config_is_a_load_error(tmp_path: Path, tiny_dir: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="broken"):
        load_model(broken, role="reference")


def test_tokenizer_without_chat_template(tmp_path: Path, tiny_dir: Path) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(tiny_dir, plain)
    (plain / "chat_template.jinja").unlink()
    cfg_path = plain / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="no chat template"):
        load_tokenizer(plain)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side_is_applied(tiny_dir: Path, side: str) -> None:
    tok = load_tokenizer("tiny", padding_side=side)
    assert tok.padding_side == side
    batch = tok(["hello", "Do you have a fever?"], padding=True, add_special_tokens=False)
    first = batch["input_ids"][0]
    assert (first[0] if side == "left" else first[-1]) == tok.pad_token_id


def test_policy_and_prm_are_trainable(tiny_dir: Path) -> None:
    for role in ("policy", "prm"):
        model = load_model("tiny", role=role)
        assert isinstance(model, LlamaForCausalLM) and model.training
        assert all(p.requires_grad for p in model.parameters())
        assert next(model.parameters()).dtype == torch.float32  # CPU default


def test_reference_is_frozen(tiny_dir: Path) -> None:
    ref = load_model("tiny", role="reference")
    assert not ref.training
    assert sum(p.numel() for p in ref.parameters() if p.requires_grad) == 0


def test_dtype_argument(tiny_dir: Path) -> None:
    model = load_model("tiny", role="reference", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model("tiny", role="reference", dtype="float7")


def test_unknown_role(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown model role"):
        load_model("tiny", role="critic")  # type: ignore[arg-type]


def test_value_model_shapes_and_init(tiny_dir: Path) -> None:
    vm = load_model("tiny", role="value")
    assert isinstance(vm, ValueModel) and vm.training
    assert vm.value_head.weight.dtype == torch.float32
    ids = torch.randint(8, 4096, (2, 11))
    values = vm(ids)
    assert values.shape == (2, 11) and values.dtype == torch.float32
    assert values.abs().max() < 1.0  # small init: values start near zero
    values.sum().backward()  # gradients reach the backbone from the first step
    assert vm.backbone.embed_tokens.weight.grad.abs().sum() > 0
    again = load_model("tiny", role="value")  # fresh heads are seeded, hence reproducible
    assert torch.equal(again.value_head.weight, vm.value_head.weight)


def test_value_model_round_trip(tmp_path: Path, tiny_dir: Path) -> None:
    vm = load_model("tiny", role="value")
    with torch.no_grad():
        vm.value_head.weight.normal_()
        vm.value_head.bias.fill_(0.5)
        vm.backbone.norm.weight.mul_(1.5)
    vm.save_pretrained(tmp_path / "q")
    assert (tmp_path / "q" / "value_head.safetensors").is_file()
    loaded = load_model(tmp_path / "q", role="value")
    ids = torch.randint(8, 4096, (3, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids), vm(ids))
    with torch.no_grad():  # the stored head, not a fresh one, was loaded
        assert torch.equal(loaded.value_head.bias, torch.tensor([0.5]))


def test_value_head_mismatch(tmp_path: Path, tiny_dir: Path) -> None:
    vm = ValueModel.from_pretrained("tiny")
    vm.save_pretrained(tmp_path / "q")
    from safetensors.torch import save_file

    save_file(
        {"weight": torch.zeros(1, 7), "bias": torch.zeros(1)}, str(tmp_path / "q" / "value_head.safetensors")
    )
    with pytest.raises(ModelLoadError, match="does not fit"):
        ValueModel.from_pretrained(tmp_path / "q")
