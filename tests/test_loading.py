"""Bad checkpoints and unreachable sources: each raises one exception whose message says what was expected,
what was found and what to do."""

import json

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError, RepositoryNotFoundError
from safetensors.torch import load_file, save_file

import minidiff
import minidiff.core.hub

UNET = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
VAE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def unet_dir(tmp_path):
    folder = tmp_path / "unet"
    minidiff.UNet2DModel.from_config(UNET).save_pretrained(folder)
    return folder


@pytest.fixture
def sd_dir(tmp_path):
    """A pipeline folder in the hub layout, with only the VAE in it."""
    root = tmp_path / "sd"
    minidiff.AutoencoderKL.from_config(VAE).save_pretrained(root / "vae")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_sanity_the_fixtures_load(unet_dir, sd_dir):
    assert isinstance(minidiff.UNet2DModel.from_pretrained(unet_dir), minidiff.UNet2DModel)
    assert isinstance(minidiff.AutoencoderKL.from_pretrained(sd_dir, subfolder="vae"), minidiff.AutoencoderKL)


# --- files and folders ---------------------------------------------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing folder, a bundled checkpoint .*nor a hub repo id"):
        minidiff.UNet2DModel.from_pretrained(tmp_path / "no-such-model")


def test_folder_without_config(tmp_path):
    (tmp_path / WEIGHTS).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"Expected config.json in .*found \['diffusion_pytorch_model"):
        minidiff.UNet2DModel.from_pretrained(tmp_path)


def test_folder_without_weights(unet_dir):
    (unet_dir / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="Expected a weight file diffusion_pytorch_model.safetensors or "
                                                "diffusion_pytorch_model.bin in .*found none"):
        minidiff.UNet2DModel.from_pretrained(unet_dir)


def test_missing_variant(unet_dir):
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model.fp16.safetensors .*Drop variant="):
        minidiff.UNet2DModel.from_pretrained(unet_dir, variant="fp16")


def test_wrong_subfolder(sd_dir):
    with pytest.raises(FileNotFoundError, match=r"Expected a subfolder 'unet' in .*found only \['model_index.json', "
                                                r"'vae'\]. Check the subfolder= argument"):
        minidiff.AutoencoderKL.from_pretrained(sd_dir, subfolder="unet")


def test_pipeline_root_without_subfolder(sd_dir):
    with pytest.raises(FileNotFoundError, match=r"Expected config.json in .*found \['model_index.json', 'vae'\]. "
                                                r"Is this the right folder \(or subfolder=\)"):
        minidiff.AutoencoderKL.from_pretrained(sd_dir)


def test_truncated_safetensors(unet_dir):
    path = unet_dir / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=rf"Could not read the weight file .*{WEIGHTS} \({len(data) // 2} bytes\).*"
                                      "truncated or corrupt: delete it and download or save it again"):
        minidiff.UNet2DModel.from_pretrained(unet_dir)


def test_corrupt_bin(unet_dir):
    (unet_dir / WEIGHTS).unlink()
    (unet_dir / "diffusion_pytorch_model.bin").write_bytes(b"not a torch file at all")
    with pytest.raises(OSError, match=r"(?s)Could not read the weight file .*diffusion_pytorch_model.bin \(23 bytes\).*truncated or corrupt"):
        minidiff.UNet2DModel.from_pretrained(unet_dir)


def test_broken_config_json(unet_dir):
    (unet_dir / "config.json").write_text('{"block_out_channels": [8, 16],')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON .*Re-download or re-save"):
        minidiff.UNet2DModel.from_pretrained(unet_dir)


# --- a config that does not match the weights ------------------------------------------------------------

def test_wrong_shape(unet_dir):
    edit_config(unet_dir, in_channels=4)
    with pytest.raises(ValueError, match=r"do not match the model built from its config.json:\n"
                                         r"  wrong shape \(1\): conv_in.weight: expected \(8, 4, 3, 3\), found \(8, 3, 3, 3\)\n"
                                         r"Check that config.json and the weight file belong to the same checkpoint"):
        minidiff.UNet2DModel.from_pretrained(unet_dir)


def test_missing_keys(unet_dir):
    state = load_file(str(unet_dir / WEIGHTS))
    del state["conv_out.bias"], state["mid_block.attentions.0.to_q.weight"]
    save_file(state, str(unet_dir / WEIGHTS))
    with pytest.raises(ValueError, match=r"  missing \(2\): conv_out.bias, mid_block.attentions.0.to_q.weight\n"):
        minidiff.UNet2DModel.from_pretrained(unet_dir)


def test_unexpected_keys(unet_dir):
    state = load_file(str(unet_dir / WEIGHTS))
    state["class_embedding.weight"] = torch.zeros(10, 32)
    save_file(state, str(unet_dir / WEIGHTS))
    with pytest.raises(ValueError, match=r"  unexpected \(1\): class_embedding.weight\n"):
        minidiff.UNet2DModel.from_pretrained(unet_dir)


