"""The content of the course notebooks, cell by cell; `build.py` adds the common frame and writes the .ipynb.

Each notebook is a dict: file, number, title, intro, learn (list), cells (list of ("md" | "code", text)),
exercises (list). Code cells whose printed output is deterministic carry `# NBVAL_CHECK_OUTPUT`, so
nbval compares it with the committed output; images are never compared.
"""

NOTEBOOKS = []


def notebook(file, title, intro, learn, cells, exercises):
    NOTEBOOKS.append(dict(file=file, number=len(NOTEBOOKS) + 1, title=title, intro=intro, learn=learn,
                          cells=cells, exercises=exercises))


MD, CODE = "md", "code"

# ---------------------------------------------------------------------------------------------------------
notebook(
    "01_quickstart.ipynb", "Quickstart",
    """
    Two pictures from two one-line pipelines: DDPM draws a cat from pure noise, Stable Diffusion draws what a
    sentence describes. The rest of the course takes both apart, piece by piece.
    """,
    ["how to install minidiff on Colab, Studio Lab or your own machine",
     "how the course chooses between the real hub checkpoints and the tiny bundled ones, and the device",
     "the one-line DDPM pipeline (noise -> image) and Stable Diffusion pipeline (text -> image)",
     "what a pipeline is made of"],
    [
        (MD, """
        ## Choosing models and device

        The same notebook runs in CI on a CPU in seconds and on a GPU with the real checkpoints. Nothing is
        chosen silently: the cell above printed the choice. To force one, set the variables before starting
        Jupyter (or at the top of a notebook, before `course.setup()`):

        | variable | values | default |
        |---|---|---|
        | `MINIDIFF_MODELS` | `tiny`, `hub`, `auto` | `auto`: hub checkpoints with a GPU and a reachable hub, tiny otherwise |
        | `MINIDIFF_DEVICE` | `cpu`, `cuda`, `auto` | `auto`: cuda where there is one |
        | `MINIDIFF_DTYPE` | `float32`, `float16`, `auto` | `auto`: float16 for hub models on a GPU |
        | `MINIDIFF_DDPM`, `MINIDIFF_SD` | a folder or hub repo id | replace the two checkpoints |

        `setup` holds the choice; `setup.pick(tiny=..., hub=...)` picks a setting (a step count, a prompt)
        that suits the chosen checkpoints.
        """),
        (CODE, """
        print("DDPM checkpoint:", setup.ddpm)
        print("SD checkpoint:  ", setup.sd)
        print("runs on", setup.device, "in", setup.dtype)
        """),
        (MD, """
        ## 1. DDPM: noise -> image in one line

        `DDPMPipeline.from_pretrained` reads `model_index.json` from the checkpoint, loads the UNet and the
        scheduler it names, and `pipe(...)` runs the whole sampling loop. A `torch.Generator` makes the noise,
        and so the picture, reproducible: the same seed always gives the same cat.
        """),
        (CODE, """
        from minidiff.pipelines import DDPMPipeline

        ddpm = DDPMPipeline.from_pretrained(setup.ddpm).to(setup.device, setup.dtype)
        ddpm.set_progress_bar_config(disable=True)
        ddpm_steps = 1000                              # DDPM: one step per training timestep
        images = ddpm(batch_size=4, generator=setup.generator(0), num_inference_steps=ddpm_steps).images
        viz.image_grid(images, titles=[f"seed 0, image {i}" for i in range(4)]);
        """),
        (MD, """
        A pipeline is nothing but its parts. Printing them shows the two things every diffusion model needs:
        a network that predicts noise (the UNet) and a scheduler that turns those predictions into steps.
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        print(type(ddpm.unet).__name__, "->", ddpm.unet.config.sample_size, "x", ddpm.unet.config.sample_size,
              "pixels,", ddpm.unet.config.in_channels, "channels")
        print(type(ddpm.scheduler).__name__, "with", ddpm.scheduler.config.num_train_timesteps, "training timesteps")
        print("steps used here:", ddpm_steps)
        """),
        (MD, """
        ## 2. Stable Diffusion: text -> image in one line

        Stable Diffusion adds a text encoder (CLIP) that turns the prompt into numbers, and a VAE: the
        diffusion runs on a small *latent* image that the VAE's decoder turns into pixels at the end.
        The tiny checkpoint was trained on pictures of coloured shapes, so it understands prompts like
        "a large red circle"; the real one understands almost anything. The guidance scale says how hard
        the prompt pulls: about 3 suits the tiny model, 7.5 is Stable Diffusion's default.
        """),
        (CODE, """
        from minidiff.pipelines import StableDiffusionPipeline

        sd = StableDiffusionPipeline.from_pretrained(setup.sd, torch_dtype=setup.dtype,
                                                     safety_checker=None, feature_extractor=None).to(setup.device)
        sd.set_progress_bar_config(disable=True)
        prompt = setup.pick(tiny="a large red circle on a white background",
                            hub="a photograph of an astronaut riding a horse")
        guidance = setup.pick(tiny=3.0, hub=7.5)   # how strongly the prompt steers (notebook 06)
        image = sd(prompt, num_inference_steps=setup.pick(tiny=20, hub=25), guidance_scale=guidance,
                   generator=setup.generator(0)).images[0]
        viz.image_grid([image], titles=[prompt], panel=2.6);
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        for name, part in sd.components.items():
            print(f"{name:13s} {type(part).__name__}")
        print("image size:", image.size)
        """),
        (MD, """
        ## What happened in those two lines

        - **DDPM** started from an image of pure Gaussian noise and removed a bit of noise at each of its
          steps. Notebook 02 writes that loop out and shows every step.
        - **Stable Diffusion** did the same in the VAE's latent space, and at each step asked the UNet twice:
          once with the prompt and once without, then pushed away from the unconditional answer
          (classifier-free guidance, notebook 06). Notebook 07 writes that loop out.
        """),
    ],
    ["Change the seed of the DDPM cell. Which parts of the picture change, and does the same seed give the same image twice?",
     "Run the Stable Diffusion cell with three different prompts. With the tiny model, try a colour or shape it never saw in a caption (say \"an orange star\").",
     "Restart the kernel with `MINIDIFF_DEVICE=cpu` and `MINIDIFF_MODELS=tiny` set (e.g. `%env MINIDIFF_MODELS=tiny` in a first cell) and check that the setup printout says so."],
)

