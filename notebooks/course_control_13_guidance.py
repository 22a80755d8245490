"""The cells of notebook 13 (semantic guidance and self-attention guidance); see course_cells.py."""

MD, CODE = "md", "code"

SPEC = dict(
    file="13_semantic_and_self_attention_guidance.ipynb", title="Semantic guidance and self-attention guidance",
    intro="""
    Classifier-free guidance adds one term to the noise estimate: s_g (ε(z_t, prompt) - ε(z_t)). Two methods
    add a second term to the same step, with no training and no change to the model.
    **SEGA** (Brack et al. 2023, [arXiv:2301.12247](https://arxiv.org/abs/2301.12247)) adds a push towards,
    or away from, *edit concepts* ("blue", "glasses"), only where a concept lives in the latent.
    **SAG** (Hong et al. 2023, [arXiv:2210.00939](https://arxiv.org/abs/2210.00939)) blurs the regions the
    model attends to most and steps away from its prediction for that blurred input, which sharpens them.
    Both pipelines take diffusers' arguments: `from diffusers import SemanticStableDiffusionPipeline` becomes
    `from minidiff.control.sega import SemanticStableDiffusionPipeline`.
    """,
    learn=["how SEGA builds one guidance term per concept: ψ = ε(z_t, concept) - ε(z_t), kept only above a percentile",
           "what edit scale, threshold, warm-up and momentum do, with sweeps on one seed",
           "how SAG finds the positions to blur from the middle block's self-attention map",
           "why SAG re-noises the blurred x0 and what its guidance changes, step by step"],
    cells=[
        (MD, """
        ## 1. SEGA: one concept added, one removed

        The prompt and the seed stay; `editing_prompt` lists the concepts and `reverse_editing_direction`
        says which ones to remove. One UNet call per step now runs on B · (2 + C) latents: unconditional,
        prompt, and one copy per concept.
        """),
        (CODE, """
        from minidiff.control.sega import SemanticStableDiffusionPipeline

        pipe = SemanticStableDiffusionPipeline.from_pretrained(setup.sd, torch_dtype=setup.dtype,
                                                               safety_checker=None, feature_extractor=None).to(setup.device)
        pipe.set_progress_bar_config(disable=True)
        prompt = setup.pick(tiny="a red circle", hub="a photo of the face of a woman wearing glasses")
        add, remove = setup.pick(tiny=("blue", "red"), hub=("smiling, smile", "glasses, wearing glasses"))
        steps, guidance = setup.pick(tiny=20, hub=25), setup.pick(tiny=3.0, hub=7.0)
        edit = dict(edit_guidance_scale=5.0, edit_warmup_steps=setup.pick(tiny=2, hub=5),
                    edit_threshold=setup.pick(tiny=0.5, hub=0.95), edit_momentum_scale=0.1, edit_mom_beta=0.4)
        seeds = [0, 1, 2]


        def sega(**kwargs):
            generators = [setup.generator(s) for s in seeds]
            return pipe([prompt] * len(seeds), num_inference_steps=steps, guidance_scale=guidance,
                        generator=generators, **kwargs)


        rows = {"prompt alone": sega().images,
                f"+ {add}": sega(editing_prompt=add, **edit).images,
                f"- {remove}": sega(editing_prompt=remove, reverse_editing_direction=True, **edit).images,
                "both": sega(editing_prompt=[add, remove], reverse_editing_direction=[False, True], **edit).images}
        viz.image_grid([im for images in rows.values() for im in images], ncols=len(seeds),
                       titles=[name for name in rows for _ in seeds]);
        """),
        (MD, """
        ## 2. The SEGA term of one step, by hand

        At step t, for a concept c_e:

        - ψ = ε(z_t, c_e) - ε(z_t): where and how the concept would change the noise estimate
          (its negative to remove the concept);
        - γ = s_e ψ, but only where |s_e ψ| is at or above its λ-th percentile (`edit_threshold`) over the
          latent positions of each image and channel; 0 elsewhere. With λ = 0.9 only the top 10% of the
          values move, so the rest of the image is left as the prompt makes it.

        We compute it at the first step from three UNet outputs and check it against the pipeline's
        `semantic_guidance`.
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        from minidiff.pipelines.text import encode_text
        from minidiff.core.utils import randn_tensor

        h = w = pipe.unet.config.sample_size
        pipe.scheduler.set_timesteps(steps)
        t = pipe.scheduler.timesteps[0]
        z_t = randn_tensor((1, 4, h, w), generator=setup.generator(0), device=setup.device, dtype=setup.dtype)
        z_t = z_t * pipe.scheduler.init_noise_sigma
        with torch.no_grad():
            text = encode_text(pipe.tokenizer, pipe.text_encoder, ["", prompt, add], setup.device)   # (3, 77, D)
            eps = pipe.unet(torch.cat([z_t] * 3), t, encoder_hidden_states=text).sample       # (3, 4, h, w)
        eps_uncond, eps_prompt, eps_concept = eps.chunk(3)                                   # 3 x (1, 4, h, w)

        psi = edit["edit_guidance_scale"] * (eps_concept - eps_uncond)                       # (1, 4, h, w)
        percentile = torch.quantile(psi.abs().flatten(2).float(), edit["edit_threshold"], dim=2)   # (1, 4): per channel
        gamma = torch.where(psi.abs() >= percentile[:, :, None, None], psi, torch.zeros_like(psi))

        concept = dict(reverse=[False], scale=[edit["edit_guidance_scale"]], warmup=[0], cooldown=[None],
                       threshold=[edit["edit_threshold"]], weight=[1.0])                   # one value per concept
        _, gammas, _ = pipe.semantic_guidance(0, eps_uncond, [eps_concept], torch.zeros_like(z_t), concept, 0.0, 0.4)
        assert torch.allclose(gamma, gammas[0], atol=1e-6)
        print("ψ:", tuple(psi.shape), " values kept per channel:", (gamma != 0).flatten(2).sum(-1).tolist(), "of", h * w)
        """),
        (MD, """
        Where the concept "lives" at this step: |ψ| summed over the channels, and the positions that γ keeps
        in channel 0. Early in the loop these are broad regions; the threshold keeps SEGA's push local.
        """),
        (CODE, """
        viz.image_grid([psi[0].abs().sum(0), (gamma[0, 0] != 0).float()], titles=["|ψ| (all channels)", "γ ≠ 0, channel 0"],
                       value_range=None, cmap="viridis", panel=1.6);
        """),
        (MD, """
        ## 3. Edit scale and warm-up

        `edit_guidance_scale` (s_e) sets how hard the concept pushes; too hard and the image breaks up.
        `edit_warmup_steps` (δ) waits before pushing at all. The first steps fix the composition (where the
        shape is, how large): with no warm-up SEGA redraws the whole picture, after a few steps it keeps the
        layout of the unedited image and changes the concept, and when it starts too late there are not
        enough steps left to absorb the push.
        """),
        (CODE, """
        scales = [0.0, 2.0, 5.0, 8.0]
        warmups = setup.pick(tiny=[0, 5, 10, 15], hub=[0, 6, 12, 18])
        seeds = [0]
        by_scale = [sega(editing_prompt=add, **{**edit, "edit_guidance_scale": s}).images[0] for s in scales]
        by_warmup = [sega(editing_prompt=add, **{**edit, "edit_warmup_steps": d}).images[0] for d in warmups]
        viz.image_grid(by_scale + by_warmup, ncols=len(scales),
                       titles=[f"s_e = {s:g}" for s in scales] + [f"warm-up {d}" for d in warmups]);
        """),
        (MD, """
        ## 4. Step by step: each concept's push, and momentum

        With `return_intermediates=True` the pipeline keeps, per step, each concept's γ (`concept_guidance`)
        and the term it added (`edit_guidance`). During warm-up nothing is added, but *momentum* builds up:
        ν_{t+1} = β_m ν_t + (1 - β_m) γ, and from the end of the warm-up on, s_m ν_t is added to γ. So the
        push starts at full strength instead of ramping up.
        """),
        (CODE, """
        out = sega(editing_prompt=[add, remove], reverse_editing_direction=[False, True], return_intermediates=True,
                   **{**edit, "edit_warmup_steps": setup.pick(tiny=4, hub=8), "edit_momentum_scale": 0.5})
        series = {f"+ {add}": [g[0].abs().mean().item() for g in out.concept_guidance],        # g: (C, B, 4, h, w)
                  f"- {remove}": [g[1].abs().mean().item() for g in out.concept_guidance],
                  "added (with momentum)": [g.abs().mean().item() for g in out.edit_guidance]}
        viz.line_plot(series, title="mean |γ| per step", xlabel="step", size=(4.5, 2.2));
        """),
        (MD, """
        The predicted x0 at a few steps, without and with the two edits (same seed): identical during the
        warm-up, then the edit takes over.
        """),
        (CODE, """
        plain = sega(return_intermediates=True)
        shown = viz.pick_steps(len(out.intermediates.timesteps), 6)                # 6 of the steps, first and last


        def decoded_x0(intermediates, shown):
            with torch.no_grad():                                                  # one VAE call for the shown steps
                return pipe.decode(torch.cat([intermediates.x0[i] for i in shown])).float().cpu()


        rows = {"prompt alone": decoded_x0(plain.intermediates, shown), "with SEGA": decoded_x0(out.intermediates, shown)}
        viz.steps_grid(rows, [out.intermediates.timesteps[i] for i in shown], num_cols=6);
        """),
        (MD, """
        ## 5. SAG: blur what the model looks at, then step away from it

        Self-attention guidance needs no concept. At each step:

        1. the usual UNet call, keeping the self-attention map A_t of the middle block, (B, heads, N, N);
        2. mask M_t: the key positions that receive more than the average attention (each of the N query
           rows sums to 1, so the average of the column sums is 1);
        3. predict x0, blur it with a Gaussian where M_t = 1, and noise it back to t with the *same*
           predicted ε, so the UNet sees an input of the right noise level that lacks detail in those regions;
        4. ε̃ = ε_guided + s (ε(z_t) - ε(z̃_t)): away from what the model predicts for the degraded input.

        With classifier-free guidance, ε(z_t), A_t and the degraded call are the unconditional ones. The
        SAG pipeline below shares the models loaded for SEGA.
        """),
        (CODE, """
        from minidiff.control.sag import StableDiffusionSAGPipeline, gaussian_blur_2d, sag_mask

        sag = StableDiffusionSAGPipeline(**pipe.components)
        sag.set_progress_bar_config(disable=True)
        sag_prompts = setup.pick(tiny=["a small blue square at the top left", "a green triangle on a black background"],
                                 hub=["a photo of an astronaut riding a horse", "a close-up photo of a red fox"])
        sag_scales = [0.0, 0.5, 1.0]
        images = []
        for s in sag_scales:
            generators = [setup.generator(i) for i in range(len(sag_prompts))]
            images += sag(sag_prompts, num_inference_steps=steps, guidance_scale=guidance, sag_scale=s,
                          generator=generators).images
        viz.image_grid(images, ncols=len(sag_prompts),
                       titles=[f"sag_scale {s:g}" for s in sag_scales for _ in sag_prompts]);
        """),
        (MD, """
        SAG changes detail and edges more than layout: the images keep their composition. It is a guidance
        scale like any other: too large, and it over-sharpens (on the tiny model, sag_scale 1 already
        leaves artifacts on some seeds; diffusers' default for SD is 0.75).
        """),
        (MD, """
        ## 6. The mask and the degraded input, by hand

        One UNet call on the unconditional prompt inside `capture(...)` keeps the middle block's
        self-attention map; the mask is the positions that receive more than the average attention. The
        blur changes x0 only there.
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        from minidiff.control import attention_layers, capture
        from minidiff.schedulers.base import predict_x0

        layers = attention_layers(sag.unet, "self", "mid")
        print("middle-block self-attention:", list(layers))
        out_plain = sag(sag_prompts[:1], num_inference_steps=steps, guidance_scale=guidance, sag_scale=0.0,
                        generator=setup.generator(0), return_intermediates=True)
        k = steps // 2                                  # halfway: the sample after step k - 1 is denoised at timesteps[k]
        z_t, t = out_plain.intermediates.latents[k - 1], out_plain.intermediates.timesteps[k]
        with torch.no_grad(), capture(layers):
            eps = sag.unet(z_t, t, encoder_hidden_states=text[:1]).sample                    # unconditional
            probs = next(iter(layers.values())).attention_probs                              # (1, heads, N, N)
        B, heads, N, _ = probs.shape
        mid = int(N ** 0.5)
        received = probs.mean(1).sum(1).reshape(mid, mid)                                    # (N, N) -> (mid, mid)
        mask = sag_mask(probs, (mid, mid))                                                   # (1, 1, mid, mid)
        assert torch.equal(mask[0, 0].bool(), received > 1)
        print("attention map:", tuple(probs.shape), " mask:", tuple(mask.shape))
        """),
        (CODE, """
        x0 = predict_x0(sag.scheduler, z_t, eps, t)
        with torch.no_grad():
            degraded = sag.degrade(z_t, eps, mask, t)                                         # z̃_t
            x0_degraded = predict_x0(sag.scheduler, degraded, eps, t)                          # its x0: blurred under M
            decoded = [sag.decode(x)[0].float().cpu() for x in (x0, x0_degraded)]
        viz.image_grid([received, mask[0, 0]], titles=["attention received", "mask M_t"], value_range=None,
                       cmap="viridis", panel=1.6)
        viz.image_grid(decoded, titles=["x0", "x0 blurred under M_t"], panel=1.6);
        """),
        (MD, """
        ## 7. The mask over the steps

        `return_intermediates=True` also keeps M_t of every step (`sag_masks`). The mask is coarse (the
        middle block's map: 4 x 4 on tiny-sd, 8 x 8 on SD at 512 x 512) and it changes from step to step as
        the picture forms: SAG does not blur a fixed region. Below it, x0 with and without SAG, same seed.
        """),
        (CODE, """
        out_sag = sag(sag_prompts[:1], num_inference_steps=steps, guidance_scale=guidance, sag_scale=0.75,
                      generator=setup.generator(0), return_intermediates=True)
        timesteps = out_sag.intermediates.timesteps
        viz.steps_grid({"mask M_t": [m[0].float().cpu() for m in out_sag.sag_masks]}, timesteps, num_cols=8,
                       value_range=(0, 1), cmap="gray")
        shown = viz.pick_steps(len(timesteps), 6)
        viz.steps_grid({"x0, SAG": decoded_x0(out_sag.intermediates, shown), "x0, no SAG": decoded_x0(out_plain.intermediates, shown)},
                       [timesteps[i] for i in shown], num_cols=6);
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        print("steps:", len(out_sag.sag_masks), " mask per step:", tuple(out_sag.sag_masks[0].shape))
        """),
    ],
    exercises=["SEGA: set `edit_threshold` to 0.0 (edit every value) and to 0.99. Which keeps the background and the shape's position?",
               "SEGA: give two concepts different `edit_warmup_steps` and plot `edit_guidance` per step. What happens while only one of them is past its warm-up?",
               "SEGA: with `edit_momentum_scale=0`, does the same edit need a larger `edit_guidance_scale`?",
               "SAG: replace the mask by all ones (blur everything) in a copy of `degrade`. Is the guidance still useful?",
               "SAG: run it without classifier-free guidance (`guidance_scale=1.0`) and compare sag_scale 0 and 1: can SAG alone improve an unguided sample?"],
)
