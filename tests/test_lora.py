"""LoRA loading against diffusers (+ peft) on a small random SD model with random LoRA weights (up not zero): the
PEFT, older diffusers and kohya formats, unfused, fused, unfused again and unloaded; two adapters with weights;
files saved by minidiff read by diffusers and diffusers' own files (with α in their metadata) read by minidiff;
clear errors for keys that fit nothing, another architecture's shapes and pickles with code."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from fake_checkpoints import make_fake_sd
from helpers import gen, load_diffusers, load_minidiff, max_pixel_diff
from minidiff import StableDiffusionPipeline
from minidiff.core.checkpoint_file import UnsafeCheckpointError
from minidiff.loaders import LoRALayer, lora_state_dict

pytest.importorskip("peft")      # diffusers loads LoRAs through peft (the `test` extra installs it)
pytestmark = pytest.mark.usefixtures("one_thread")
RUN = dict(num_inference_steps=3, output_type="np")
# The random LoRAs' up matrices are scaled down so that a layer's change stays below its own output, as in trained
# LoRAs. At full scale the random model turned chaotic: nudging one weight of diffusers' own UNet by 1e-7
# (relative) moved its 3-step image by 0.84, so no comparison at 1/255 could hold; at 0.25, by 1e-5, while the
# LoRA still moves the image by 0.66.
UP_SCALE = 0.25
UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
               "conv2", "time_emb_proj")                       # conv1 / conv2: kohya's LoCon convolutions (3x3)
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory, reference_dir):
    return make_fake_sd(tmp_path_factory.mktemp("sd"), reference_dir)


def pair(folder):
    return load_minidiff(StableDiffusionPipeline, folder), load_diffusers("StableDiffusionPipeline", folder)


def random_lora(pipe, fmt: str, seed: int = 0, rank: int = 4, alpha: float = 2.0) -> dict[str, torch.Tensor]:
    """A LoRA on every attention, feed-forward, projection and resnet layer of the UNet and every CLIP layer, in
    one of the file formats, with random down AND up (a zero up, as at the start of training, would prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for component, model, names in (("unet", pipe.unet, UNET_LAYERS), ("text_encoder", pipe.text_encoder, TEXT_LAYERS)):
        for name, layer in model.named_modules():
            if not (isinstance(layer, (nn.Linear, nn.Conv2d)) and name.endswith(names)):
                continue
            if isinstance(layer, nn.Linear):
                down = torch.randn(rank, layer.in_features, generator=g) / math.sqrt(layer.in_features)
                up = UP_SCALE * torch.randn(layer.out_features, rank, generator=g) / math.sqrt(rank)
            elif fmt == "kohya":
                down = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=g) / math.sqrt(
                    layer.weight[0].numel())
                up = UP_SCALE * torch.randn(layer.out_channels, rank, 1, 1, generator=g) / math.sqrt(rank)
            else:
                continue                     # diffusers' own trainers put LoRAs on linear layers only
            if fmt == "kohya":
                flat = ("lora_unet_" if component == "unet" else "lora_te_") + name.replace(".", "_")
                out.update({f"{flat}.lora_down.weight": down, f"{flat}.lora_up.weight": up,
                            f"{flat}.alpha": torch.tensor(alpha)})
            elif fmt == "peft":
                out.update({f"{component}.{name}.lora_A.weight": down, f"{component}.{name}.lora_B.weight": up})
            else:                                # diffusers before PEFT (0.14-0.21): .lora.down / .lora_linear_layer
                part = "lora" if component == "unet" else "lora_linear_layer"
                out.update({f"{component}.{name}.{part}.down.weight": down, f"{component}.{name}.{part}.up.weight": up})
    return out


def images(pipe, seed=0):
    return pipe("a red circle", negative_prompt="blue", generator=gen(seed), **RUN).images


@pytest.mark.parametrize("fmt", ["peft", "old-diffusers", "kohya"])
def test_unfused_fused_unfused_unloaded_equal_diffusers(sd_folder, fmt):
    mine, ref = pair(sd_folder)
    plain = images(mine)
    weights = {k: v.clone() for k, v in mine.unet.state_dict().items()}
    state_dict = random_lora(mine, fmt)
    assert mine.load_lora_weights(dict(state_dict)) == "default_0"
    ref.load_lora_weights(dict(state_dict))
    layers = [m for m in mine.unet.modules() if isinstance(m, LoRALayer)]
    assert len(layers) > 10 and any(isinstance(m, LoRALayer) for m in mine.text_encoder.modules())

    unfused = images(mine)
    assert max_pixel_diff(unfused, images(ref)) <= 1 / 255
    assert max_pixel_diff(unfused, plain) > 10 / 255               # the LoRA does something
    mine.fuse_lora(lora_scale=0.7)
    ref.fuse_lora(lora_scale=0.7)
    fused = images(mine)
    assert max_pixel_diff(fused, images(ref)) <= 1 / 255
    assert max_pixel_diff(fused, unfused) > 1 / 255                # scale 0.7 is not scale 1
    # diffusers keeps the adapter scaled by 0.7 after unfuse_lora (peft's scale_layer is not undone); minidiff goes
    # back to the LoRA as loaded.
    mine.unfuse_lora()
    ref.unfuse_lora()
    assert max_pixel_diff(images(mine), unfused) <= 1 / 255
    mine.unload_lora_weights()
    ref.unload_lora_weights()
    assert not any(isinstance(m, LoRALayer) for m in [*mine.unet.modules(), *mine.text_encoder.modules()])
    assert set(mine.unet.state_dict()) == set(weights)
    assert max((mine.unet.state_dict()[k] - w).abs().max().item() for k, w in weights.items()) < 1e-5
    back = images(mine)
    assert max_pixel_diff(back, plain) <= 1 / 255 and max_pixel_diff(back, images(ref)) <= 1 / 255