# ---------------------------------------------------------------------------------------------------------
notebook(
    "02_ddpm_apart.ipynb", "Taking the DDPM pipeline apart",
    """
    The DDPM pipeline of notebook 01 is a for-loop over timesteps around a UNet and a scheduler. Here we
    write that loop ourselves, keep every intermediate image, and check that we get exactly the pipeline's
    picture.
    """,
    ["the two parts of a DDPM pipeline: the noise-predicting UNet and the scheduler",
     "what the timesteps tensor is and why it counts down",
     "the denoising loop, written out (Ho et al. 2020, Algorithm 2)",
     "the image x_t and the predicted clean image x0 at every timestep"],
    [
        (MD, """
        ## 1. The model and the scheduler

        The **UNet** ε_θ(x_t, t) looks at a noisy image x_t and the timestep t and predicts the noise ε in
        it. The **scheduler** knows the noise schedule (how much noise there is at each t) and turns the
        prediction into the next, slightly less noisy image.
        """),
        (CODE, """
        from minidiff.pipelines import DDPMPipeline

        pipe = DDPMPipeline.from_pretrained(setup.ddpm).to(setup.device, setup.dtype)
        pipe.set_progress_bar_config(disable=True)
        unet, scheduler = pipe.unet, pipe.scheduler
        print(scheduler)
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        C, S = unet.config.in_channels, unet.config.sample_size
        print(f"UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters, images of {C} x {S} x {S}")
        print("beta schedule:", scheduler.config.beta_schedule, scheduler.config.beta_start, "->", scheduler.config.beta_end)
        """),
        (MD, """
        ## 2. The timesteps

        The model was trained with T noise levels (`num_train_timesteps`). For sampling we pick N of them and
        walk from the noisiest (t close to T) down to t = 0. `set_timesteps(N)` writes them into
        `scheduler.timesteps`.
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        num_steps = scheduler.config.num_train_timesteps   # DDPM takes every one of them
        scheduler.set_timesteps(num_steps)
        print(scheduler.timesteps.shape, scheduler.timesteps.dtype)
        print("first:", scheduler.timesteps[:5].tolist(), " last:", scheduler.timesteps[-5:].tolist())
        """),
        (MD, """
        ## 3. The loop, written out

        Algorithm 2 of Ho et al. (2020): start from x_T ~ N(0, I); at each t predict ε = ε_θ(x_t, t) and let
        the scheduler compute x_{t-1}. `scheduler.step` also returns its estimate of the final image,
        x0_pred = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t): where the model thinks this is going.

        With hundreds of steps we keep 8 of them to look at (`viz.pick_steps`), always the first and the last.
        """),
        (CODE, """
        from minidiff.core.utils import randn_tensor

        generator = setup.generator(0)
        x = randn_tensor((1, C, S, S), generator=generator, device=setup.device, dtype=setup.dtype)  # x_T: (1, C, S, S)
        x = x * scheduler.init_noise_sigma

        keep = set(viz.pick_steps(len(scheduler.timesteps), 8))
        kept_t, kept_x, kept_x0 = [], [], []
        for i, t in enumerate(scheduler.timesteps):
            with torch.no_grad():
                eps = unet(x, t).sample                       # ε_θ(x_t, t): (1, C, S, S)
            out = scheduler.step(eps, t, x, generator=generator)
            x = out.prev_sample                               # x_{t-1}: (1, C, S, S)
            if i in keep:
                kept_t.append(int(t))
                kept_x.append(x[0].float().cpu())
                kept_x0.append(out.pred_original_sample[0].float().cpu())
        print("kept timesteps:", kept_t)
        """),
        (MD, """
        The predicted x0 shows the picture long before x_t does: early on it is a blurry average, then
        details appear as the noise level falls.
        """),
        (CODE, """
        viz.steps_grid({"x_t": kept_x, "predicted x0": kept_x0}, kept_t, num_cols=8);
        """),
        (MD, """
        ## 4. Re-deriving one step by hand

        The predicted x0 follows from eq. 4 of the paper, x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε, solved for
        x_0 (and, where the config says `clip_sample`, clipped to the image range [-1, 1]). Checking it
        against the scheduler's value at one timestep:
        """),
        (CODE, """
        # Run the last step again on a fresh noisy sample, and compute x0 ourselves.
        x_t = randn_tensor((1, C, S, S), generator=setup.generator(1), device=setup.device, dtype=setup.dtype)
        t = scheduler.timesteps[len(scheduler.timesteps) // 2]
        with torch.no_grad():
            eps = unet(x_t, t).sample
        alpha_bar_t = scheduler.alphas_cumprod[int(t)].to(setup.device, setup.dtype)
        mine = (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()
        if scheduler.config.clip_sample:              # this config clips the estimate to the image range
            mine = mine.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
        theirs = scheduler.step(eps, t, x_t, generator=setup.generator(2)).pred_original_sample
        assert torch.allclose(mine, theirs, atol=1e-3), (mine - theirs).abs().max()
        print("x0 by hand equals scheduler.step(...).pred_original_sample at t =", int(t))
        """),
        (MD, """
        ## 5. The final image, and the pipeline's

        Our loop drew the starting noise and the noise of every step from one generator, in the same order
        as the pipeline does, so with the same seed both must give the same image.
        """),
        (CODE, """
        ours = (x / 2 + 0.5).clamp(0, 1)                                            # [-1, 1] -> [0, 1]
        theirs = pipe(generator=setup.generator(0), num_inference_steps=num_steps, output_type="pt").images
        assert torch.allclose(ours, theirs, atol=1e-3), (ours - theirs).abs().max()
        viz.image_grid([ours[0], theirs[0]], titles=["our loop", "DDPMPipeline"], value_range=(0, 1), panel=2.0);
        """),
    ],
    ["Use `num_inference_steps` far below the number of training steps (say 10). What happens to the image, and why does DDPM need many steps (compare with DDIM in notebook 03)?",
     "Plot the norm of `eps` at each step. When does the model think there is most noise left?",
     "Write the DDPM update by hand, x_{t-1} = (x_t - β_t / sqrt(1 - ᾱ_t) · ε) / sqrt(α_t) + σ_t z, and run the loop with z = 0. What does leaving out the fresh noise do to the picture?"],
)

# ---------------------------------------------------------------------------------------------------------
notebook(
    "03_forward_process_and_schedules.ipynb", "The forward process and noise schedules",
    """
    Before a model can remove noise it has to be trained on noised images. The forward process adds noise
    in closed form, at any timestep in one go; the noise schedule says how much. Then every sampler of
    minidiff draws from the same model, side by side.
    """,
    ["the forward process q(x_t | x_0) and `scheduler.add_noise` on a real photo",
     "ᾱ_t, the signal-to-noise ratio and σ_t, and how three beta schedules differ",
     "how samplers (DDPM, DDIM, PNDM, Euler, DPM-Solver++, UniPC) choose their timesteps",
     "what each sampler makes of the same model and the same starting noise"],
    [
        (MD, """
        ## 1. Noising a photo: x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε

        Eq. 4 of Ho et al. (2020): mixing the clean image x_0 with Gaussian noise ε, with weights set by
        ᾱ_t = ∏ (1 - β_s). scikit-image ships a few photos, so this works offline; we use its cat at the
        DDPM model's resolution, in the model's value range [-1, 1].
        """),
        (CODE, """
        from minidiff.pipelines import DDPMPipeline

        pipe = DDPMPipeline.from_pretrained(setup.ddpm).to(setup.device, setup.dtype)
        pipe.set_progress_bar_config(disable=True)
        scheduler = pipe.scheduler
        S, T = pipe.unet.config.sample_size, scheduler.config.num_train_timesteps

        x0 = viz.sample_photo("chelsea", size=S)                      # (1, 3, S, S) in [-1, 1]
        ts = torch.tensor([0, T // 20, T // 10, T // 4, T // 2, 3 * T // 4, T - 1])
        noise = torch.randn((len(ts), 3, S, S), generator=setup.generator(0))
        x_t = scheduler.add_noise(x0.expand(len(ts), -1, -1, -1), noise, ts)   # (7, 3, S, S)
        viz.image_grid(x_t, titles=[f"t={t}" for t in ts.tolist()]);
        """),
        (MD, """
        `add_noise` is one line of the paper; writing it ourselves gives the same tensor:
        """),
        (CODE, """
        alpha_bar = scheduler.alphas_cumprod[ts].view(-1, 1, 1, 1)             # ᾱ_t: (7, 1, 1, 1)
        mine = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        assert torch.allclose(mine, x_t, atol=1e-6)
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        print(" t     alpha_bar_t   SNR_t = ᾱ/(1-ᾱ)")
        for t in ts.tolist():
            ab = scheduler.alphas_cumprod[t].item()
            print(f"{t:4d}   {ab:10.5f}   {ab / (1 - ab):12.4g}")
        """),
        (MD, """
        ## 2. Three schedules

        DDPM's **linear** betas (google/ddpm-cat-256), Stable Diffusion's **scaled_linear** (linear in
        sqrt(β), a gentler start), and the **cosine** schedule of Nichol & Dhariwal (2021) that keeps more
        signal in the middle. The signal-to-noise ratio falls over many orders of magnitude, which is why the
        middle panel is logarithmic; σ_t = sqrt((1-ᾱ_t)/ᾱ_t) is the noise level the Euler-type samplers use.
        """),
        (CODE, """
        from minidiff.schedulers import DDPMScheduler

        schedules = {
            "linear (DDPM)": DDPMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
            "scaled_linear (SD)": DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
            "cosine": DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        }
        viz.plot_training_schedules(schedules);
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        for name, s in schedules.items():
            ab = s.alphas_cumprod
            print(f"{name:20s} ᾱ at t=0: {ab[0]:.5f}  t=500: {ab[500]:.5f}  t=999: {ab[999]:.6f}")
        """),
        (MD, """
        ## 3. Every sampler on the same model

        A scheduler is only the update rule; the trained UNet stays the same. `from_config` builds each
        sampler from the checkpoint's own scheduler config (same betas), so the comparison is fair. First,
        which timesteps each one visits for the same number of steps:
        """),
        (CODE, """
        from minidiff.schedulers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                                         EulerDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler)

        samplers = {cls.__name__.replace("Scheduler", "").replace("Discrete", ""): cls.from_config(scheduler.config)
                    for cls in (DDPMScheduler, DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler,
                                EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler)}
        num_steps = setup.pick(tiny=20, hub=50)
        viz.plot_timesteps(samplers, num_steps);
        """),
        (MD, """
        The same steps as noise levels (`minidiff.schedulers.compare`): ᾱ, log SNR and σ at each step. All
        of them space their timesteps as the config's `timestep_spacing` says, so they start at about the
        same t; PNDM spends its first calls on a Runge-Kutta warm-up (more model calls than steps), and the
        Euler-type samplers scale x by their own σ, so their first x has standard deviation
        `init_noise_sigma` instead of 1.
        """),
        (CODE, """
        viz.plot_sampling_schedules(scheduler.config, [type(s) for s in samplers.values()], num_steps);
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        for name, s in samplers.items():
            s.set_timesteps(num_steps)
            print(f"{name:18s} {len(s.timesteps):3d} model calls, first t = {s.timesteps[0].item():g}, "
                  f"init_noise_sigma = {float(s.init_noise_sigma):.3g}")
        """),
        (MD, """
        Now the pictures: the same seed, so the same starting noise, and `num_steps` steps each. DDPM is
        built for many small steps and suffers most from few; DDIM and the multistep solvers (DPM-Solver++,
        UniPC) are designed for exactly this.
        """),
        (CODE, """
        images = []
        for name, s in samplers.items():
            sampler_pipe = DDPMPipeline(unet=pipe.unet, scheduler=s)
            sampler_pipe.set_progress_bar_config(disable=True)
            images.append(sampler_pipe(generator=setup.generator(0), num_inference_steps=num_steps).images[0])
        viz.image_grid(images, titles=list(samplers), ncols=7);
        """),
        (MD, """
        Where a sampler gives noise, look at `clip_sample`: DDPM's and DDIM's configs set it, so at every step
        they clip the predicted x0 to the image range [-1, 1]. The other samplers never clip. A model's small
        errors in ε become large errors in x0 = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t) where ᾱ_t is tiny
        (1 / sqrt(ᾱ_999) ≈ 157 for this schedule); clipping hides them, the other samplers carry them on.
        A briefly trained model like the tiny one needs the clipping; DDIM without it shows the difference:
        """),
        (CODE, """
        images = []
        for clip in (True, False):
            ddim = DDPMPipeline(unet=pipe.unet, scheduler=DDIMScheduler.from_config(scheduler.config, clip_sample=clip))
            ddim.set_progress_bar_config(disable=True)
            images.append(ddim(generator=setup.generator(0), num_inference_steps=num_steps).images[0])
        viz.image_grid(images, titles=["DDIM, clip_sample=True", "clip_sample=False"], panel=1.8);
        """),
    ],
    ["Noise the photo at t = T/2 with ten different noise draws and average them. What do you get, and why (hint: E[x_t] = sqrt(ᾱ_t) x_0)?",
     "Plot 1 - ᾱ_t for the three schedules: at which t is half of the variance noise?",
     "Run the sampler comparison with 5 and with 100 steps. Which samplers change most?"],
)