def test_config_with_fewer_layers_than_the_weights(unet_dir):
    edit_config(unet_dir, layers_per_block=2)  # the weights have 1 ResNet per down level
    with pytest.raises(ValueError) as info:
        minidiff.UNet2DModel.from_pretrained(unet_dir)
    message = str(info.value)
    assert "missing (" in message and "down_blocks.0.resnets.1.conv1.weight" in message
    assert "wrong shape (" in message  # the up blocks' first ResNets see other skip channels
    assert "in all)" in message  # long lists are cut, with the total


# --- configs minidiff refuses ----------------------------------------------------------------------------

def test_config_of_another_model_class(sd_dir):
    with pytest.raises(ValueError, match=r"is the config of a AutoencoderKL, not of a UNet2DModel. "
                                         r"Load it with minidiff.AutoencoderKL.from_pretrained, or check subfolder="):
        minidiff.UNet2DModel.from_pretrained(sd_dir, subfolder="vae")


def test_config_of_another_model_without_class_name(sd_dir):
    config = json.loads((sd_dir / "vae" / "config.json").read_text())
    del config["_class_name"]
    (sd_dir / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"UNet2DConfig does not implement the config key\(s\) \['force_upcast', "
                                         r"'latent_channels'.*Is this config for another model class"):
        minidiff.UNet2DModel.from_pretrained(sd_dir, subfolder="vae")


UNSUPPORTED_UNET = [
    (dict(time_embedding_type="fourier"), r"time_embedding_type='fourier' \(minidiff supports \['positional'\]\)"),
    (dict(class_embed_type="timestep"), r"class_embed_type='timestep' \(minidiff supports \[None\]\)"),
    (dict(num_class_embeds=10), r"num_class_embeds=10 \(minidiff supports \[None\]\)"),
    (dict(resnet_time_scale_shift="scale_shift"), r"resnet_time_scale_shift='scale_shift'"),
    (dict(add_attention=False), r"add_attention=False \(minidiff supports \[True\]\)"),
    (dict(downsample_type="resnet"), r"downsample_type='resnet' \(minidiff supports \['conv'\]\)"),
    (dict(upsample_type="resnet"), r"upsample_type='resnet'"),
    (dict(mid_block_type=None), r"mid_block_type=None \(minidiff supports \['UNetMidBlock2D'\]\)"),
    (dict(act_fn="gelu"), r"act_fn='gelu'"),
    (dict(down_block_types=["SkipDownBlock2D", "AttnDownBlock2D"]),
     r"block type\(s\) \['SkipDownBlock2D'\] in down_block_types; minidiff supports \['DownBlock2D', 'AttnDownBlock2D'\]"),
    (dict(up_block_types=["AttnUpBlock2D", "ResnetUpsampleBlock2D"]),
     r"block type\(s\) \['ResnetUpsampleBlock2D'\] in up_block_types"),
    (dict(up_block_types=["UpBlock2D"]), r"as many down_block_types and up_block_types as block_out_channels \(2\), "
                                         r"found 2 and 1"),
    (dict(norm_num_groups=3), r"block_out_channels \[8, 16\] are not divisible by norm_num_groups=3"),
    (dict(norm_num_groups=None), r"expected norm_num_groups to be a positive integer, found None"),
    (dict(attention_head_dim=32), r"attention_head_dim=32 is wider than the \[16\] channels"),
    (dict(cross_attention_dim=768), r"does not implement the config key\(s\) \['cross_attention_dim'\]"),
]


@pytest.mark.parametrize("change, message", UNSUPPORTED_UNET, ids=[next(iter(c)) for c, _ in UNSUPPORTED_UNET])
def test_unsupported_unet_option(unet_dir, change, message):
    edit_config(unet_dir, **change)
    with pytest.raises(ValueError, match=message) as info:
        minidiff.UNet2DModel.from_pretrained(unet_dir)
    assert "config.json" in str(info.value)  # names the file