def test_fuse_at_scale_one_then_unfuse_equals_diffusers(sd_folder):
    mine, ref = pair(sd_folder)
    state_dict = random_lora(mine, "kohya", seed=1, alpha=8.0)      # α / r = 2
    mine.load_lora_weights(dict(state_dict))
    ref.load_lora_weights(dict(state_dict))
    mine.fuse_lora()
    ref.fuse_lora()
    assert max_pixel_diff(images(mine, 1), images(ref, 1)) <= 1 / 255
    mine.unfuse_lora()
    ref.unfuse_lora()
    assert max_pixel_diff(images(mine, 1), images(ref, 1)) <= 1 / 255


def test_two_adapters_and_set_adapters(sd_folder):
    mine, ref = pair(sd_folder)
    a, b = random_lora(mine, "peft", seed=2), random_lora(mine, "kohya", seed=3)
    for pipe in (mine, ref):
        pipe.load_lora_weights(dict(a), adapter_name="a")
        pipe.load_lora_weights(dict(b), adapter_name="b")
    assert max_pixel_diff(images(mine), images(ref)) <= 1 / 255
    mine.set_adapters(["a", "b"], [0.5, 1.5])
    ref.set_adapters(["a", "b"], [0.5, 1.5])
    assert max_pixel_diff(images(mine), images(ref)) <= 1 / 255
    mine.set_adapters("b")
    ref.set_adapters("b")
    assert max_pixel_diff(images(mine), images(ref)) <= 1 / 255
    with pytest.raises(ValueError, match=r"already loaded"):
        mine.load_lora_weights(dict(a), adapter_name="a")


def test_saved_by_minidiff_loads_in_diffusers(sd_folder, tmp_path):
    mine, ref = pair(sd_folder)
    mine.load_lora_weights(random_lora(mine, "kohya", seed=4, alpha=1.0))   # α / r = 0.25, folded into lora_B on save
    path = StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=lora_state_dict(mine.unet),
                                                     text_encoder_lora_layers=lora_state_dict(mine.text_encoder))
    assert os.path.basename(path) == "pytorch_lora_weights.safetensors"
    ref.load_lora_weights(str(tmp_path))
    assert max_pixel_diff(images(mine), images(ref)) <= 1 / 255
    again, _ = pair(sd_folder)
    again.load_lora_weights(str(tmp_path))
    assert max_pixel_diff(images(again), images(mine)) <= 1 / 255


def test_diffusers_saved_file_with_alpha_metadata_loads_in_minidiff(sd_folder, tmp_path):
    from diffusers import StableDiffusionPipeline as RefPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    mine, ref = pair(sd_folder)
    ref.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                    alpha_pattern={"to_k": 2}))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in ref.unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    RefPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(ref.unet),
                                  unet_lora_adapter_metadata=ref.unet.peft_config["default"].to_dict())
    mine.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    alphas = {n: layer.adapters["default_0"].alpha for n, layer in mine.unet.named_modules()
              if isinstance(layer, LoRALayer)}
    assert {a for n, a in alphas.items() if n.endswith("to_k")} == {2.0}
    assert {a for n, a in alphas.items() if not n.endswith("to_k")} == {8.0}
    fresh = load_diffusers("StableDiffusionPipeline", sd_folder)
    fresh.load_lora_weights(str(tmp_path))
    assert max_pixel_diff(images(mine), images(fresh)) <= 1 / 255


# --- bad inputs: one error listing what does not fit, and the model left as it was --------------------------------

def assert_refused(pipe, source, match):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        pipe.load_lora_weights(source)
    assert not any(isinstance(m, LoRALayer) for m in [*pipe.unet.modules(), *pipe.text_encoder.modules()])
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in before.items())