# ---------------------------------------------------------------------------------------------------------
notebook(
    "04_inside_the_unet.ipynb", "Inside the UNet",
    """
    The UNet is the only part of a diffusion model that learns. Here we take Stable Diffusion's UNet apart:
    how it hears the timestep, the ResNet and attention blocks it is built from, the down and up paths with
    their skip connections, and how to watch any layer with a forward hook.
    """,
    ["the sinusoidal time embedding and the MLP after it",
     "a ResNet block and a (cross-)attention layer, by hand",
     "the down path, the middle and the up path, with a table of tensor shapes per block",
     "where the skip connections go, and how to read any activation with a forward hook"],
    [
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        from minidiff import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(setup.sd, subfolder="unet", torch_dtype=setup.dtype).to(setup.device)
        cfg = unet.config
        print("block_out_channels:", cfg.block_out_channels, " layers_per_block:", cfg.layers_per_block)
        print("down:", cfg.down_block_types)
        print("up:  ", cfg.up_block_types)
        print("cross_attention_dim:", cfg.cross_attention_dim, " sample_size:", cfg.sample_size)
        """),
        (MD, """
        We follow one input through the network: a batch of one latent (B, 4, h, w) at timestep 500. The text
        embedding is random here, (B, 77, cross_attention_dim): this notebook is about shapes and wiring;
        notebook 06 makes real ones.
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        g = setup.generator(0)
        h = w = cfg.sample_size
        latents = torch.randn((1, cfg.in_channels, h, w), generator=g).to(setup.device, setup.dtype)  # (B, 4, h, w)
        context = torch.randn((1, 77, cfg.cross_attention_dim), generator=g).to(setup.device, setup.dtype)
        t = torch.tensor([500], device=setup.device)
        print("latents:", tuple(latents.shape), " context:", tuple(context.shape), " t:", t.tolist())
        """),
        (MD, """
        ## 1. The time embedding

        The UNet learns one network for all noise levels, so it must be told t. As in the transformer
        (Vaswani et al. 2017), t becomes sines and cosines at geometrically spaced frequencies: nearby
        timesteps get similar vectors and the network can read both coarse and fine differences.
        """),
        (CODE, """
        import math
        from minidiff.blocks.layers import timestep_embedding

        C0 = cfg.block_out_channels[0]
        all_t = torch.arange(0, 1000, 10)
        emb = timestep_embedding(all_t, C0, cfg.flip_sin_to_cos, cfg.freq_shift)          # (100, C0)

        # by hand: freq_i = 10000^(-i / (C0/2 - shift)), then [cos, sin] (SD flips sin and cos)
        half = C0 // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half) / (half - cfg.freq_shift))  # (C0/2,)
        args = all_t[:, None].float() * freqs[None, :]                                    # (100, C0/2)
        mine = torch.cat([args.cos(), args.sin()] if cfg.flip_sin_to_cos else [args.sin(), args.cos()], dim=-1)
        assert torch.allclose(mine, emb, atol=1e-5)
        viz.heatmap(emb, title="timestep_embedding(t)", xlabel="feature", ylabel="t / 10");
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        with torch.no_grad():
            t_emb = timestep_embedding(t, C0, cfg.flip_sin_to_cos, cfg.freq_shift).to(setup.dtype)  # (B, C0)
            temb = unet.time_embedding(t_emb)                                                    # (B, 4*C0)
        print("sinusoidal:", tuple(t_emb.shape), "-> after the MLP:", tuple(temb.shape))
        """),
        (MD, """
        ## 2. A ResNet block

        GroupNorm -> SiLU -> 3x3 conv, plus the projected time embedding added to every pixel, then once
        more, and the input added back (the skip inside the block). The time embedding enters *every*
        ResNet block this way.
        """),
        (CODE, """
        block = unet.down_blocks[0].resnets[0]
        print(block)
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        import torch.nn.functional as F

        with torch.no_grad():
            x = unet.conv_in(latents)                                          # (B, C0, h, w)
            out = block(x, temb)
            # by hand, following ResnetBlock2D.forward
            r = block.conv1(F.silu(block.norm1(x))) + block.time_emb_proj(F.silu(temb))[:, :, None, None]
            r = block.conv2(F.silu(block.norm2(r)))
            mine = x + r if block.conv_shortcut is None else block.conv_shortcut(x) + r
        assert torch.allclose(mine, out, atol=1e-4)
        print("conv_in:", tuple(latents.shape), "->", tuple(x.shape), "; resnet:", tuple(x.shape), "->", tuple(out.shape))
        """),
        (MD, """
        ## 3. Attention

        After each ResNet block of the cross-attention blocks sits a small transformer: self-attention over
        the h*w positions (`attn1`), then cross-attention (`attn2`) where the queries come from the image and
        the keys and values from the text. That is the only place the prompt enters the UNet.
        softmax(Q K^T / sqrt(d)) V, per head, by hand:
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        attn2 = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
        tokens = torch.randn((1, h * w, attn2.to_q.in_features), generator=g).to(setup.device, setup.dtype)  # (B, N, C)
        with torch.no_grad():
            q, k, v = attn2.to_q(tokens), attn2.to_k(context), attn2.to_v(context)   # (B, N, heads*d), (B, 77, heads*d)
            d = q.shape[-1] // attn2.heads
            split = lambda z: z.view(1, -1, attn2.heads, d).transpose(1, 2)          # (B, L, heads*d) -> (B, heads, L, d)
            probs = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(d)).softmax(-1)  # (B, heads, N, 77)
            mine = (probs @ split(v)).transpose(1, 2).reshape(1, h * w, -1)            # (B, N, heads*d)
            mine = attn2.to_out[0](mine)
            theirs = attn2(tokens, context)          # the fused kernel: float16 rounds in another order
        assert torch.allclose(mine, theirs, atol=1e-4 if setup.dtype == torch.float32 else 1e-2)
        print(f"heads={attn2.heads}, d={d}: queries {tuple(q.shape)}, keys {tuple(k.shape)}, "
              f"attention probabilities {tuple(probs.shape)}")
        """),
        (MD, """
        ## 4. The down path, the middle and the up path

        A forward hook is a function PyTorch calls after a module's forward, with its inputs and output.
        One hook per block records the output shape: the resolution halves on the way down, the channels
        grow, and the up path mirrors it back.
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        names = (["conv_in"] + [f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + ["mid_block"]
                 + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))] + ["conv_out"])
        shapes = {}
        hooks = [unet.get_submodule(n).register_forward_hook(
                     lambda module, inputs, output, n=n: shapes.__setitem__(n, tuple(output.shape)))
                 for n in names]
        with torch.no_grad():
            eps = unet(latents, t, encoder_hidden_states=context).sample
        for hook in hooks:
            hook.remove()

        print(f"{'block':14s} {'type':24s} output shape")
        for n in names:
            print(f"{n:14s} {type(unet.get_submodule(n)).__name__:24s} {shapes[n]}")
        """),
        (MD, """
        ## 5. Skip connections

        Every intermediate map of the down path is pushed on a stack (`skips.append(h)` in
        `unet_2d_condition.py`) and each ResNet of the up path pops one and concatenates it to its input
        (`skips.pop()`): last in, first out, so each up level receives the details of the same resolution.
        Pre-hooks (called *before* a forward) on the up ResNets show the concatenated inputs:
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        pushed = ["conv_in"]                                            # the stack, in push order
        for i, blk in enumerate(unet.down_blocks):
            for j in range(len(blk.resnets)):
                pushed.append(f"down_blocks.{i}.{'attentions' if blk.attentions is not None else 'resnets'}.{j}")
            if blk.downsamplers is not None:
                pushed.append(f"down_blocks.{i}.downsamplers.0")

        seen = {}
        hooks = [unet.get_submodule(n).register_forward_hook(
                     lambda m, i, o, n=n: seen.__setitem__(n, tuple(o.shape))) for n in pushed]
        up_resnets = [f"up_blocks.{i}.resnets.{j}" for i, blk in enumerate(unet.up_blocks) for j in range(len(blk.resnets))]
        hooks += [unet.get_submodule(n).register_forward_pre_hook(
                      lambda m, args, n=n: seen.__setitem__(n, tuple(args[0].shape))) for n in up_resnets]
        with torch.no_grad():
            unet(latents, t, encoder_hidden_states=context)
        for hook in hooks:
            hook.remove()

        stack = list(pushed)
        for n in up_resnets:
            skip = stack.pop()
            print(f"{n:22s} input {str(seen[n]):18s} = running map + skip {seen[skip][1]:4d} ch from {skip}")
        assert not stack, "every skip is used once"
        """),
        (MD, """
        ## 6. Watching activations

        Hooks can keep anything: here the standard deviation of every block's output, and a few channels of
        the feature map in the middle of the network, where the resolution is lowest.
        """),
        (CODE, """
        stats, maps = {}, {}
        def keep(name):
            def hook(module, inputs, output):
                stats[name] = output.float().std().item()
                maps[name] = output[0].float().cpu()
            return hook

        hooks = [unet.get_submodule(n).register_forward_hook(keep(n)) for n in names]
        with torch.no_grad():
            unet(latents, t, encoder_hidden_states=context)
        for hook in hooks:
            hook.remove()
        viz.line_plot({"std of the block output": [stats[n] for n in names]}, xticklabels=names, marker="o",
                      title="activation scale along the UNet");
        """),
        (CODE, """
        viz.image_grid(list(maps["mid_block"][:6]), titles=[f"mid ch {c}" for c in range(6)], value_range=None,
                       cmap="viridis");
        """),
    ],
    ["Register a hook on every `attn2` (see `unet.cross_attention_layers()`) and print the shape of its output. How does it depend on the level?",
     "Remove one skip connection: in a hook on an up-block ResNet, zero the skip half of its input (return modified args from a pre-hook). How does the UNet's output change?",
     "Plot the time embedding of t = 0..999 for the first 8 features only. Which features change fastest with t?"],
)

# ---------------------------------------------------------------------------------------------------------
notebook(
    "05_vae_and_latent_space.ipynb", "The VAE and latent space",
    """
    Stable Diffusion does not denoise pixels. A variational autoencoder (VAE) squeezes each 8x8 patch of
    pixels into 4 numbers, the diffusion runs on that small latent image, and the decoder paints the pixels
    back at the end (Rombach et al. 2022). Here we look at those latents.
    """,
    ["how the VAE encodes a photo into a (4, H/8, W/8) latent and decodes it back",
     "the posterior N(mean, std²) and the reparameterisation trick",
     "why latents are multiplied by `scaling_factor` (0.18215 for SD v1)",
     "the reconstruction error, and a cheap 4 -> 3 linear map that previews latents without the decoder"],
    [
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        from minidiff import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(setup.sd, subfolder="vae", torch_dtype=setup.dtype).to(setup.device)
        size = vae.config.sample_size                     # 512 for SD v1
        print("latent_channels:", vae.config.latent_channels, " block_out_channels:", vae.config.block_out_channels)
        print("scaling_factor:", vae.config.scaling_factor, " sample_size:", size)
        """),
        (MD, """
        ## 1. Encode a photo

        The encoder returns a distribution, not a point: a mean and a (log-)variance per latent value. Its
        most likely latent is the mean (`mode()`).
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        photo = viz.sample_photo("astronaut", size).to(setup.device, setup.dtype)     # (1, 3, H, W) in [-1, 1]
        with torch.no_grad():
            posterior = vae.encode(photo).latent_dist
        z = posterior.mode()                                                          # (1, 4, H/8, W/8)
        print("photo:", tuple(photo.shape), "-> latent:", tuple(z.shape))
        print(f"{photo[0].numel()} numbers -> {z[0].numel()}: {photo[0].numel() // z[0].numel()}x fewer")
        """),
        (MD, """
        A sample of the posterior is mean + std · ε (Kingma & Welling 2014, sec. 2.4). The library draws ε
        exactly as we do here, so the same generator gives the same sample:
        """),
        (CODE, """
        from minidiff.core.utils import randn_tensor

        sampled = posterior.sample(setup.generator(0))
        eps = randn_tensor(posterior.mean.shape, generator=setup.generator(0), device=setup.device, dtype=setup.dtype)
        mine = posterior.mean + posterior.std * eps
        assert torch.allclose(mine, sampled)
        print(f"posterior std: mean {posterior.std.float().mean():.4f} (small: the encoder is nearly deterministic)")
        """),
        (MD, """
        ## 2. The four latent channels

        Each channel is an image of h x w numbers. They look like a blurry, oddly coloured copy of the photo:
        the latent still has the photo's layout, which is why a UNet with convolutions works on it.
        """),
        (CODE, """
        viz.image_grid([photo[0]] + list(z[0]), titles=["photo"] + [f"channel {c}" for c in range(4)],
                       value_range=None, cmap="RdBu_r");
        """),
        (MD, """
        ## 3. The scaling factor

        The diffusion model assumes data of roughly unit variance (the noise it adds has variance 1). The
        VAE's latents are larger, so Stable Diffusion multiplies them by a constant measured once on training
        images, `scaling_factor`, before diffusion, and divides by it before decoding.
        """),
        (CODE, """
        sf = vae.config.scaling_factor
        print(f"std of z: {z.float().std():.3f}   std of z * scaling_factor: {(z * sf).float().std():.3f}")
        """),
        (MD, """
        ## 4. Decode, and what was lost

        The VAE is trained to reconstruct, but compressing 48x loses fine detail: small text and faces are
        where SD v1's VAE is known to struggle. And a VAE only reconstructs what resembles its training
        data: the tiny one saw nothing but flat shapes (`minidiff.training.shapes`), so we decode one of
        those beside the photo.
        """),
        (CODE, """
        from minidiff.training import shapes

        drawn = shapes.to_model_range(shapes.ShapesDataset(4, seed=1, resolution=size).tensors()[0])  # (4, 3, H, W)
        pair = torch.cat([photo, drawn[:1].to(setup.device, setup.dtype)])                             # (2, 3, H, W)
        with torch.no_grad():
            recon = vae.decode(vae.encode(pair).latent_dist.mode()).sample  # (2, 3, H, W) in about [-1, 1]
        error = (recon - pair).abs().mean(dim=1)                            # (2, H, W)
        for name, x, y in zip(["photo", "shape"], pair, recon):
            mse = ((y.clamp(-1, 1) - x) / 2).float().pow(2).mean()
            print(f"{name}: PSNR {10 * torch.log10(1 / mse):.1f} dB")
        viz.image_grid([pair[0], recon[0], error[0] * 2 - 1, pair[1], recon[1], error[1] * 2 - 1], ncols=3,
                       titles=["photo", "reconstruction", "|error|", "shape", "reconstruction", "|error|"]);
        """),
        (MD, """
        ## 5. Looking at latents without the decoder

        Decoding costs a large network. For watching a sampler at work a linear map from the 4 channels to
        RGB is good enough. For SD v1 the community measured one (`viz.SD_V1_LATENT_RGB`); for any other VAE,
        such as the tiny one, we fit our own by least squares: encode a few images like the VAE's training
        data (photos for SD, shapes for the tiny one), shrink them to the latent size and solve
        `[latent, 1] @ W = rgb`.
        """),
        (CODE, """
        photos = torch.cat([viz.sample_photo(name, size) for name in viz.SAMPLE_PHOTOS])   # (4, 3, H, W)
        examples = setup.pick(tiny=drawn, hub=photos)
        with torch.no_grad():
            latents = vae.encode(examples.to(setup.device, setup.dtype)).latent_dist.mode() * sf   # (4, 4, h, w)
        factors, bias = viz.fit_latent_rgb(latents, examples)
        same_factors, same_bias = viz.fit_latent_rgb_to_vae(vae, examples)   # the library's one-liner
        assert torch.allclose(factors, same_factors, atol=1e-4) and torch.allclose(bias, same_bias, atol=1e-4)
        print("fitted factors (rows: latent channels; columns: R, G, B):")
        print(factors.numpy().round(3), "\\nbias:", bias.numpy().round(3))
        print("SD v1's published factors:")
        print(torch.tensor(viz.SD_V1_LATENT_RGB).numpy())
        """),
        (CODE, """
        fitted = viz.latents_to_rgb(latents, factors, bias)               # (4, 3, h, w) in [0, 1]
        published = viz.latents_to_rgb(latents)                           # SD v1's matrix
        viz.image_grid(list((examples + 1) / 2) + list(fitted) + list(published), ncols=4, value_range=(0, 1),
                       titles=["image"] * 4 + ["fitted preview"] * 4 + ["SD v1 matrix"] * 4);
        """),
        (MD, """
        The fitted map reproduces the colours of each image at the latent resolution. The published matrix
        only fits the VAE it was measured on: with the real SD v1 VAE both rows look alike, with another VAE
        the colours are wrong.
        """),
    ],
    ["Encode the photo, add Gaussian noise of std 0.1 to the latent and decode. Compare with adding the same noise to the pixels.",
     "Interpolate between the latents of two photos (z = (1-a) z1 + a z2) and decode five steps. Is the halfway image a blend of pixels?",
     "Fit the preview on two photos and test it on the other two. Does the linear map generalise?"],
)