UNSUPPORTED_VAE = [
    (dict(shift_factor=0.1159), r"shift_factor=0.1159 \(minidiff supports \[None\]\)"),
    (dict(latents_mean=[0.0, 0.1, 0.2, 0.3]), r"latents_mean=\(0.0, 0.1, 0.2, 0.3\)"),
    (dict(latents_std=[1.0] * 4), r"latents_std="),
    (dict(use_quant_conv=False), r"use_quant_conv=False \(minidiff supports \[True\]\)"),
    (dict(use_post_quant_conv=False), r"use_post_quant_conv=False"),
    (dict(mid_block_add_attention=False), r"mid_block_add_attention=False"),
    (dict(up_block_types=["UpDecoderBlock2D"]), r"as many down_block_types and up_block_types"),
    (dict(norm_num_groups=16), r"block_out_channels \[8\] are not divisible by norm_num_groups=16"),
    (dict(down_block_types=["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]),
     r"block type\(s\) \['AttnDownEncoderBlock2D'\] in down_block_types; minidiff supports \['DownEncoderBlock2D'\]"),
]


@pytest.mark.parametrize("change, message", UNSUPPORTED_VAE, ids=[next(iter(c)) for c, _ in UNSUPPORTED_VAE])
def test_unsupported_vae_option(sd_dir, change, message):
    edit_config(sd_dir / "vae", **change)
    with pytest.raises(ValueError, match=message):
        minidiff.AutoencoderKL.from_pretrained(sd_dir, subfolder="vae")


def test_unsupported_option_in_from_config():
    with pytest.raises(ValueError, match=r"time_embedding_type='fourier'"):
        minidiff.UNet2DModel.from_config(dict(UNET, time_embedding_type="fourier"))
    with pytest.raises(ValueError, match=r"class_embed_type='identity'"):  # a dataclass built by hand
        minidiff.UNet2DModel(minidiff.UNet2DConfig(**dict(UNET, class_embed_type="identity")))


# --- the hub ---------------------------------------------------------------------------------------------

def test_offline_with_an_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"Could not get google/ddpm-cat-256/config.json: working offline "
                                      r"\(HF_HUB_OFFLINE or local_files_only\) and the file is not in the cache. "
                                      r"To work offline, pass a local folder"):
        minidiff.UNet2DModel.from_pretrained("google/ddpm-cat-256", cache_dir=str(tmp_path / "cache"))


def test_local_files_only_with_an_empty_cache(tmp_path):
    with pytest.raises(OSError, match=r"vae/config.json: working offline"):
        minidiff.AutoencoderKL.from_pretrained("CompVis/stable-diffusion-v1-4", subfolder="vae",
                                               cache_dir=str(tmp_path / "cache"), local_files_only=True)


def _raise(error):
    def download(*args, **kwargs):
        raise error
    return download


def _response(status):
    return httpx2.Response(status, request=httpx2.Request("HEAD", "https://huggingface.co/x/y/resolve/main/config.json"))


HUB_FAILURES = {
    # what hf_hub_download raises when the HEAD request fails and the file is not cached
    "unreachable": (LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we "
                                            "cannot find the requested files in the local cache."),
                    OSError, r"Could not get google/ddpm-cat-256/config.json: the hub could not be reached and the "
                             r"file is not in the cache. To work offline"),
    # a transport error escaping huggingface_hub (httpx errors are not OSErrors)
    "connect_error": (httpx2.ConnectError("[Errno 101] Network is unreachable"),
                      OSError, r"the hub could not be reached \(ConnectError: \[Errno 101\] Network is unreachable\)"),
    "timeout": (httpx2.ReadTimeout("timed out"), OSError, r"the hub could not be reached \(ReadTimeout"),
    "socket": (ConnectionResetError("reset by peer"), OSError, r"the hub could not be reached \(ConnectionResetError"),
    "no_repo": (RepositoryNotFoundError("Repository Not Found", response=_response(404)),
                FileNotFoundError, r"The hub has no repo 'google/ddpm-cat-256' \(or it is private\)"),
    "no_file": (RemoteEntryNotFoundError("Entry Not Found", response=_response(404)),
                FileNotFoundError, r"The hub repo google/ddpm-cat-256 has no file google/ddpm-cat-256/config.json"),
}


@pytest.mark.parametrize("failure", HUB_FAILURES)
def test_hub_failures(failure, monkeypatch):
    error, expected_type, message = HUB_FAILURES[failure]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raise(error))
    with pytest.raises(expected_type, match=message) as info:
        minidiff.UNet2DModel.from_pretrained("google/ddpm-cat-256")
    assert info.value.__cause__ is error or failure == "no_file"
    if failure != "no_file":
        assert "There is no local folder 'google/ddpm-cat-256'" in str(info.value)


def test_missing_weight_file_on_the_hub_tries_the_next_format(unet_dir, monkeypatch):
    # the repo has config.json and only the .bin weights: the .safetensors lookup answers "no such file"
    (unet_dir / WEIGHTS).unlink()
    minidiff.UNet2DModel.from_config(UNET).save_pretrained(unet_dir, safe_serialization=False)

    def download(repo_id, filename, subfolder=None, cache_dir=None, local_files_only=False):
        path = unet_dir / filename
        if not path.exists():
            raise RemoteEntryNotFoundError("Entry Not Found", response=_response(404))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    model = minidiff.UNet2DModel.from_pretrained("someone/ddpm-like")
    assert isinstance(model, minidiff.UNet2DModel)


def test_bundled_name_whose_folder_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.setattr(minidiff.core.hub, "BUNDLED_DIR", str(tmp_path / "checkpoints"))
    with pytest.raises(FileNotFoundError, match=r"'tiny-ddpm' is a bundled minidiff checkpoint but .*checkpoints/"
                                                r"tiny-ddpm does not exist.*Reinstall minidiff"):
        minidiff.UNet2DModel.from_pretrained("tiny-ddpm")
