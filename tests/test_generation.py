"""The generator as the pipeline prepares it, and as the weight cache maps it back."""

from __future__ import annotations

import pytest
import torch

from common import weight_cache
from lipsync.generation import load_generator, prepared_skeleton


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_weight_cache_gives_back_the_prepared_generator(dtype, wav2lip_checkpoint, tmp_path, monkeypatch):
    """The second load maps the entry into `prepared_skeleton`; a mismatch would not fail a run but rebuild
    the entry every time, silently slow, so a rebuild fails here."""
    cpu = torch.device("cpu")
    first = load_generator(wav2lip_checkpoint, cpu, dtype, tmp_path).state_dict()
    monkeypatch.setattr(weight_cache, "keep", lambda *_: pytest.fail("the cache entry was rebuilt"))
    again = load_generator(wav2lip_checkpoint, cpu, dtype, tmp_path).state_dict()
    assert again.keys() == first.keys() == prepared_skeleton(dtype).state_dict().keys()
    for key, tensor in first.items():
        assert again[key].dtype == tensor.dtype and again[key].stride() == tensor.stride(), key
        assert torch.equal(again[key], tensor), key