# ---------------------------------------------------------------------------------------------------------
notebook(
    "06_text_conditioning.ipynb", "Text conditioning",
    """
    How does a sentence steer the picture? CLIP's tokenizer turns it into 77 token ids, CLIP's text encoder
    into 77 vectors, and the UNet's cross-attention reads them. Classifier-free guidance then decides how
    hard the prompt pulls.
    """,
    ["how CLIP's tokenizer splits a prompt, and why every prompt becomes exactly 77 tokens",
     "the text embeddings the UNet sees, and the unconditional (empty prompt) embedding",
     "classifier-free guidance: one UNet call on [unconditional; prompt], then extrapolation",
     "what the guidance scale does, in a sweep with one seed"],
    [
        (CODE, """
        from minidiff.pipelines import StableDiffusionPipeline
        from minidiff.pipelines import text

        pipe = StableDiffusionPipeline.from_pretrained(setup.sd, torch_dtype=setup.dtype,
                                                       safety_checker=None, feature_extractor=None).to(setup.device)
        pipe.set_progress_bar_config(disable=True)
        tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
        prompt = setup.pick(tiny="a small blue square at the top left", hub="a photograph of an astronaut riding a horse")
        """),
        (MD, """
        ## 1. Tokens

        CLIP's tokenizer is byte-pair encoding: frequent words are one token, rare ones several pieces.
        `</w>` marks the end of a word. The prompt is framed by a start token and an end token.
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        ids = tokenizer(prompt).input_ids
        print(prompt)
        print(ids)
        print(tokenizer.convert_ids_to_tokens(ids))
        """),
        (MD, """
        ## 2. Padding to 77

        CLIP was trained on 77-token texts, and SD's UNet always sees 77 vectors: the prompt is padded with
        the end token (SD v1) and anything longer is cut off.
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        padded = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt").input_ids                                 # (1, 77)
        assert torch.equal(padded, text.tokenize(tokenizer, [prompt]))                   # the library's version
        print("shape:", tuple(padded.shape), " model_max_length:", tokenizer.model_max_length)
        print("first 12 ids:", padded[0, :12].tolist())
        print("padding token:", tokenizer.pad_token, "=", tokenizer.pad_token_id,
              " padded positions:", int((padded[0, len(ids):] == tokenizer.pad_token_id).sum()))
        """),
        (MD, """
        ## 3. Embeddings

        The text encoder (a 12-layer transformer for SD v1) turns the 77 ids into 77 vectors; the UNet reads
        its last hidden state, (1, 77, 768) for SD v1. Because CLIP's attention is causal, every vector after
        the prompt (even the padding) has seen the whole prompt. (The tiny checkpoint's 2-layer text encoder
        was never trained: its features are random but fixed, and the UNet learned to read them; see its
        model card, `minidiff/checkpoints/tiny-sd/README.md`.)
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        with torch.no_grad():
            emb = text_encoder(padded.to(setup.device))[0]                                 # (1, 77, D)
            assert torch.allclose(emb, text.encode_text(tokenizer, text_encoder, [prompt], setup.device))
        print("embeddings:", tuple(emb.shape))
        """),
        (CODE, """
        viz.line_plot({"prompt": emb[0].float().norm(dim=-1).cpu()}, title="norm of each of the 77 embeddings",
                      xlabel="token position", marker=".");
        """),
        (MD, """
        ## 4. The unconditional embedding

        The empty prompt "" is still 77 tokens: start, end, then padding. Its embedding is what the model
        learned to draw when it is told nothing (SD was trained with 10% of captions dropped).
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        empty = text.tokenize(tokenizer, [""])
        print("ids of '':", empty[0, :6].tolist(), "...")
        with torch.no_grad():
            uncond = text_encoder(empty.to(setup.device))[0]                               # (1, 77, D)
        both = text.prompt_embeddings(tokenizer, text_encoder, [prompt], None, 1, True, setup.device)
        assert torch.allclose(both, torch.cat([uncond, emb]))   # what the pipeline feeds the UNet: [∅; prompt]
        print("with guidance the UNet gets:", tuple(both.shape))
        """),
        (MD, """
        ## 5. Classifier-free guidance

        Ho & Salimans (2022): run the UNet on the unconditional and the conditional embedding and move
        beyond the conditional prediction, away from the unconditional one:

        ε̃ = ε(x_t, ∅) + w · (ε(x_t, prompt) - ε(x_t, ∅))

        w = 1 is the plain conditional model; larger w follows the prompt more closely, at the cost of
        variety (and, far too large, of image quality). One UNet call on the doubled batch does both.
        """),
        (CODE, """
        unet = pipe.unet
        h = w = unet.config.sample_size
        z_t = torch.randn((1, 4, h, w), generator=setup.generator(0)).to(setup.device, setup.dtype)
        t = torch.tensor(500, device=setup.device)
        with torch.no_grad():
            eps = unet(torch.cat([z_t] * 2), t, encoder_hidden_states=both).sample   # (2, 4, h, w)
        eps_uncond, eps_text = eps.chunk(2)
        scale = 7.5
        mine = eps_uncond + scale * (eps_text - eps_uncond)
        assert torch.allclose(mine, text.classifier_free_guidance(eps, scale))
        viz.image_grid([eps_uncond[0, 0], eps_text[0, 0], (eps_text - eps_uncond)[0, 0]], value_range=None,
                       titles=["ε(∅), ch 0", "ε(prompt), ch 0", "difference"], cmap="RdBu_r");
        """),
        (MD, """
        ## 6. A guidance-scale sweep

        Same seed, same prompt, only w changes. With w = 1 the pipeline skips the unconditional pass.
        """),
        (CODE, """
        scales = [1.0, 3.0, 7.5, 12.0]
        images = [pipe(prompt, guidance_scale=s, num_inference_steps=setup.pick(tiny=20, hub=25),
                       generator=setup.generator(0)).images[0] for s in scales]
        viz.image_grid(images, titles=[f"w = {s}" for s in scales]);
        """),
    ],
    ["Tokenize a prompt of 100 words. Which part is cut off, and what does the pipeline warn?",
     "Use a negative prompt (`pipe(prompt, negative_prompt=...)`): which embedding replaces the unconditional one?",
     "Compute the cosine similarity between the embeddings of two prompts that differ in one word. At which positions do they differ, and why do the positions after it change too?"],
)

