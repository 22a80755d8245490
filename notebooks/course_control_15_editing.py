"""The cells of notebook 15 (DDIM inversion and DiffEdit); see course_cells.py."""

MD, CODE = "md", "code"

SPEC = dict(
    file="15_ddim_inversion_and_diffedit.ipynb", title="DDIM inversion and DiffEdit",
    intro="""
    To edit a picture you have, you first need the noise it came from. Deterministic DDIM is an ODE solver,
    so its steps can run backwards, from the image to the noise ([Song et al. 2021](https://arxiv.org/abs/2010.02502),
    sec. 4.3; [Mokady et al. 2022](https://arxiv.org/abs/2211.09794)): sampling from that noise gives the
    image back. DiffEdit ([Couairon et al. 2022](https://arxiv.org/abs/2210.11427)) builds an editor on it:
    it finds *where* the edit should happen by comparing the model's noise predictions for two prompts,
    inverts the image, and regenerates only inside that mask.
    """,
    learn=["DDIM run backwards: `DDIMInverseScheduler`, one step re-derived by hand",
           "`ddim_invert`: the inverted latents of every step, and how well sampling returns to the image",
           "DiffEdit's mask from the difference of two noise predictions, re-derived by hand",
           "the three calls of `StableDiffusionDiffEditPipeline`: `generate_mask`, `invert`, and the masked "
           "regeneration, with the latents of every step"],
    cells=[
        (CODE, """
        from minidiff import DDIMScheduler, StableDiffusionPipeline
        from minidiff.control.diffedit import StableDiffusionDiffEditPipeline
        from minidiff.control.inversion import ddim_invert, relative_error
        from minidiff.schedulers.ddim_inverse import DDIMInverseScheduler

        pipe = StableDiffusionDiffEditPipeline.from_pretrained(setup.sd, torch_dtype=setup.dtype,
                                                               safety_checker=None, feature_extractor=None).to(setup.device)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)          # inversion needs deterministic DDIM
        pipe.inverse_scheduler = DDIMInverseScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        plain = StableDiffusionPipeline(**pipe.components)                        # the same models, text-to-image
        plain.set_progress_bar_config(disable=True)

        source = setup.pick(tiny="a red circle", hub="a bowl of fruits")
        target = setup.pick(tiny="a blue circle", hub="a bowl of pears")
        steps, guidance = setup.pick(tiny=20, hub=50), setup.pick(tiny=3.0, hub=7.5)

        # The picture to edit: one the model drew from the source prompt (any photo works the same way).
        z0 = plain(source, num_inference_steps=steps, guidance_scale=guidance, generator=setup.generator(4),
                   output_type="latent").images                                  # (1, 4, h, w)
        with torch.no_grad():
            image = (pipe.decode(z0) / 2 + 0.5).clamp(0, 1)                       # (1, 3, H, W) in [0, 1]
        viz.image_grid(image, titles=[source], value_range=(0, 1), panel=2.0);
        """),
        (MD, """
        ## 1. DDIM, backwards

        A DDIM step (η = 0, Song et al. 2021, eq. 12) predicts x̂_0 and ε at level t and writes the sample at
        the lower level t-1. Swap the roles of t-1 and t+1 and the same formula climbs up:

            x̂_0 = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t),        x_{t+1} = sqrt(ᾱ_{t+1}) x̂_0 + sqrt(1 - ᾱ_{t+1}) ε

        The only catch: ε should be ε_θ(x_{t+1}, t+1), which is what we are computing. Inversion uses
        ε_θ(x_t, t+1) instead, a small error per step that shrinks with more steps. `DDIMInverseScheduler`
        visits DDIM's timesteps in reverse:
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
        inverse.set_timesteps(steps)
        pipe.scheduler.set_timesteps(steps)
        print("DDIM sampling :", pipe.scheduler.timesteps[:4].tolist(), "...", pipe.scheduler.timesteps[-2:].tolist())
        print("DDIM inversion:", inverse.timesteps[:4].tolist(), "...", inverse.timesteps[-2:].tolist())
        print("reversed:", torch.equal(inverse.timesteps, pipe.scheduler.timesteps.flip(0)))
        """),
        (MD, """
        One inverse step by hand, from z_0 to the first timestep. Before the first step there is no
        timestep, so ᾱ of "t = -1" is `initial_alpha_cumprod` (ᾱ_0 for Stable Diffusion's
        `set_alpha_to_one=False`).
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        from minidiff.pipelines import text

        cond = text.prompt_embeddings(pipe.tokenizer, pipe.text_encoder, [source], None, 1, False, setup.device)  # (1, 77, D)
        t_next = inverse.timesteps[0]
        with torch.no_grad():
            eps = pipe.unet(z0, t_next, encoder_hidden_states=cond).sample         # ε_θ(z_0, t_1)
        alpha_bar_t = inverse.initial_alpha_cumprod
        alpha_bar_next = inverse.alphas_cumprod[t_next]
        x0_pred = (z0 - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()
        mine = alpha_bar_next.sqrt() * x0_pred + (1 - alpha_bar_next).sqrt() * eps
        assert torch.allclose(mine, inverse.step(eps, t_next, z0).prev_sample, atol=1e-5)
        print(f"one step up to t = {t_next.item()}: {tuple(mine.shape)}")
        """),
        (MD, """
        ## 2. Invert the whole way, then sample back

        `ddim_invert` runs all the steps, without guidance (guidance_scale = 1: classifier-free guidance
        amplifies the per-step error, Mokady et al. 2022, sec. 3). The latents of every step are kept, from
        the image's latent (top) to the inverted noise (bottom). Look at the last row: the circle is still
        there. Inverted noise is not a fresh Gaussian draw; it carries the image's layout, which is exactly
        what lets DDIM find its way back.
        """),
        (CODE, """
        inverted = ddim_invert(pipe, source, latents=z0, num_inference_steps=steps, guidance_scale=1.0)
        inter = inverted.intermediates
        timesteps = [int(t) for t in inter.timesteps]
        viz.latent_channels_grid([z[0] for z in inter.latents], timesteps, num_rows=4);
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        print("steps:", len(inter.latents), " timesteps:", timesteps[:3], "...", timesteps[-1],
              " z_T:", tuple(inverted.latents.shape))
        """),
        (MD, """
        Now sample with ordinary DDIM from the inverted noise, with the same prompt and guidance 1, and
        compare with sampling from fresh noise. The reconstruction error is the relative error
        ‖ẑ_0 - z_0‖ / ‖z_0‖ of the latents.
        """),
        (CODE, """
        back = plain(source, latents=inverted.latents, num_inference_steps=steps, guidance_scale=1.0, output_type="latent").images
        fresh = plain(source, num_inference_steps=steps, guidance_scale=1.0, generator=setup.generator(1),
                      output_type="latent").images
        print(f"reconstruction error from the inverted noise: {relative_error(back, z0):.2f}")
        print(f"                   ...from fresh noise      : {relative_error(fresh, z0):.2f}")
        with torch.no_grad():
            shown = torch.cat([pipe.decode(z) for z in (z0, back, fresh)])
        viz.image_grid(shown, titles=["input", "from inverted noise", "from fresh noise"], panel=2.0);
        """),
        (MD, """
        ## 3. DiffEdit, step 1: where to edit

        Noise the image halfway (`mask_encode_strength` = 0.5) and ask the model for the noise twice, once
        with the source prompt and once with the target prompt. Where the two prompts agree (the
        background), the predictions agree; where they differ, the model would draw something else.
        Averaging |ε_target - ε_source| over a few noise draws and the channels, clamping at 3x its mean and
        thresholding at 0.5 gives a binary mask at latent resolution. By hand, with the same random
        numbers as `generate_mask`:
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        from minidiff.core.utils import randn_tensor

        n = 10                                                    # noise draws (num_maps_per_mask)
        mask = pipe.generate_mask(image=image, source_prompt=source, target_prompt=target, num_maps_per_mask=n,
                                  num_inference_steps=steps, guidance_scale=guidance, generator=setup.generator(1))

        g = setup.generator(1)
        pipe.scheduler.set_timesteps(steps)
        t = pipe.scheduler.timesteps[steps - int(0.5 * steps)]    # the first of the last 50% of the timesteps
        with torch.no_grad():
            pixels = (image * 2 - 1).repeat(n, 1, 1, 1).to(setup.device, setup.dtype)              # (n, 3, H, W)
            z = pipe.vae.encode(pixels).latent_dist.sample(g) * pipe.vae.config.scaling_factor     # (n, 4, h, w)
            z_t = pipe.scheduler.add_noise(z, randn_tensor(z.shape, generator=g, device=setup.device,
                                                           dtype=setup.dtype), t)
            emb = torch.cat([text.prompt_embeddings(pipe.tokenizer, pipe.text_encoder, [p], None, n, True, setup.device)
                             for p in (source, target)])                                      # (4n, 77, D)
            eps = pipe.unet(torch.cat([z_t] * 4), t, encoder_hidden_states=emb).sample           # (4n, 4, h, w)
            eps_source, eps_target = (text.classifier_free_guidance(e, guidance) for e in eps.chunk(2))  # (n, 4, h, w)
            difference = (eps_target - eps_source).abs().mean(dim=(0, 1))                      # (h, w)
        clamp = difference.mean() * 3.0                                   # mask_thresholding_ratio = 3
        mine = (difference.clamp(0, clamp) / clamp > 0.5).float().cpu()
        agree = int((mine == torch.as_tensor(mask[0])).sum())
        assert agree >= 0.99 * mine.numel()        # equal on the CPU; a GPU may round a borderline position apart
        print("mask:", mask.shape, f"-> {int(mask.sum())} of {mask[0].size} latent positions to edit;",
              f"by hand: the same at {agree} of {mine.numel()}")
        """),
        (CODE, """
        viz.attention_overlay(image, torch.stack([difference.float().cpu(), mine]),
                              ["|eps_target - eps_source|", "mask"], value_range=(0, 1), panel=2.0);
        """),
        (MD, """
        ## 4. DiffEdit, step 2: invert the image

        `invert` is `ddim_invert` on the pixels (encoded by the VAE), with guidance, stopped at
        `inpaint_strength` = 0.8 of the way: the edit does not need to start from pure noise. It returns the
        latents of every step, noisiest first, the order in which the edit will use them.
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        inversion = pipe.invert(prompt=source, image=image, num_inference_steps=steps, guidance_scale=guidance,
                                generator=setup.generator(2))
        image_latents = inversion.latents
        edit_timesteps = pipe.scheduler.timesteps[steps - int(0.8 * steps):]
        print("inverted latents:", tuple(image_latents.shape), "(B, steps, 4, h, w); the edit runs from t =",
              edit_timesteps[0].item())
        """),
        (CODE, """
        viz.latent_channels_grid(image_latents[0], edit_timesteps, num_rows=4);
        """),
        (MD, """
        ## 5. DiffEdit, step 3: regenerate inside the mask

        DDIM sampling with the *target* prompt from the most inverted latents. After every step, outside the
        mask the latents are replaced by the inverted latents of that step, z ← M·z + (1 - M)·z_inv, so the
        background walks back along its own inversion path while the inside is redrawn. Without the mask
        (M = 1 everywhere) the whole picture changes.
        """),
        (CODE, """
        settings = dict(image_latents=image_latents, num_inference_steps=steps, guidance_scale=guidance, output_type="pt")
        edited = pipe(prompt=target, mask_image=mask, return_intermediates=True, **settings)
        unmasked = pipe(prompt=target, mask_image=torch.ones_like(torch.as_tensor(mask)), **settings)
        viz.image_grid(torch.cat([image, edited.images, unmasked.images]), value_range=(0, 1), panel=2.0,
                       titles=["input", f"DiffEdit: {target}", "no mask (M = 1)"]);
        """),
        (CODE, """
        import torch.nn.functional as F

        M = F.interpolate(torch.as_tensor(mask)[None].float(), size=image.shape[-2:])[0, 0]        # (h, w) -> (H, W)
        for name, out in (("DiffEdit", edited.images), ("no mask", unmasked.images)):
            change = (out.float().cpu() - image.float().cpu()).abs().mean(dim=1)[0]               # (H, W)
            inside, outside = (change * M).sum() / M.sum(), (change * (1 - M)).sum() / (1 - M).sum()
            print(f"{name:9s} mean change inside the mask {inside:.2f}, outside {outside:.2f}")
        """),
        (MD, """
        The latents of every step of the edit, and the model's prediction of x0 at each step: the background
        is fixed from the first step, the inside changes colour.
        """),
        (CODE, """
        inter = edited.intermediates
        with torch.no_grad():
            x0_decoded = [(pipe.decode(x0)[0] / 2 + 0.5).clamp(0, 1).float().cpu() for x0 in inter.x0]
            z_decoded = [(pipe.decode(z)[0] / 2 + 0.5).clamp(0, 1).float().cpu() for z in inter.latents]
        viz.steps_grid({"latents": z_decoded, "x0": x0_decoded}, inter.timesteps, num_cols=6, value_range=(0, 1));
        """),
    ],
    exercises=[
        "Invert with `guidance_scale=3.0` and sample back with 3.0. How much larger is the reconstruction error, and why?",
        "Change `mask_thresholding_ratio` (1.5, 3, 6) and `num_maps_per_mask` (1, 10). How do the masks change?",
        "Run the edit with `inpaint_strength` 0.3, 0.6 and 1.0 (invert with the same value). Which strength keeps the shape and still changes the colour?",
        "Swap the prompts of `generate_mask`: does the mask change? Look at the formula.",
        "Edit the shape instead of the colour (\"a red square\"). Is the mask still in the right place?",
    ],
)
