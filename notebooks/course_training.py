"""The cells of notebook 10 (training a tiny diffusion model); see course_cells.py."""

MD, CODE = "md", "code"

TRAINING = dict(
    file="10_training_a_tiny_model.ipynb", title="Training a tiny diffusion model",
    intro="""
    Every picture so far came from a trained model. Here we train one: the loop of Ho et al. (2020),
    Algorithm 1, on the synthetic shapes that the bundled `tiny-ddpm` learned from, with its exact
    configuration, for a minute or two. Then we compare with the bundled checkpoint, which ran the same
    loop for a few minutes on a GPU, and run the script that made it.
    """,
    learn=["the data the tiny checkpoints were trained on (captioned synthetic shapes, drawn offline)",
           "the DDPM training loop: noise an image with `add_noise`, predict the noise, regress (the 'simple' loss)",
           "why the saved model is an exponential moving average (EMA) of the weights",
           "how `python -m minidiff.training` made `tiny-ddpm`, and how its result loads as a pipeline"],
    cells=[
        (MD, """
        ## 1. The data

        `minidiff.training.shapes` draws one flat-coloured shape per image with PIL and writes its caption.
        Nothing is downloaded, and image i of a seed is always the same. DDPM ignores the captions (it is
        unconditional); `tiny-sd` learns from them.
        """),
        (CODE, """
        from minidiff.training import shapes, train_ddpm

        num_images = setup.pick(tiny=2000, hub=20000)
        images, captions = shapes.render_all(num_images, seed=0, resolution=train_ddpm.RESOLUTION)   # uint8 (N, 3, 32, 32)
        viz.image_grid(shapes.to_model_range(images[:6]), titles=[c.replace("a ", "", 1)[:22] for c in captions[:6]]);
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        print("images:", tuple(images.shape), images.dtype)
        print("captions:", captions[:3])
        """),
        (MD, """
        ## 2. The model and the noise schedule of tiny-ddpm

        The same structure as google/ddpm-cat-256 (ResNet levels, self-attention at the lowest resolution),
        made small, and DDPM's linear schedule with T = 1000.
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        import copy
        from minidiff import UNet2DModel
        from minidiff.schedulers import DDPMScheduler

        torch.manual_seed(0)
        unet = UNet2DModel.from_config(train_ddpm.UNET_CONFIG).to(setup.device).train()
        ema = copy.deepcopy(unet).requires_grad_(False)          # the weights we will keep
        scheduler = DDPMScheduler.from_config(train_ddpm.SCHEDULER_CONFIG)
        print("block_out_channels:", train_ddpm.UNET_CONFIG["block_out_channels"],
              f"-> {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters")
        print("T =", scheduler.config.num_train_timesteps, " betas:", scheduler.config.beta_schedule,
              scheduler.config.beta_start, "->", scheduler.config.beta_end)
        """),
        (MD, """
        ## 3. The training loop

        Algorithm 1: take clean images x_0, a random timestep t for each, noise ε, form
        x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε with `add_noise`, and regress the UNet's output on ε with a
        mean squared error (eq. 14, the "simple" loss). Each image is seen at every noise level over
        training, so one network learns to denoise all of them.

        Two details from `train_ddpm.py`: a short linear warm-up of the learning rate, and an exponential
        moving average of the weights (θ_ema <- 0.999 θ_ema + 0.001 θ), which averages out the noise of the
        last updates and samples better than the raw weights.
        """),
        (CODE, """
        import torch.nn.functional as F
        from minidiff.training.common import ema_update, warmup_lr

        steps, batch_size, lr = setup.pick(tiny=200, hub=1000), setup.pick(tiny=16, hub=128), 1e-3   # script: 3e-4
        T = scheduler.config.num_train_timesteps
        optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
        g = torch.Generator().manual_seed(0)
        losses = []
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr * warmup_lr(step, warmup=50)
            idx = torch.randint(len(images), (batch_size,), generator=g)
            x0 = shapes.to_model_range(images[idx]).to(setup.device)                  # (B, 3, 32, 32) in [-1, 1]
            t = torch.randint(T, (batch_size,), generator=g).to(setup.device)          # t ~ U{0, ..., T-1}
            eps = torch.randn(x0.shape, generator=g).to(setup.device)                  # ε ~ N(0, I)
            x_t = scheduler.add_noise(x0, eps, t)                                      # eq. 4
            loss = F.mse_loss(unet(x_t, t).sample, eps)                                # || ε - ε_θ(x_t, t) ||²

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            ema_update(ema, unet, decay=0.99)       # the script uses 0.999 over many more steps
            losses.append(loss.item())
        print(f"{steps} steps: loss {sum(losses[:10]) / 10:.3f} (first 10) -> {sum(losses[-10:]) / 10:.3f} (last 10)")
        """),
        (CODE, """
        smooth = torch.tensor(losses).unfold(0, 10, 1).mean(dim=1)                   # running mean over 10 steps
        viz.line_plot({"loss": losses, "mean of 10": smooth}, title="training loss", xlabel="step", logy=True);
        """),
        (MD, """
        ## 4. Sampling from what we trained

        After a few hundred steps expect coloured blobs on a flat background: the model learns the colours
        and the background before the shapes. We sample from the raw weights with all 1000 DDPM steps: the
        EMA has not caught up yet (after 200 steps it still holds 0.99^200 ≈ 13% of the random initial
        weights), and a barely trained model needs DDPM's many small steps.
        """),
        (CODE, """
        from minidiff.pipelines import DDPMPipeline
        from minidiff.schedulers import DDIMScheduler

        ours = DDPMPipeline(unet=unet.eval(), scheduler=scheduler)
        ours.set_progress_bar_config(disable=True)
        samples = ours(batch_size=4, generator=setup.generator(0), num_inference_steps=1000).images
        viz.image_grid(samples, titles=[f"ours, {steps} steps"] * 4);
        """),
        (MD, """
        ## 5. The bundled tiny-ddpm

        The same loop (`minidiff/training/train_ddpm.py`), run for a few minutes on a GPU with batches of
        128 and bf16 autocast. Its loss logs ship with the checkpoint (`training_logs/`).
        """),
        (CODE, """
        import os
        from minidiff.core.hub import bundled_path

        bundled = DDPMPipeline.from_pretrained("tiny-ddpm").to(setup.device)
        bundled.set_progress_bar_config(disable=True)
        bundled.scheduler = DDIMScheduler.from_config(bundled.scheduler.config)
        viz.image_grid(bundled(batch_size=4, generator=setup.generator(0), num_inference_steps=50).images,
                       titles=["tiny-ddpm, DDIM 50"] * 4);
        """),
        (CODE, """
        import csv, glob

        logs = sorted(glob.glob(os.path.join(bundled_path("tiny-ddpm"), "training_logs", "*.csv")))
        series = {}
        for path in logs:                                  # one file per training run (the second resumed the first)
            with open(path) as f:
                series[os.path.basename(path)] = [float(row["loss"]) for row in csv.DictReader(f)]
        series["ours"] = losses[::50]
        viz.line_plot(series, title="loss, logged every 50 steps", xlabel="step / 50", logy=True);
        """),
        (MD, """
        ## 6. The script that made it

        `python -m minidiff.training ddpm` runs the loop above with everything a real run needs: the whole
        data set on the device, EMA, a loss log, a resumable training state, and at the end a pipeline folder
        in the hub layout. Twenty steps of it, into a temporary folder, then loaded like any checkpoint:
        """),
        (CODE, """
        import tempfile

        out = tempfile.mkdtemp()
        train_ddpm.main(["--out", out, "--steps", "20", "--num-images", "256", "--batch-size", "8",
                         "--device", setup.device.type, "--warmup", "5"])
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        print(sorted(os.listdir(out)))
        reloaded = DDPMPipeline.from_pretrained(out)
        print(type(reloaded).__name__, type(reloaded.unet).__name__, type(reloaded.scheduler).__name__)
        """),
    ],
    exercises=["Train with the cosine schedule (`beta_schedule=\"squaredcos_cap_v2\"`) for the same number of steps. Does the loss curve change? Do the samples?",
               "Log the loss separately for t < 250 and t > 750. Which noise levels are hard to learn, and why is the loss at small t small?",
               "Sample with `ema` instead of the raw `unet` after training. Which looks better after 200 steps, and after 2000?"],
)