# ---------------------------------------------------------------------------------------------------------
notebook(
    "07_stable_diffusion_apart.ipynb", "Taking Stable Diffusion apart",
    """
    The whole Stable Diffusion loop, written out as in the diffusers tutorial "Deconstruct the Stable
    Diffusion pipeline", with the scheduler swapped for UniPC (Zhao et al. 2023). We keep the latents of
    every timestep and look at them: the four channels, a cheap RGB preview, the predicted x0, a slider
    and an animation.
    """,
    ["to load the five parts (VAE, tokenizer, text encoder, UNet, scheduler) one by one",
     "the text embeddings with the unconditional ones, the initial latents and the timesteps",
     "the denoising loop with classifier-free guidance, and that it gives exactly the pipeline's image",
     "what the latents look like at every timestep: channels, preview, predicted x0, slider, animation"],
    [
        (MD, """
        ## 1. The five parts

        minidiff loads the VAE, UNet and scheduler; the tokenizer and text encoder are CLIP's, from
        `transformers`. transformers does not know minidiff's bundled checkpoint names, so it is given the
        folder.
        """),
        (CODE, """
        from transformers import CLIPTextModel, CLIPTokenizer
        from minidiff import AutoencoderKL, UNet2DConditionModel, UniPCMultistepScheduler
        from minidiff.core.hub import bundled_path

        folder = bundled_path(setup.sd) or setup.sd           # a folder or a hub repo id, for transformers
        vae = AutoencoderKL.from_pretrained(setup.sd, subfolder="vae", torch_dtype=setup.dtype).to(setup.device)
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=setup.dtype)
        text_encoder = text_encoder.to(setup.device).eval()
        unet = UNet2DConditionModel.from_pretrained(setup.sd, subfolder="unet", torch_dtype=setup.dtype).to(setup.device)
        scheduler = UniPCMultistepScheduler.from_pretrained(setup.sd, subfolder="scheduler")
        """),
        (MD, """
        The checkpoint's own scheduler config is PNDM's; UniPC reads the keys it knows from it (the betas,
        the timestep spacing) and ignores PNDM's own. The settings of this run:
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        prompt = [setup.pick(tiny="a large red circle on a white background",
                             hub="a photograph of an astronaut riding a horse")]
        f = 2 ** (len(vae.config.block_out_channels) - 1)       # 8 pixels per latent
        height = width = unet.config.sample_size * f             # 512 for SD v1
        num_inference_steps = setup.pick(tiny=20, hub=25)
        guidance_scale = setup.pick(tiny=3.0, hub=7.5)
        batch_size = len(prompt)
        print(f"{height}x{width} pixels -> latents {height // f}x{width // f}; {num_inference_steps} steps; w = {guidance_scale}")
        """),
        (MD, """
        ## 2. Text embeddings, unconditional first
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        text_input = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                               return_tensors="pt")
        with torch.no_grad():
            text_embeddings = text_encoder(text_input.input_ids.to(setup.device))[0]           # (1, 77, D)
        uncond_input = tokenizer([""] * batch_size, padding="max_length", max_length=text_input.input_ids.shape[-1],
                                 return_tensors="pt")
        with torch.no_grad():
            uncond_embeddings = text_encoder(uncond_input.input_ids.to(setup.device))[0]       # (1, 77, D)
        text_embeddings = torch.cat([uncond_embeddings, text_embeddings])                     # (2, 77, D)
        print("text_embeddings:", tuple(text_embeddings.shape))
        """),
        (MD, """
        ## 3. The initial latents and the timesteps

        Pure Gaussian noise at latent size. `randn_tensor` draws on the generator's device (the CPU here),
        so the same seed gives the same picture on every machine.
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        from minidiff.core.utils import randn_tensor

        generator = setup.generator(0)
        latents = randn_tensor((batch_size, unet.config.in_channels, height // f, width // f), generator=generator,
                               device=setup.device, dtype=setup.dtype)                       # (1, 4, h, w)
        latents = latents * scheduler.init_noise_sigma
        scheduler.set_timesteps(num_inference_steps)
        print("latents:", tuple(latents.shape))
        print("timesteps:", scheduler.timesteps.tolist())
        """),
        (MD, """
        ## 4. The denoising loop

        At each timestep: duplicate the latents for the two halves of guidance, predict the noise, combine
        the two predictions, and let the scheduler step. We also keep the latents after each step and the
        model's prediction of the clean latent, x0 = (z_t - sqrt(1 - ᾱ_t) ε̃) / sqrt(ᾱ_t).
        """),
        (CODE, """
        from minidiff.schedulers.base import predict_x0

        all_latents, all_x0 = [], []
        for t in scheduler.timesteps:
            latent_model_input = torch.cat([latents] * 2)                                     # (2, 4, h, w)
            latent_model_input = scheduler.scale_model_input(latent_model_input, timestep=t)
            with torch.no_grad():
                noise_pred = unet(latent_model_input, t, encoder_hidden_states=text_embeddings).sample
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)   # (1, 4, h, w)

            alpha_bar_t = scheduler.alphas_cumprod[int(t)].to(setup.device, setup.dtype)
            x0 = (latents - (1 - alpha_bar_t).sqrt() * noise_pred) / alpha_bar_t.sqrt()        # predicted clean latent
            assert torch.allclose(x0, predict_x0(scheduler, latents, noise_pred, t), atol=1e-4)

            latents = scheduler.step(noise_pred, t, latents).prev_sample
            all_latents.append(latents[0].float().cpu())
            all_x0.append(x0[0].float().cpu())
        """),
        (MD, """
        ## 5. Decode, and compare with the pipeline

        Undo the scaling and decode. `StableDiffusionPipeline` built from the same five parts, with the same
        seed, must give the same image: the pipeline is this loop.
        """),
        (CODE, """
        from minidiff.pipelines import StableDiffusionPipeline

        with torch.no_grad():
            image = vae.decode(latents / vae.config.scaling_factor).sample
        image = (image / 2 + 0.5).clamp(0, 1)                                                # (1, 3, H, W) in [0, 1]

        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        theirs = pipe(prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      generator=setup.generator(0), output_type="pt").images
        assert torch.allclose(image, theirs, atol=1e-3), (image - theirs).abs().max()
        viz.image_grid([image[0], theirs[0]], titles=["our loop", "StableDiffusionPipeline"], value_range=(0, 1),
                       panel=2.4);
        """),
        (MD, """
        ## 6. The predicted x0 at every step, decoded

        The VAE's decoder turns each step's predicted clean latent into an image: where the model thinks the
        picture is going.
        """),
        (CODE, """
        timesteps = scheduler.timesteps.tolist()
        x0_decoded = []
        with torch.no_grad():
            for x0 in all_x0:
                decoded = vae.decode(x0[None].to(setup.device, setup.dtype) / vae.config.scaling_factor).sample
                x0_decoded.append(((decoded[0] / 2 + 0.5).clamp(0, 1)).float().cpu())          # (3, H, W) in [0, 1]
        """),
        (MD, """
        ## 7. The latents at every timestep

        Rows are timesteps (noisiest at the top), columns the four latent channels (blue negative, red
        positive), and last a cheap RGB preview: a linear map from the 4 channels to RGB (notebook 05). For
        SD v1 we use the published matrix; for the tiny model we fit one by least squares on this run's own
        pairs of (predicted latent, decoded image), i.e. the best linear stand-in for the decoder.
        """),
        (CODE, """
        if setup.tiny:
            factors, bias = viz.fit_latent_rgb(torch.stack(all_x0), torch.stack(x0_decoded) * 2 - 1)
        else:
            factors, bias = viz.SD_V1_LATENT_RGB, None
        viz.latent_channels_grid(all_latents, timesteps, num_rows=5, rgb_factors=factors, rgb_bias=bias);
        """),
        (MD, """
        The preview of z_t stays noisy until the end, while the predicted x0, previewed or decoded, shows the
        composition after a few steps and then refines it.
        """),
        (CODE, """
        z_preview = viz.latents_to_rgb(torch.stack(all_latents), factors, bias)                  # (S, 3, h, w)
        x0_preview = viz.latents_to_rgb(torch.stack(all_x0), factors, bias)
        viz.steps_grid({"z_t preview": z_preview, "x0 preview": x0_preview, "x0 decoded": x0_decoded},
                       timesteps, num_cols=6, value_range=(0, 1));
        """),
        (MD, """
        ## 8. Scrub through the timesteps

        Drag the slider (in Jupyter; where widgets cannot be shown, e.g. on GitHub, a static strip is drawn
        instead).
        """),
        (CODE, """
        viz.timestep_slider(x0_decoded, timesteps, value_range=(0, 1))
        """),
        (MD, """
        ## 9. An animation

        The decoded x0 of the steps, as a looping GIF (at most 16 frames, to stay small).
        """),
        (CODE, """
        viz.show_gif(x0_decoded, value_range=(0, 1), side=128)
        """),
    ],
    ["Swap UniPC for `DDIMScheduler` or `EulerDiscreteScheduler` (`from_pretrained(setup.sd, subfolder='scheduler')`) and rerun. Does the loop need to change? Look at `scale_model_input` and `init_noise_sigma`.",
     "Set `guidance_scale = 1` and drop the unconditional half from the loop. How much faster is it, and how does the image change?",
     "Start from the latents of step 5 with a different prompt for the remaining steps. Which features of the image survive?"],
)

