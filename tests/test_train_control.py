"""The tiny ControlNet and T2I-Adapter for tiny-sd: the training loop (a few steps lower the loss and move only
the new network), the bundled checkpoints (small, hub layout, read by diffusers to the same residuals), and
their measured effect (the object lands in the condition's mask far more often with the control than without)."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import minidiff
from minidiff.checkpoints import TINY_CONTROLNET_MASK, TINY_T2I_ADAPTER_MASK
from minidiff.training import evaluate_control as ec
from minidiff.training import shapes
from minidiff.training.common import LOG_NAME
from minidiff.training.train_control import (COMMAND_NAME, conditioning_widths, load_frozen_sd, main, main_adapter,
                                             make_adapter, predict_noise, sample_timesteps, shape_masks)
from minidiff.training.train_sd import vae_factor

pytestmark = pytest.mark.usefixtures("one_thread")
MB = 1024 * 1024
FOLDERS = {"controlnet": TINY_CONTROLNET_MASK, "adapter": TINY_T2I_ADAPTER_MASK}


@pytest.fixture(scope="module")
def frozen_sd():
    return load_frozen_sd(minidiff.checkpoints.TINY_SD, torch.device("cpu"))


def test_shape_masks_cover_the_drawn_box():
    ds = shapes.ShapesDataset(24, seed=3)
    images, _ = ds.tensors()
    masks = shape_masks(images)                                               # (24, 1, 64, 64)
    assert masks.shape == (24, 1, 64, 64) and set(masks.unique().tolist()) <= {0.0, 1.0}
    for i in range(24):
        x0, y0, x1, y1 = ds.example(i).box
        ys, xs = torch.nonzero(masks[i, 0], as_tuple=True)
        # every mask pixel lies in the box (half a pixel of antialiasing), and the mask spans the box
        assert xs.min() >= np.floor(x0) - 1 and xs.max() <= np.ceil(x1) and ys.min() >= np.floor(y0) - 1
        assert ys.max() <= np.ceil(y1)
        assert abs((xs.max() - xs.min() + 1) - (x1 - x0)) <= 2 and abs((ys.max() - ys.min() + 1) - (y1 - y0)) <= 2
        fill = masks[i].sum().item() / ((x1 - x0) * (y1 - y0))
        expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5, "diamond": 0.5}[ds.example(i).shape]
        assert abs(fill - expected) < 0.12, (ds.example(i), fill)


def test_adapter_timesteps_follow_the_cubic_schedule():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps("adapter", 20_000, 1000, g, "cpu").float()
    # t = (1 - u^3) T: P(t < T/2) = P(u^3 > 1/2) = 1 - 0.5^(1/3) = 0.206; uniform would give 0.5
    assert abs((t < 500).float().mean().item() - (1 - 0.5 ** (1 / 3))) < 0.02
    assert t.min() >= 0 and t.max() <= 999
    u = sample_timesteps("controlnet", 20_000, 1000, g, "cpu").float()
    assert abs((u < 500).float().mean().item() - 0.5) < 0.02


@pytest.mark.parametrize("kind", ["controlnet", "adapter"])
def test_a_few_steps_lower_the_loss_and_move_only_the_new_network(kind, frozen_sd):
    unet, vae, text_encoder, tokenizer = frozen_sd
    frozen = {name: [p.detach().clone() for p in m.parameters()] for name, m in
              (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
    f, h = vae_factor(vae), unet.config.sample_size                          # 8 and 8, or 4 and 16
    if kind == "controlnet":
        net = minidiff.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_widths(f))
    else:
        net = make_adapter(unet, f)
    start = [p.detach().clone() for p in net.parameters()]
    images, captions = shapes.ShapesDataset(8, seed=1).tensors()
    masks = shape_masks(images)
    g = torch.Generator().manual_seed(0)
    z_t, eps = torch.randn(8, 4, h, h, generator=g), torch.randn(8, 4, h, h, generator=g)
    t = torch.full((8,), 900)
    with torch.no_grad():
        ids = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
        context = text_encoder(ids)[0]
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):                                                       # one batch, learned by heart
        loss = F.mse_loss(predict_noise(kind, net, unet, z_t, t, context, masks), eps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    for name, before in frozen.items():                                       # tiny-sd is untouched
        model = {"unet": unet, "vae": vae, "text_encoder": text_encoder}[name]
        assert all(p.grad is None and torch.equal(p, b) for p, b in zip(model.parameters(), before)), name
    moved = [not torch.equal(p, s) for p, s in zip(net.parameters(), start)]
    assert all(moved), f"{moved.count(False)} of {len(moved)} tensors of the {kind} did not move"


@pytest.mark.parametrize("kind", ["controlnet", "adapter"])
def test_the_command_writes_a_loadable_folder_and_resumes(kind, tmp_path):
    out = tmp_path / kind
    args = ["--out", str(out), "--steps", "2", "--num-images", "16", "--batch-size", "4", "--device", "cpu",
            "--save-every", "1"]
    (main if kind == "controlnet" else main_adapter)(args)
    names = set(os.listdir(out))
    assert {"config.json", "diffusion_pytorch_model.safetensors", LOG_NAME, COMMAND_NAME} <= names
    assert open(out / COMMAND_NAME).read().split() == ["python", "-m", "minidiff.training", kind, *args]
    model = (minidiff.ControlNetModel if kind == "controlnet" else minidiff.T2IAdapter).from_pretrained(str(out))
    assert sum(p.numel() for p in model.parameters()) > 0
    # a used --out is refused; --resume continues to --steps 3
    with pytest.raises(SystemExit) as refused:
        (main if kind == "controlnet" else main_adapter)(args)
    assert refused.value.code == 2
    (main if kind == "controlnet" else main_adapter)([*args[:3], "3", *args[4:], "--resume"])
    steps = [int(line.split(",")[0]) for line in open(out / LOG_NAME).read().splitlines()[1:]]
    assert steps[-1] == 2                                                     # the log's last row: step index 2


@pytest.mark.parametrize("bad, message", [(["--sd", "no/such/folder"], "--sd no/such/folder: expected"),
                                          (["--caption-dropout", "1.5"], "--caption-dropout must be in [0, 1]"),
                                          (["--init", "no-such-init"], "--init no-such-init: expected a folder")])
def test_bad_arguments_are_refused_before_any_work(bad, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        main(["--out", str(tmp_path / "run"), "--device", "cpu", *bad])
    assert refused.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()                                    # nothing was made


# --- the bundled checkpoints -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["controlnet", "adapter"])
def test_bundled_folders_are_small_in_the_hub_layout(kind):
    folder = FOLDERS[kind]
    files = {name: os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md", LOG_NAME, COMMAND_NAME} <= set(files)
    assert sum(files.values()) < 10 * MB, files
    assert not [n for n in files if n.endswith((".pt", ".bin", ".ckpt"))], files       # no pickles shipped
    expected = "ControlNetModel" if kind == "controlnet" else "T2IAdapter"
    assert json.load(open(os.path.join(folder, "config.json")))["_class_name"] == expected
    readme = open(os.path.join(folder, "README.md")).read()
    assert "python -m minidiff.training" in readme and "IoU" in readme


def test_bundled_controlnet_and_adapter_load_in_diffusers_to_the_same_outputs():
    diffusers = pytest.importorskip("diffusers")
    g = torch.Generator().manual_seed(0)
    ours = minidiff.ControlNetModel.from_pretrained("tiny-controlnet-mask").eval()
    h = 64 // ours.condition_scale_factor                                      # the latents of its tiny-sd: 8 or 16
    z, context = torch.randn(2, 4, h, h, generator=g), torch.randn(2, 7, 64, generator=g)
    _, masks = ec.eval_set(2)
    theirs = diffusers.ControlNetModel.from_pretrained(TINY_CONTROLNET_MASK).eval()
    with torch.no_grad():
        a = ours(z, 500, context, masks.expand(-1, 3, -1, -1))
        b = theirs(z, 500, context, masks.expand(-1, 3, -1, -1))
    for x, y in zip([*a.down_block_res_samples, a.mid_block_res_sample], [*b.down_block_res_samples,
                                                                            b.mid_block_res_sample]):
        assert x.abs().max() > 0                                          # trained: the zero convs are zero no more
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    ours = minidiff.T2IAdapter.from_pretrained("tiny-t2i-adapter-mask").eval()
    theirs = diffusers.T2IAdapter.from_pretrained(TINY_T2I_ADAPTER_MASK).eval()
    with torch.no_grad():
        for x, y in zip(ours(masks), theirs(masks)):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


# Measured on the bundled checkpoints (their README tables, "first 12"): 12 one-object scenes' masks (the data the
# bundled tiny-sd was trained on), seed 0, 20 PNDM steps, guidance 7.5: mean IoU 0.210 -> 0.929 with the ControlNet,
# 0.210 -> 0.771 with the adapter. The bounds sit well below, so that another BLAS or CPU stays inside.
EVAL_PROMPTS = 12
MARGIN = {"controlnet": 0.4, "adapter": 0.4}


@pytest.mark.parametrize("kind", ["controlnet", "adapter"])
def test_bundled_control_puts_the_object_in_the_mask(kind):
    pipe = ec.load_pipeline(kind == "controlnet" and "tiny-controlnet-mask" or "tiny-t2i-adapter-mask")
    pipe.set_progress_bar_config(disable=True)
    prompts, masks = ec.eval_set(EVAL_PROMPTS, data="scenes")
    rows = ec.scale_curve(pipe, prompts, masks, scales=(0.0, 1.0))
    without, with_control = rows[0.0]["iou"], rows[1.0]["iou"]
    assert with_control - without > MARGIN[kind], (without, with_control)
    assert sum(a > b for a, b in zip(rows[1.0]["ious"], rows[0.0]["ious"])) >= EVAL_PROMPTS * 3 // 4
