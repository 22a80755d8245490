"""minidiff.control.attention_maps: the capture switch, the layer lists and the per-token maps."""

import math

import pytest
import torch

import minidiff
from minidiff.control import attention_layers, capture, token_maps


@pytest.fixture(scope="module")
def unet():
    return minidiff.UNet2DConditionModel.from_pretrained("tiny-sd", subfolder="unet")


def test_layers_by_kind_and_block(unet):
    cross, self_ = attention_layers(unet, "cross"), attention_layers(unet, "self")
    assert list(cross) == list(unet.cross_attention_layers())
    assert all(n.endswith(".attn1") for n in self_) and len(self_) == len(cross)
    mid = attention_layers(unet, "self", "mid")
    assert list(mid) == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    with pytest.raises(ValueError, match="kind must be one of"):
        attention_layers(unet, "both")
    with pytest.raises(ValueError, match="blocks must be among"):
        attention_layers(unet, blocks=("middle",))


def test_capture_switches_on_then_off_and_maps_match_a_hand_computation(unet):
    layers = attention_layers(unet, "cross")
    z, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 64)
    seen = {}
    name, first = next(iter(layers.items()))
    hook = first.register_forward_pre_hook(lambda m, args: seen.update(x=args[0], context=args[1]))
    with capture(layers):
        assert all(layer.store_attention_probs for layer in layers.values())
        unet(z, 500, encoder_hidden_states=text)
        maps = token_maps(layers, (8, 8))
        probs = first.attention_probs
    hook.remove()
    assert all(not layer.store_attention_probs and layer.attention_probs is None for layer in layers.values())
    # softmax(Q K^T / sqrt(d)) by hand for the first layer
    q, k = first.to_q(seen["x"]), first.to_k(seen["context"])
    d = q.shape[-1] // first.heads
    q = q.view(2, -1, first.heads, d).transpose(1, 2)
    k = k.view(2, -1, first.heads, d).transpose(1, 2)
    assert torch.allclose((q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1), probs, atol=1e-5)
    assert maps.shape == (2, 77, 8, 8)
    # every position's probabilities over the 77 tokens sum to 1, so do the averaged maps
    assert torch.allclose(maps.sum(dim=1), torch.ones(2, 8, 8), atol=1e-5)


def test_maps_stay_differentiable_with_respect_to_the_latents(unet):
    layers = attention_layers(unet, "cross")
    z = torch.randn(1, 4, 8, 8, requires_grad=True)
    with capture(layers):
        unet(z, 500, encoder_hidden_states=torch.randn(1, 77, 64))
        loss = token_maps(layers, (8, 8))[0, 2].max()
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_clear_errors(unet):
    layers = attention_layers(unet, "cross")
    with pytest.raises(ValueError, match="capture"):
        token_maps(layers, (8, 8))
    with capture(layers):
        unet(torch.randn(1, 4, 8, 8), 500, encoder_hidden_states=torch.randn(1, 77, 64))
        with pytest.raises(ValueError, match="does not fit a latent"):
            token_maps(layers, (8, 6))