# ---------------------------------------------------------------------------------------------------------
notebook(
    "08_reusing_seeds.ipynb", "Reusing seeds",
    """
    A seed fixes the starting noise, and the starting noise fixes most of the picture. Lists of generators
    make every image of a batch reproducible on its own, so you can browse a batch, pick one, and then
    refine its prompt while keeping its composition.
    """,
    ["why one generator for a batch ties each image to its position in the batch",
     "a list of generators: image i depends on generator i alone",
     "picking one image of a batch and regenerating it alone, exactly",
     "refining the prompt with the same seed, and passing `latents=` yourself"],
    [
        (CODE, """
        from minidiff.pipelines import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(setup.sd, torch_dtype=setup.dtype,
                                                       safety_checker=None, feature_extractor=None).to(setup.device)
        pipe.set_progress_bar_config(disable=True)
        prompt = setup.pick(tiny="a large circle", hub="a photograph of a cat sitting on a sofa")
        steps, guidance = setup.pick(tiny=20, hub=25), setup.pick(tiny=3.0, hub=7.5)
        # A batch of 4 and a batch of 1 may take other GPU kernels (and TF32, or float16, rounding): allow for it.
        tolerance = 1e-4 if setup.device.type == "cpu" else 2e-2
        """),
        (MD, """
        ## 1. A batch with one generator per image

        `generator=[g0, g1, g2, g3]`: the starting noise of image i is drawn from g_i alone
        (`minidiff.core.utils.randn_tensor`), and so are the random draws of the scheduler for it.
        """),
        (CODE, """
        seeds = [0, 1, 2, 3]
        batch = pipe([prompt] * 4, generator=[setup.generator(s) for s in seeds], num_inference_steps=steps,
                     guidance_scale=guidance, output_type="pt").images                                           # (4, 3, H, W) in [0, 1]
        viz.image_grid(batch, titles=[f"seed {s}" for s in seeds], value_range=(0, 1));
        """),
        (MD, """
        ## 2. Picking one and making it again, alone
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        pick = 2
        alone = pipe(prompt, generator=setup.generator(seeds[pick]), num_inference_steps=steps, guidance_scale=guidance,
                     output_type="pt").images
        assert torch.allclose(batch[pick], alone[0], atol=tolerance), (batch[pick] - alone[0]).abs().max()
        print(f"image {pick} of the batch == the image made alone with seed {seeds[pick]}")
        """),
        (MD, """
        With a single generator for the whole batch, the noise of image 2 is whatever comes third out of one
        stream: it depends on the batch size and position, and cannot be made alone with any seed.
        """),
        (CODE, """
        one_gen = pipe([prompt] * 4, generator=setup.generator(0), num_inference_steps=steps, guidance_scale=guidance,
                       output_type="pt").images
        print(f"largest pixel difference to the image made alone: {(one_gen[pick] - alone[0]).abs().max():.2f}")
        viz.image_grid([one_gen[pick], alone[0]], titles=["batch, one generator", f"alone, seed {seeds[pick]}"],
                       value_range=(0, 1));
        """),
        (MD, """
        ## 3. Refining the prompt with the same seed

        Keep the seed of the picked image and change the words: the starting noise stays the same, so layout
        and colours tend to survive while the content follows the new prompt.
        """),
        (CODE, """
        prompts = setup.pick(
            tiny=["a large circle", "a large red circle", "a large red circle on a black background",
                  "a large red square on a black background"],
            hub=["a photograph of a cat sitting on a sofa", "a photograph of a ginger cat sitting on a sofa",
                 "a photograph of a ginger cat wearing a hat, sitting on a sofa",
                 "an oil painting of a ginger cat wearing a hat, sitting on a sofa"])
        refined = [pipe(p, generator=setup.generator(seeds[pick]), num_inference_steps=steps, guidance_scale=guidance).images[0]
                   for p in prompts]
        viz.image_grid(refined, titles=[p[-28:] for p in prompts]);
        """),
        (MD, """
        ## 4. Passing the latents yourself

        A seed is only a way to make the initial latents. Drawing them yourself and passing `latents=` gives
        the same image, and lets you edit the noise directly (e.g. interpolate between two seeds).
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        from minidiff.core.utils import randn_tensor

        h = w = pipe.unet.config.sample_size
        z_T = randn_tensor((1, 4, h, w), generator=setup.generator(seeds[pick]), device=setup.device, dtype=setup.dtype)
        mine = pipe(prompt, latents=z_T, num_inference_steps=steps, guidance_scale=guidance, output_type="pt").images
        assert torch.allclose(mine, alone, atol=tolerance)
        print("initial latents:", tuple(z_T.shape), "-> the same image as seed", seeds[pick])
        """),
    ],
    ["Interpolate between the initial latents of seeds 0 and 1. Linear interpolation shrinks the noise's norm; try spherical interpolation (slerp) instead and compare.",
     "Make a batch of 8 with seeds 0..7, pick your favourite, and generate it again at twice the number of steps. How much changes?",
     "Does `num_images_per_prompt=4` with a list of 4 generators give the same images as four prompts? Check it."],
)

