import numpy as np
import torch

from edgelora.models import (build_model, fingerprint_model, fingerprint_tokenizer, load_base_model, load_tokenizer,
                             trainable_state)
from edgelora.tasks import LoraSpec, Structure, StructureKind


def test_base_model_is_identical_for_the_same_seed_and_fingerprint_tells_otherwise():
    a, b, c = (load_base_model("tiny-bert", 3, s) for s in (0, 0, 1))
    assert fingerprint_model(a) == fingerprint_model(b)
    assert fingerprint_model(a) != fingerprint_model(c)
    assert fingerprint_tokenizer(load_tokenizer("tiny-bert")) == fingerprint_tokenizer(load_tokenizer("minilm"))


def test_lora_structure_trains_lora_and_classifier_only():
    base = load_base_model("tiny-bert", 3, 0)
    model = build_model(base, Structure(kind=StructureKind.LORA, lora=LoraSpec(rank=2, alpha=4.0)))
    names = list(trainable_state(model))
    assert any("lora_A" in n for n in names) and any("classifier" in n for n in names)
    assert all("lora_" in n or "classifier" in n for n in names)
    # every dense layer of attention and feed-forward blocks: 6 per layer x 2 layers x (A, B)
    assert sum("lora_" in n for n in names) == 6 * 2 * 2
    assert not any("pooler" in n for n in names)
    # building a structure leaves the shared base untouched
    assert not any(p.requires_grad for p in base.parameters())


def test_bitfit_and_full_structures():
    base = load_base_model("tiny-bert", 3, 0)
    bitfit = trainable_state(build_model(base, Structure(kind=StructureKind.BITFIT)))
    assert all(n.endswith("bias") or "classifier" in n for n in bitfit)
    full = trainable_state(build_model(base, Structure(kind=StructureKind.FULL)))
    assert len(full) == len(list(base.parameters()))


def test_fresh_lora_model_computes_the_base_function():
    base = load_base_model("tiny-bert", 3, 0)
    model = build_model(base, Structure(kind=StructureKind.LORA, lora=LoraSpec(rank=2, alpha=4.0,
                                                                              modules_to_save=())))
    ids = torch.randint(0, 1000, (2, 8))
    with torch.no_grad():
        np.testing.assert_allclose(model(input_ids=ids).logits.numpy(), base(input_ids=ids).logits.numpy(), atol=1e-6)


def test_a_local_model_path_loads_like_a_hub_id(tmp_path):
    base = load_base_model("tiny-bert", 3, 0)
    base.save_pretrained(tmp_path / "m")
    load_tokenizer("tiny-bert").save_pretrained(tmp_path / "m")
    again = load_base_model(str(tmp_path / "m"), 3, 0)
    assert fingerprint_model(again) == fingerprint_model(base)
    assert fingerprint_tokenizer(load_tokenizer(str(tmp_path / "m"))) == fingerprint_tokenizer(load_tokenizer("tiny-bert"))


def test_an_unloadable_model_names_the_field(tmp_path):
    import pytest

    from edgelora.configtools import ConfigError

    with pytest.raises(ConfigError, match="model.name"):
        load_base_model(str(tmp_path / "missing"), 3, 0)
