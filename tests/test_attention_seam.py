"""The transformer's attention seam: every block mixes its tokens through one injectable `attention(q, k, v, pe)`
call, the reference one by default, so another kernel replaces it without editing the model."""
from __future__ import annotations

import torch

from comfyui_krea.model_loader.flux import FluxTransformer
from comfyui_krea.model_loader.flux.math import attention as reference_attention
from comfyui_krea.model_loader.flux.math import image_ids, text_ids
from conftest import TINY_FLUX


def tiny_model(seed: int = 3, **kwargs) -> FluxTransformer:
    torch.manual_seed(seed)
    model = FluxTransformer(TINY_FLUX, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model


def inputs(batch: int = 1, h: int = 4, w: int = 6, txt_len: int = 5):
    g = torch.Generator().manual_seed(11)
    img = torch.randn(batch, (h // 2) * (w // 2), TINY_FLUX.in_channels, generator=g)
    txt = torch.randn(batch, txt_len, TINY_FLUX.context_in_dim, generator=g)
    y = torch.randn(batch, TINY_FLUX.vec_in_dim, generator=g)
    return (img, image_ids(batch, h, w), txt, text_ids(batch, txt_len), torch.full((batch,), 0.7), y,
            torch.full((batch,), 4.5))


def test_every_block_calls_the_attention_it_was_given_and_the_result_is_bit_identical():
    calls = []

    def counting(q, k, v, pe):
        calls.append(tuple(q.shape))
        return reference_attention(q, k, v, pe)

    plain, injected = tiny_model(), tiny_model(attention=counting)
    with torch.no_grad():
        expected = plain.forward_orig(*inputs())
        got = injected.forward_orig(*inputs())
    assert torch.equal(got, expected)  # the default is the reference call, bit for bit
    tokens = 5 + (4 // 2) * (6 // 2)  # text then image tokens, one joint sequence
    heads, head_dim = TINY_FLUX.num_heads, TINY_FLUX.head_dim
    assert calls == [(1, heads, tokens, head_dim)] * (TINY_FLUX.depth + TINY_FLUX.depth_single_blocks)


def test_set_attention_swaps_the_call_of_a_built_model():
    model = tiny_model()
    with torch.no_grad():
        before = model.forward_orig(*inputs())
    model.set_attention(lambda q, k, v, pe: torch.zeros_like(reference_attention(q, k, v, pe)))
    with torch.no_grad():
        silenced = model.forward_orig(*inputs())
    assert not torch.equal(silenced, before)  # the new call is used by the blocks
    model.set_attention(reference_attention)
    with torch.no_grad():
        assert torch.equal(model.forward_orig(*inputs()), before)
    assert all(block.attention is reference_attention for block in (*model.double_blocks, *model.single_blocks))