# ---------------------------------------------------------------------------------------------------------
notebook(
    "09_image_to_image.ipynb", "Image-to-image",
    """
    Image-to-image (SDEdit, Meng et al. 2022) starts the loop not from pure noise but from a real image,
    encoded and noised to an intermediate timestep. `strength` says how far: a little noise keeps the
    image, a lot lets the prompt take over.
    """,
    ["how the starting latent is made: encode, scale, `add_noise` to the first kept timestep",
     "why strength s runs only the last int(s · N) of the N steps",
     "a strength sweep with one seed",
     "the latents at every step of one image-to-image run"],
    [
        (CODE, """
        from minidiff.pipelines import StableDiffusionImg2ImgPipeline

        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(setup.sd, torch_dtype=setup.dtype,
                                                              safety_checker=None, feature_extractor=None).to(setup.device)
        pipe.set_progress_bar_config(disable=True)
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        init = (viz.sample_photo("chelsea", size) + 1) / 2                         # (1, 3, H, W) in [0, 1]
        prompt = setup.pick(tiny="a large yellow circle on a gray background", hub="a watercolor painting of a tiger")
        steps, guidance = setup.pick(tiny=20, hub=25), setup.pick(tiny=3.0, hub=7.5)
        viz.image_grid(init, titles=["input"], value_range=(0, 1), panel=2.0);
        """),
        (MD, """
        ## 1. Which steps run

        Of the N timesteps only the last int(strength · N) run: the image is noised to the first of them.
        (PNDM, this checkpoint's scheduler, repeats its second timestep for its warm-up, so its list has
        N + 1 entries and a run makes one model call more.)
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        pipe.scheduler.set_timesteps(steps)
        strengths = [0.2, 0.4, 0.6, 0.8, 1.0]
        for s in strengths:
            run = int(steps * s)
            print(f"strength {s}: {run:2d} of {steps} steps, starting at t = {pipe.scheduler.timesteps[steps - run].item()}")
        """),
        (MD, """
        ## 2. A strength sweep
        """),
        (CODE, """
        images = [pipe(prompt, init, strength=s, num_inference_steps=steps, guidance_scale=guidance,
                       generator=setup.generator(0)).images[0]
                  for s in strengths]
        viz.image_grid([init[0] * 2 - 1] + images, titles=["input"] + [f"strength {s}" for s in strengths]);
        """),
        (MD, """
        ## 3. The starting latent, by hand

        Encode the image, take a sample of the posterior, multiply by the scaling factor, then `add_noise` at
        the first kept timestep (Ho et al. 2020, eq. 4). The pipeline draws the posterior sample and the
        noise from the generator in this order, so our latent equals the one it started from.
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        from minidiff.core.utils import randn_tensor

        strength = 0.6
        out = pipe(prompt, init, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                   generator=setup.generator(0), return_intermediates=True)
        steps_run = int(steps * strength)
        t_start = pipe.scheduler.timesteps[(steps - steps_run) * pipe.scheduler.order]

        g = setup.generator(0)
        with torch.no_grad():
            z0 = pipe.vae.encode((init * 2 - 1).to(setup.device, setup.dtype)).latent_dist.sample(g)
        z0 = z0 * pipe.vae.config.scaling_factor                                         # (1, 4, h, w)
        noise = randn_tensor(z0.shape, generator=g, device=setup.device, dtype=setup.dtype)
        start = pipe.scheduler.add_noise(z0, noise, t_start[None])
        assert torch.allclose(start, out.intermediates.initial_latents, atol=1e-4)
        print(f"started at t = {t_start.item()} and ran {len(out.intermediates.timesteps)} steps")
        """),
        (MD, """
        ## 4. Every step of that run

        The latents of each step (with the preview map fitted to this VAE) and the decoded predictions of x0.
        """),
        (CODE, """
        inter = out.intermediates
        timesteps = [int(t) for t in inter.timesteps]
        with torch.no_grad():
            x0_decoded = [(pipe.decode(x0)[0] / 2 + 0.5).clamp(0, 1).float().cpu() for x0 in inter.x0]   # (3, H, W)
        latents = [z[0].float().cpu() for z in inter.latents]                                         # (4, h, w)
        if setup.tiny:   # the preview fitted to this run's (latent, decoded image) pairs, as in notebook 07
            factors, bias = viz.fit_latent_rgb(torch.stack([x0[0].float().cpu() for x0 in inter.x0]),
                                               torch.stack(x0_decoded) * 2 - 1)
        else:
            factors, bias = viz.SD_V1_LATENT_RGB, None
        viz.latent_channels_grid(latents, timesteps, num_rows=4, rgb_factors=factors, rgb_bias=bias);
        """),
        (CODE, """
        viz.steps_grid({"x0 decoded": x0_decoded}, timesteps, num_cols=6, value_range=(0, 1));
        """),
    ],
    ["Use strength 1.0 and compare with text-to-image from the same seed. Is the input image used at all?",
     "Run image-to-image on its own output five times at strength 0.3. Where does the picture drift?",
     "With strength 0.5, change `num_inference_steps` from 10 to 50. Which timestep does the run start at, and why does it barely move?"],
)

