"""The cells of notebook 14 (MultiDiffusion panoramas and Attend-and-Excite); see course_cells.py."""

MD, CODE = "md", "code"

SPEC = dict(
    file="14_panoramas_and_attend_and_excite.ipynb", title="Panoramas and Attend-and-Excite",
    intro="""
    Two ways to control *where* things go, with no training. **MultiDiffusion** (Bar-Tal et al. 2023,
    [arXiv:2302.08113](https://arxiv.org/abs/2302.08113)) makes an image wider than the model was trained on:
    it denoises overlapping windows of the model's own size and averages them after every step.
    **Attend-and-Excite** (Chefer et al. 2023, [arXiv:2301.13826](https://arxiv.org/abs/2301.13826)) fights
    "catastrophic neglect" (one of two subjects missing) by moving the latents, during the first steps, until
    each subject word gets a strong spot in the cross-attention maps. Both pipelines take diffusers' arguments:
    `from diffusers import StableDiffusionPanoramaPipeline` becomes
    `from minidiff.control.panorama import StableDiffusionPanoramaPipeline`.
    """,
    learn=["how MultiDiffusion cuts a wide latent into windows and why the average of the windows is the best joint step",
           "why overlapping windows join up and side-by-side tiles do not, and what circular padding adds",
           "the Attend-and-Excite loss: softmax over the words, Gaussian smoothing, the weakest subject's peak",
           "how a gradient step on the latents (and the iterative refinement) changes the attention and the image"],
    cells=[
        (MD, """
        ## 1. A panorama

        The UNet was trained on square latents of its `sample_size` (64 for SD v1, 8 for tiny-sd). We ask for
        an image three (tiny) or four (SD) windows wide. Each step, every window of that size is denoised as
        if it were a whole image, and each latent position takes the average of the windows that cover it.
        """),
        (CODE, """
        from minidiff.control.panorama import StableDiffusionPanoramaPipeline

        pipe = StableDiffusionPanoramaPipeline.from_pretrained(setup.sd, torch_dtype=setup.dtype,
                                                               safety_checker=None, feature_extractor=None).to(setup.device)
        pipe.set_progress_bar_config(disable=True)
        prompt = setup.pick(tiny="a blue square on a black background", hub="a photo of the dolomites")
        steps, guidance = setup.pick(tiny=20, hub=25), setup.pick(tiny=3.0, hub=7.5)
        height, width = setup.pick(tiny=(64, 192), hub=(512, 2048))
        window = pipe.window_size                          # in latents
        stride = window // 4                               # diffusers uses window // 8; fewer windows run faster

        out = pipe(prompt, height=height, width=width, stride=stride, view_batch_size=8, num_inference_steps=steps,
                   guidance_scale=guidance, generator=setup.generator(0), output_type="pt", return_intermediates=True)
        panorama = out.images                               # (1, 3, H, W) in [0, 1]
        viz.image_grid(panorama, titles=[f"{height} x {width}: {prompt}"], value_range=(0, 1), panel=5.0);
        """),
        (MD, """
        ## 2. The windows

        `get_views` lists the crops F_i of the paper (eq. 7) as row and column indices into the latent.
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        f = pipe.vae_scale_factor
        h, w = height // f, width // f
        views = pipe.get_views(h, w, window, stride)
        print(f"latent {h} x {w}, window {window}, stride {stride}: {len(views)} windows")
        print("columns of the first three:", [(int(c[0]), int(c[-1])) for r, c in views[:3]])
        """),
        (MD, """
        Three of them drawn over the image, and how many windows cover each latent position. Positions near
        the ends are covered by fewer windows: the average there rests on less evidence.
        """),
        (CODE, """
        def outline(image, rows, cols, colour):
            \"\"\"A copy of image (3, H, W) with a one-pixel frame around the latent window (rows, cols).\"\"\"
            image = image.clone()
            top, bottom = int(rows[0]) * f, (int(rows[-1]) + 1) * f - 1            # latent rows -> pixel rows
            left, right = int(cols[0]) * f, (int(cols[-1]) + 1) * f - 1
            c = torch.tensor(colour, dtype=image.dtype)[:, None]
            image[:, top, left:right + 1] = image[:, bottom, left:right + 1] = c
            image[:, top:bottom + 1, left] = image[:, top:bottom + 1, right] = c
            return image

        framed = panorama[0].cpu().float()
        for (rows, cols), colour in zip([views[0], views[len(views) // 2], views[-1]], [(1, 0, 0), (0, 1, 0), (1, 1, 0)]):
            framed = outline(framed, rows, cols, colour)
        viz.image_grid(framed[None], titles=["first, middle and last window"], value_range=(0, 1), panel=5.0);

        count = torch.zeros(h, w)
        for rows, cols in views:
            count[rows[:, None], cols] += 1
        viz.heatmap(count, title="windows covering each latent position", xlabel="latent column", ylabel="row",
                    cmap="viridis", size=(5.0, 1.6));
        """),
        (MD, """
        ## 3. Why the average

        MultiDiffusion asks, after each step Φ of every window, for the one wide latent J that disagrees least
        with all of them: J_{t-1} = argmin_J Σ_i || F_i(J) - Φ(F_i(J_t)) ||² (eq. 5). For squared errors the
        answer is the per-position mean of the windows, `value / count` in the pipeline. A panorama of exactly
        one window is then the ordinary pipeline, number for number:
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        from minidiff.pipelines import StableDiffusionPipeline

        plain = StableDiffusionPipeline(**pipe.components)
        plain.set_progress_bar_config(disable=True)
        one = dict(num_inference_steps=4, guidance_scale=guidance, output_type="pt")
        a = pipe(prompt, height=window * f, width=window * f, generator=setup.generator(1), **one).images
        b = plain(prompt, generator=setup.generator(1), **one).images
        print("one window == plain text-to-image:", torch.allclose(a, b, atol=1e-5))
        """),
        (MD, """
        ## 4. The panorama forming

        The model's estimate of the clean image x_0 at six of the steps (averaged over the windows like the
        latents). The layout is settled in the first few steps, as for any Stable Diffusion image.
        """),
        (CODE, """
        inter = out.intermediates
        cols = viz.pick_steps(len(inter.timesteps), 4)
        with torch.no_grad():
            x0_images = [pipe.decode(inter.x0[i]).float().cpu()[0] for i in cols]   # each (3, H, W) in [-1, 1]
        stacked = torch.cat(x0_images, dim=-2)                                       # one above the other: (3, 4H, W)
        viz.image_grid(stacked[None], panel=4.0,
                       titles=["x0 at t = " + ", ".join(str(int(inter.timesteps[i])) for i in cols) + ", top to bottom"]);
        """),
        (MD, """
        ## 5. Overlap matters

        With a stride equal to the window, the windows do not overlap: the panorama is three (four) separate
        images side by side, and nothing makes them agree where they meet. `circular_padding=True` lets the
        windows run past the right end and wrap to the left, so the two ends agree too: roll the picture by
        half its width and the join does not show.
        """),
        (CODE, """
        kwargs = dict(height=height, width=width, view_batch_size=8, num_inference_steps=steps,
                      guidance_scale=guidance, output_type="pt")
        tiles = pipe(prompt, stride=window, generator=setup.generator(0), **kwargs).images
        circular = pipe(prompt, stride=stride, circular_padding=True, generator=setup.generator(0), **kwargs).images
        rolled = circular.roll(width // 2, dims=-1)               # the two ends now meet in the middle
        rows = torch.cat([tiles.cpu(), panorama.cpu(), rolled.cpu()], dim=-2)[0]        # (3, 3H, W)
        viz.image_grid(rows[None], value_range=(0, 1), panel=4.0,
                       titles=[f"top: tiles (stride {window}); middle: stride {stride}; bottom: circular, rolled by half"]);
        """),
        (MD, """
        ## 6. Attend-and-Excite: the subject tokens

        The second pipeline shares the loaded models. It needs the positions of the subject words in the
        prompt; `get_indices` lists them (0 is the start token). tiny-sd's tokenizer knows only the words of
        its captions, so it splits "and" into pieces; the subjects are still one token each.
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        from minidiff.control.attend_and_excite import StableDiffusionAttendAndExcitePipeline

        ae = StableDiffusionAttendAndExcitePipeline(**pipe.components)
        ae.set_progress_bar_config(disable=True)
        prompt = setup.pick(tiny="a red circle and a blue square", hub="a cat and a frog")
        subjects = setup.pick(tiny=[3, 8], hub=[2, 5])
        attn_res = setup.pick(tiny=(8, 8), hub=(16, 16))   # the 16 x 16 maps of SD v1; tiny-sd's are 8 x 8 and 4 x 4
        tokens = ae.get_indices(prompt)
        print(tokens)
        word = {i: token.replace("</w>", "") for i, token in tokens.items()}     # "</w>" marks the end of a word
        print("subjects:", [word[i] for i in subjects])
        """),
        (MD, """
        ## 7. With and without

        Same seeds, same prompt. The first row does no update (`max_iter_to_alter=0`, no refinement: the plain
        pipeline). The second moves the latents during the first half of the steps (the paper: 25 of 50) with
        the paper's step size (`scale_factor=20`) and refines at the threshold steps 0 and 10 (and 20). The
        third takes steps 50 times larger. tiny-sd draws one shape per image (it never saw two), so it cannot
        draw both subjects whatever the attention does. With SD v1-4, the second row's setting is the one
        with which the paper reports neglected subjects coming back (not run here: no GPU in CI).
        """),
        (CODE, """
        seeds = [0, 1, 2]
        common = dict(token_indices=subjects, attn_res=attn_res, num_inference_steps=steps, guidance_scale=guidance,
                      output_type="pt", return_intermediates=True)
        alter = steps // 2                                     # steps updated: the paper uses 25 of 50
        runs = {"plain": [ae(prompt, max_iter_to_alter=0, thresholds={}, generator=setup.generator(s), **common)
                          for s in seeds]}
        for scale in (20, 1000):
            runs[f"scale {scale}"] = [ae(prompt, max_iter_to_alter=alter, scale_factor=scale,
                                         generator=setup.generator(s), **common) for s in seeds]
        viz.image_grid(torch.cat([r.images.cpu() for rs in runs.values() for r in rs]), ncols=len(seeds),
                       value_range=(0, 1), titles=[f"{name}, seed {s}" for name in runs for s in seeds]);
        """),
        (MD, """
        ## 8. The loss, by hand

        At one step: run the UNet on z_t with the prompt alone, average the cross-attention maps at `attn_res`
        over heads and layers, drop the start token (it soaks up attention) and softmax over the remaining
        tokens at each position (×100 first, to sharpen), smooth each subject's map with a 3 x 3 Gaussian and
        take its peak. The loss is 1 minus the peak of the *weakest* subject: L = max_s (1 - max A^s).
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        import torch.nn.functional as F
        from minidiff.control.attend_and_excite import attend_and_excite_loss, gaussian_kernel, max_attention_per_token
        from minidiff.pipelines.text import encode_text

        text = encode_text(ae.tokenizer, ae.text_encoder, [prompt], setup.device)      # (1, 77, D)
        ae.scheduler.set_timesteps(steps)
        t = ae.scheduler.timesteps[0]
        z_t = runs["plain"][0].intermediates.initial_latents
        with torch.no_grad():
            maps = ae.token_attention(z_t, t, text, attn_res)[0].float()               # (77, h, w)
        words = (100 * maps[1:-1]).softmax(dim=0)                                      # (75, h, w): tokens 1 .. 75
        peaks = []
        for s in subjects:
            a = F.pad(words[s - 1][None, None], (1, 1, 1, 1), mode="reflect")          # (1, 1, h + 2, w + 2)
            peaks.append(F.conv2d(a, gaussian_kernel().to(a)).max())
        mine = torch.stack(peaks)
        assert torch.allclose(mine, max_attention_per_token(maps, subjects))
        loss = (1 - mine).clamp(min=0).max()                                           # L = max_s (1 - max A^s)
        print("maps:", tuple(maps.shape), " L by hand == pipeline's L:",
              torch.allclose(loss, attend_and_excite_loss(max_attention_per_token(maps, subjects))))
        """),
        (CODE, """
        print("peak attention per subject:", {word[s]: round(float(p), 3) for s, p in zip(subjects, mine)})
        print(f"a uniform spread over the 75 tokens would give {1 / 75:.3f}")
        """),
        (MD, """
        The authors' thresholds (peaks of 0.05, 0.5 and 0.8 by steps 0, 10 and 20) are set for SD v1's 16 x 16
        maps, where a subject that gets drawn has a sharp peak. tiny-sd's cross-attention is nearly uniform over
        the tokens (its small UNet spreads attention widely), so the peaks sit near 1/75 and the loss near 0.99,
        far above every threshold: the refinement runs its full 20 tries at each threshold step, and the
        paper's step size barely moves the image. The mechanism still works, as the next two figures show.
        """),
        (MD, """
        ## 9. The loss per step

        Each output's `losses[i]` holds L at step i, before that step's update z_t <- z_t - α_i ∇L, with
        α_i = scale_factor · sqrt(1 - 0.5 i / (N - 1)). The last points are the refinement-only threshold
        steps after `max_iter_to_alter` (diffusers refines there too). Every new step starts from a new,
        less noisy z_t, so L is not a training curve; its trend is what the updates buy.
        """),
        (CODE, """
        viz.line_plot({f"{name}, seed {seeds[0]}": [l[0] for l in rs[0].losses] for name, rs in runs.items() if rs[0].losses},
                      title="Attend-and-Excite loss L", xlabel="updated step", ylabel="L", marker="o");
        """),
        (MD, """
        ## 10. The maps before and after

        The subjects' maps (after the softmax over the words) at the first step that is not updated, for the
        plain run and the large-step run of the first seed, over each run's final image. Each panel is
        stretched to its own range: look at where the peak is, and at the printed peaks for how strong it is.
        """),
        (CODE, """
        for name in ("plain", "scale 1000"):
            run = runs[name][0]
            z = run.intermediates.latents[alter - 1]                # the latents entering step `alter`
            with torch.no_grad():
                m = ae.token_attention(z, run.intermediates.timesteps[alter], text, attn_res)[0].float()   # (77, h, w)
            viz.attention_overlay(run.images[0].cpu(), (100 * m[1:-1]).softmax(0)[[s - 1 for s in subjects]],
                                  [f"{name}: {word[s]}" for s in subjects], value_range=(0, 1))
            print(f"{name:>10}:", {word[s]: round(float(p), 3) for s, p in zip(subjects, max_attention_per_token(m, subjects))})
        """),
    ],
    exercises=["Make a tall image instead of a wide one (height three windows, width one). Do the windows of `get_views` run down the rows?",
               "Set `stride` to 1 (every possible window) and to the window size. How does the time grow, and where do seams appear?",
               "Give each third of the panorama its own prompt (the paper's region-based control): average the windows' updates with a weight per prompt. Which lines of `panorama.py` change?",
               "Raise `scale_factor` for Attend-and-Excite to 200 and 2000. How do the loss curve and the image change, and when does the image fall apart?",
               "Pick a token that is not a subject (\"a\" or the colour) in `token_indices`. What does exciting it do?"],
)
