"""The generator as the pipeline prepares it, and as the weight cache maps it back."""

from __future__ import annotations

import pytest
import torch

from common import weight_cache
from lipsync.generation import OwnDtypeConv, load_generator, prepared_skeleton


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


def test_the_float32_tail_keeps_the_checkpoints_weights_exactly(wav2lip_checkpoint, tmp_path):
    """Below float32 the last 1x1 convolution keeps the folded checkpoint's float32 weights bit for bit, and
    so does its copy mapped back from the weight cache: cast to bf16 and back they would be rounded to 8 bits."""
    cpu = torch.device("cpu")
    want = load_generator(wav2lip_checkpoint, cpu, torch.float32, tmp_path).output_block[1].state_dict()
    for _ in range(2):  # built, then mapped from the cache
        tail = load_generator(wav2lip_checkpoint, cpu, torch.bfloat16, tmp_path).output_block[1]
        assert isinstance(tail, OwnDtypeConv)
        for key, tensor in tail.state_dict().items():
            assert tensor.dtype == torch.float32 and torch.equal(tensor, want[key]), key