# ---------------------------------------------------------------------------------------------------------
# Notebook 10 (training) is defined in course_training.py, imported at the end of this file, so that
# the order of NOTEBOOKS stays the order of the course.
ATTENTION = dict(
    file="11_looking_at_attention.ipynb", title="Looking at attention",
    intro="""
    Where does the word "red" go? Every cross-attention layer of the UNet computes, for each position of its
    feature map, a probability over the 77 text tokens. Switching on minidiff's capture switch keeps those
    probabilities, and averaging them over heads and layers gives one map per token (as in
    prompt-to-prompt, Hertz et al. 2022).
    """,
    learn=["the capture switch `store_attention_probs` on minidiff's `Attention` layers",
           "what the (B, heads, h*w, 77) attention probabilities are, re-derived by hand",
           "cross-attention maps per prompt token over the final image",
           "how the maps form over the timesteps"],
    cells=[
        (CODE, """
        from minidiff.pipelines import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(setup.sd, torch_dtype=setup.dtype,
                                                       safety_checker=None, feature_extractor=None).to(setup.device)
        pipe.set_progress_bar_config(disable=True)
        prompt = setup.pick(tiny="a large red circle on a black background",
                            hub="a photograph of a cat wearing a red hat")
        steps, guidance = setup.pick(tiny=20, hub=25), setup.pick(tiny=3.0, hub=7.5)
        """),
        (MD, """
        ## 1. The tokens

        Attention maps are per token, so first the tokens of the prompt and their positions.
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        ids = pipe.tokenizer(prompt).input_ids
        words = [tok.replace("</w>", "") for tok in pipe.tokenizer.convert_ids_to_tokens(ids)]
        print(list(enumerate(words)))
        """),
        (MD, """
        ## 2. The capture switch

        `unet.cross_attention_layers()` lists every `attn2`, by its checkpoint name. With
        `store_attention_probs = True` a layer computes softmax(Q K^T / sqrt(d)) explicitly (instead of the
        fused kernel) and keeps it on `layer.attention_probs`.
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        layers = pipe.unet.cross_attention_layers()
        for layer in layers.values():
            layer.store_attention_probs = True
        print(len(layers), "cross-attention layers, e.g.", list(layers)[:2])
        """),
        (MD, """
        One UNet call, and a forward pre-hook on one layer to see its inputs, lets us re-derive the stored
        probabilities by hand:
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        import math
        from minidiff.pipelines import text

        name, layer = next(iter(layers.items()))
        seen = {}
        hook = layer.register_forward_pre_hook(lambda m, args: seen.update(x=args[0], context=args[1]))
        emb = text.prompt_embeddings(pipe.tokenizer, pipe.text_encoder, [prompt], None, 1, True, setup.device)  # (2, 77, D)
        h = w = pipe.unet.config.sample_size
        z = torch.randn((2, 4, h, w), generator=setup.generator(0)).to(setup.device, setup.dtype)
        with torch.no_grad():
            pipe.unet(z, 500, encoder_hidden_states=emb)
        hook.remove()

        x, context = seen["x"], seen["context"]                               # (2, N, C), (2, 77, D)
        q, k = layer.to_q(x), layer.to_k(context)
        d = q.shape[-1] // layer.heads
        q = q.view(2, -1, layer.heads, d).transpose(1, 2).float()            # (2, heads, N, d)
        k = k.view(2, -1, layer.heads, d).transpose(1, 2).float()            # (2, heads, 77, d)
        probs = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(dim=-1)     # (2, heads, N, 77)
        assert torch.allclose(probs, layer.attention_probs, atol=1e-4)
        print(name, "attention_probs:", tuple(layer.attention_probs.shape), "(B, heads, positions, tokens)")
        """),
        (MD, """
        ## 3. Maps for every step of a generation

        The pipeline's `callback(i, t, latents, x0)` runs after each step, when every layer still holds the
        probabilities of that step's UNet call. We average heads and layers (`viz.aggregate_cross_attention`)
        and keep the conditional half of the guidance batch (the unconditional prompt comes first).
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        latent_hw = (h, w)
        per_step, step_t = [], []

        def collect(i, t, latents, x0):
            maps = viz.aggregate_cross_attention([l.attention_probs for l in layers.values()], latent_hw)  # (2, 77, h, w)
            per_step.append(maps[1])                                          # the prompt's half: (77, h, w)
            step_t.append(int(t))

        out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=setup.generator(0),
                   callback=collect)
        image = out.images[0]
        maps = torch.stack(per_step)                                          # (steps, 77, h, w)
        print("maps:", tuple(maps.shape))
        """),
        (MD, """
        ## 4. One map per word, over the image

        Averaged over all steps, and each map stretched to its own range: the maps show *where* a token is
        read, not how much (printed below).
        """),
        (CODE, """
        positions = list(range(1, len(words) - 1))                            # the words, without start and end
        mean_maps = maps.mean(dim=0)                                          # (77, h, w)
        viz.attention_overlay(image, mean_maps[positions], [words[p] for p in positions]);
        """),
        (CODE, """
        share = mean_maps.mean(dim=(1, 2))                                    # (77,) average probability per token
        print(f"of the attention: start token {share[0]:.2f}, the words {share[1:len(words) - 1].sum():.2f}, "
              f"end and padding tokens {share[len(words) - 1:].sum():.2f}")
        """),
        (MD, """
        Much of the attention goes to tokens that are no word at all. In SD v1 the start token is known to
        take most of it (an "attention sink": a place to put attention when no word is relevant); which
        tokens play that part depends on the model.
        """),
        (MD, """
        ## 5. Over the timesteps

        The maps of the two words whose average maps are most concentrated (largest spread between their
        brightest and darkest places) through the run, each panel stretched to its own range.
        """),
        (CODE, """
        peaked = sorted(positions, key=lambda p: float(mean_maps[p].max() - mean_maps[p].min()), reverse=True)
        chosen = sorted(peaked[:2])
        viz.steps_grid({words[p]: list(maps[:, p]) for p in chosen}, step_t, num_cols=6, value_range=None, cmap="inferno");
        """),
        (CODE, """
        for layer in layers.values():                                        # back to the fast fused kernel
            layer.store_attention_probs = False
            layer.attention_probs = None
        """),
    ],
    exercises=["Show the maps of each layer separately instead of averaging. Which resolution gives the sharpest maps?",
               "Generate with two prompts that differ in one word and the same seed. Do the maps of the shared words move?",
               "Scale up the attention to one token (multiply its column of the probabilities in a hook and renormalise). Does the object grow?"],
)

from course_training import TRAINING  # noqa: E402

# Notebooks 12-16 (controlled generation, minidiff/control/) each have their own file.
from course_control_12_prompts import SPEC as PROMPTS  # noqa: E402
from course_control_13_guidance import SPEC as GUIDANCE  # noqa: E402
from course_control_14_layout import SPEC as LAYOUT  # noqa: E402
from course_control_15_editing import SPEC as EDITING  # noqa: E402
from course_control_16_attention_editing import SPEC as ATTENTION_EDITING  # noqa: E402

for spec in (TRAINING, ATTENTION, PROMPTS, GUIDANCE, LAYOUT, EDITING, ATTENTION_EDITING):
    notebook(spec["file"], spec["title"], spec["intro"], spec["learn"], spec["cells"], spec["exercises"])