def test_bad_inputs(sd_folder, tmp_path):
    mine, _ = pair(sd_folder)
    good = random_lora(mine, "kohya")
    assert_refused(mine, {**good, "lora_unet_not_a_layer.lora_down.weight": torch.zeros(4, 4),
                          "something_else": torch.zeros(1)},
                   r"keys that fit no layer \(2\):\n    lora_unet_not_a_layer.lora_down.weight\n    something_else")
    # a LoRA made for the real SD v1 (320 channels, 768-wide text): every shape is wrong here
    sd14 = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 768),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(320, 4)}
    assert_refused(mine, sd14, r"wrong shapes or values \(1\):\n    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2"
                               r".to_k: down \(4, 768\), up \(320, 4\); this model needs down \(4, 32\), up \(32, 4\)")
    only_down = {k: v for k, v in good.items() if "lora_up" not in k}
    assert_refused(mine, only_down, r"needs both down and up")
    assert_refused(mine, {"unet.down_blocks.0.resnets.0.norm1.lora_A.weight": torch.zeros(4, 32),
                          "unet.down_blocks.0.resnets.0.norm1.lora_B.weight": torch.zeros(32, 4)},
                   r"a GroupNorm, not a Linear or Conv2d")
    assert_refused(mine, {}, r"holds no LoRA weights")
    damaged = dict(good)
    damaged[next(k for k in good if k.endswith(".alpha"))] = torch.tensor(float("nan"))
    assert_refused(mine, damaged, r"(?s)wrong shapes or values \(1\):.*NaN or inf in its weights or alpha")
    mine.fuse_qkv_projections()
    assert_refused(mine, good, r"fused q/k/v projections.*unfuse_qkv_projections")
    mine.unfuse_qkv_projections()
    with pytest.raises(ValueError, match=r"LoRA components are \['unet', 'text_encoder'\]; found \['vae'\]"):
        mine.fuse_lora(components=["vae"])
    with pytest.raises(FileNotFoundError, match=r"pytorch_lora_weights.safetensors.*weight_name="):
        mine.load_lora_weights(str(tmp_path))


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch ran",))


def test_pickle_with_code_is_refused(sd_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine, _ = pair(sd_folder)
    torch.save({"lora_unet_x.lora_down.weight": RunsCode()}, tmp_path / "pytorch_lora_weights.bin")
    with pytest.raises(UnsafeCheckpointError, match=r"asks to load \['posix.system'\].*nothing from the file was run"):
        mine.load_lora_weights(str(tmp_path))
    assert not (tmp_path / "ran").exists()
    # a plain pickled state dict is read (weights_only=True), like the .bin files of older trainers
    torch.save(random_lora(mine, "peft"), tmp_path / "lora.bin")
    mine.load_lora_weights(str(tmp_path / "lora.bin"))


# --- the kohya names at the real SD v1-4 config, every layer --------------------------------------------------------

def test_kohya_names_of_every_sd_v1_layer_match_diffusers_converter(reference_dir):
    """kohya's flat names for every Linear / Conv2d of SD v1-4's UNet and CLIP ViT-L text encoder (built on the meta
    device: names and shapes, no memory) go to the same layers as diffusers' own converter sends them."""
    import json

    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    from minidiff import UNet2DConditionModel
    from minidiff.loaders.lora import kohya_table, layer_names, parse_key

    folder = reference_dir / "stable-diffusion-v1-4"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text()))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(
            json.loads((folder / "text_encoder" / "config.json").read_text())))
    components = {"unet": unet, "text_encoder": text_encoder}
    table = kohya_table(components)
    # the layers kohya's sd-scripts adapt: attention blocks (q/k/v/out, ff, proj_in/out) and CLIP's q/k/v/out, fc1/fc2,
    # plus LoCon's resnet and sampler convolutions
    kohya = {flat: where for flat, where in table.items()
             if where[0] == "text_encoder" or any(p in where[1] for p in ("attentions", "resnets", "samplers"))}
    assert len([f for f in kohya if f.startswith("lora_unet_")]) == 278          # 16 transformer blocks, 22 resnets, ...
    assert len([f for f in kohya if f.startswith("lora_te_")]) == 12 * 6           # 12 CLIP layers x q, k, v, out, fc1, fc2
    state_dict = {}
    for flat in kohya:
        state_dict.update({f"{flat}.lora_down.weight": torch.zeros(1), f"{flat}.lora_up.weight": torch.zeros(1),
                           f"{flat}.alpha": torch.tensor(1.0)})
    converted, _ = _convert_non_diffusers_lora_to_diffusers(dict(state_dict))
    theirs = {parse_key(k, {})[:2] for k in converted}
    mine = {parse_key(k, table)[:2] for k in state_dict}
    assert mine == theirs == set(kohya.values())
    assert {n for c, n in mine if c == "unet"} <= set(layer_names(unet))


def test_fusing_qkv_with_a_lora_loaded_is_refused_not_silent(sd_folder):
    """Fused q/k/v copies the base weights: with a LoRA wrapper in place it would silently drop the adapter."""
    pipe = load_minidiff(StableDiffusionPipeline, sd_folder)
    pipe.load_lora_weights(random_lora(pipe, "peft"))
    with pytest.raises(RuntimeError, match=r"needs plain nn.Linear projections; \['to_q', 'to_k', 'to_v'\] are LoRALayer"):
        pipe.fuse_qkv_projections()
    pipe.unload_lora_weights()
    pipe.fuse_qkv_projections()                     # plain projections again: fuses
