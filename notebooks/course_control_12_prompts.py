"""The cells of notebook 12 (prompt weights, blends, negative prompts, inpainting); see course_cells.py."""

MD, CODE = "md", "code"

SPEC = dict(
    file="12_steering_the_prompt.ipynb", title="Steering the prompt: weights, blends, negative prompts, inpainting",
    intro="""
    The UNet reads the prompt only through CLIP's (77, D) embedding matrix, and classifier-free guidance
    (Ho & Salimans 2022, [arXiv:2207.12598](https://arxiv.org/abs/2207.12598)) reads a second one, the
    unconditional prompt. Changing those two matrices, and nothing else, gives prompt weights
    (`a (red:1.5) circle`, the syntax of AUTOMATIC1111's web UI), prompt blends (compel's `.blend()`) and
    negative prompts. A mask gives the last technique here: inpainting with the text-to-image model,
    which keeps the image outside the mask by blending latents at every step (Blended Latent Diffusion,
    Avrahami et al. 2022, [arXiv:2206.02779](https://arxiv.org/abs/2206.02779)).
    `StableDiffusionInpaintPipeline` takes diffusers' arguments, and `StableDiffusionPromptWeightingPipeline`
    takes diffusers' `prompt_embeds=` / `negative_prompt_embeds=`.
    """,
    learn=["how `(word:w)` becomes one weight per CLIP token, and what the weight does to the embedding rows",
           "why A1111 rescales the weighted embeddings to their old mean, and why that does nothing on tiny-sd",
           "a sweep of blend weights between two prompts' embeddings",
           "what a negative prompt replaces in the guidance batch, and one it removes",
           "inpainting with a text-to-image UNet: the kept region noised to every timestep, step by step"],
    cells=[
        (CODE, """
        from minidiff.control.prompt_weighting import (StableDiffusionPromptWeightingPipeline, blend_prompt_embeddings,
                                                       parse_prompt_weights, prompt_token_weights,
                                                       weighted_prompt_embeddings)

        pipe = StableDiffusionPromptWeightingPipeline.from_pretrained(setup.sd, torch_dtype=setup.dtype,
                                                                      safety_checker=None, feature_extractor=None).to(setup.device)
        pipe.set_progress_bar_config(disable=True)
        prompt = setup.pick(tiny="a red circle on a black background", hub="a photo of a red car in a snowy forest")
        steps, guidance = setup.pick(tiny=20, hub=25), setup.pick(tiny=3.0, hub=7.5)
        """),
        (MD, """
        ## 1. Weights in the prompt

        `(words:1.5)` multiplies the weight of its words by 1.5, `(words)` by 1.1 and `[words]` by 1/1.1;
        groups nest and multiply. Everything else weighs 1. The parser returns the pieces of text:
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        weighted = setup.pick(tiny="a (red:1.5) circle on a [black] background",
                              hub="a photo of a (red:1.5) car in a [snowy] forest")
        for text, w in parse_prompt_weights(weighted):
            print(f"{w:.3f}  {text!r}")
        """),
        (MD, """
        CLIP does not read words but tokens, 77 of them: `<|startoftext|>`, the prompt's tokens, `<|endoftext|>`
        and padding. Each piece is tokenized on its own (a word may become several tokens, each gets the
        piece's weight); the start, end and padding tokens weigh 1.
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        ids, weights = prompt_token_weights(pipe.tokenizer, weighted)              # (77,), (77,)
        end = ids.tolist().index(pipe.tokenizer.eos_token_id)
        tokens = pipe.tokenizer.convert_ids_to_tokens(ids[:end + 1].tolist())
        for i, token in enumerate(tokens):
            print(f"{i:2d}  {token.replace('</w>', ''):>16s}  {weights[i].item():.3f}")
        print(f"{end + 1}-76: padding, weight 1")
        """),
        (MD, """
        ## 2. What a weight does to the embeddings

        CLIP encodes the token ids as usual, E: (1, 77, D). Then each row is scaled by its weight,
        Ẽ_i = w_i E_i, and (A1111's method) the whole matrix is rescaled so that its mean is E's mean again,
        Ẽ <- Ẽ · mean(E) / mean(Ẽ): the weights change the rows relative to each other, not the overall level
        that the UNet was trained on. By hand:
        """),
        (CODE, """
        E = weighted_prompt_embeddings(pipe, prompt)                        # plain prompt: all weights 1
        scaled = weighted_prompt_embeddings(pipe, weighted, renormalize=False)
        k = tokens.index("red</w>")
        assert torch.allclose(scaled[0, k], 1.5 * E[0, k])                 # the row of "red", times 1.5
        by_hand = scaled * E.mean() / scaled.mean()                         # A1111's rescale
        print(f"mean of E = {E.mean().item():.2g}, mean |E| = {E.abs().mean().item():.2f}")
        """),
        (MD, """
        On tiny-sd the mean of E is zero up to rounding: its text encoder is random, and its last LayerNorm
        has no learned bias, so every row has mean 0 (each row is normalised to mean 0 and variance 1).
        Scaling rows keeps that mean at 0, there is nothing to restore, and `by_hand` would divide rounding
        errors by rounding errors; `weighted_prompt_embeddings` skips the rescale in that case. The real CLIP
        of SD v1 has a bias, a non-zero mean, and the rescale applies.

        ## 3. A sweep of the colour word's weight

        One seed, one prompt, the weight of "red" from 0 to 2:
        """),
        (CODE, """
        ws = [0.0, 0.5, 1.0, 1.5, 2.0]
        images = [pipe(prompt.replace("red", f"(red:{w})"), num_inference_steps=steps, guidance_scale=guidance,
                       generator=setup.generator(0)).images[0] for w in ws]
        viz.image_grid(images, titles=[f"(red:{w})" for w in ws]);
        """),
        (MD, """
        On tiny-sd the image barely moves from 0 to 1.5, and at 2 it changes all at once (colour and edges)
        instead of step by step. Even a weight of 0 keeps the circle red: CLIP's text encoder is causal, so every token after "red", and the
        end and padding rows (most of the 77), have already read it. A weight scales one row of 77 that the
        cross-attention reads. With SD v1, users of this syntax mostly stay between 0.5 and 1.5 (not measured here),
        and the pipeline refuses weights outside [0, 10].

        ## 4. Blending two prompts

        A blend is a weighted average of whole prompts' embeddings, E = Σ_k b_k E_k / Σ_k b_k (compel's
        `.blend()`). The result goes in through `prompt_embeds=`, the argument diffusers'
        StableDiffusionPipeline takes for ready-made embeddings.
        """),
        (CODE, """
        other = prompt.replace("red", "blue")
        assert torch.equal(blend_prompt_embeddings(pipe, [prompt, other], [1, 0]), E)   # [1, 0] is the first prompt
        fractions = [0.0, 0.25, 0.5, 0.75, 1.0]
        images = []
        for b in fractions:
            embeds = blend_prompt_embeddings(pipe, [prompt, other], [1 - b, b])        # (1, 77, D)
            images += pipe(prompt_embeds=embeds, num_inference_steps=steps, guidance_scale=guidance,
                           generator=setup.generator(0)).images
        viz.image_grid(images, titles=[f"{1 - b:.2f} red, {b:.2f} blue" for b in fractions]);
        """),
        (MD, """
        The blend moves in embedding space, not in colour space: its middle need not be the mixture of the
        two colours (on tiny-sd it is closer to cyan than to purple).
        """),
        (MD, """
        ## 5. Negative prompts

        Classifier-free guidance extrapolates from the unconditional prediction towards the prompt's:
        ε̃ = ε(z_t, ∅) + s (ε(z_t, c) - ε(z_t, ∅)). A negative prompt takes the place of ∅, the empty prompt:
        the first half of the guidance batch is now its embedding, so every step moves away from it.
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        from minidiff.pipelines import text

        subject, negative = setup.pick(tiny=("a circle", "blue"), hub=("a bowl of fruit on a table", "bananas"))
        batch = text.prompt_embeddings(pipe.tokenizer, pipe.text_encoder, [subject], negative, 1, True, setup.device)
        assert torch.allclose(batch[0], weighted_prompt_embeddings(pipe, negative)[0])   # row 0: the negative prompt
        assert torch.allclose(batch[1], weighted_prompt_embeddings(pipe, subject)[0])    # row 1: the prompt
        print("guidance batch:", tuple(batch.shape), "= [negative prompt; prompt]")
        """),
        (CODE, """
        seeds = [0, 1, 2, 3]
        runs = {"no negative prompt": None, f"negative: {negative!r}": negative}
        images = []
        for negative_prompt in runs.values():
            images += pipe(subject, negative_prompt=negative_prompt, num_images_per_prompt=len(seeds),
                           generator=[setup.generator(s) for s in seeds], num_inference_steps=steps,
                           guidance_scale=guidance).images
        viz.image_grid(images, titles=[name for name in runs for _ in seeds], ncols=len(seeds));
        """),
        (MD, """
        Asked for "a circle", tiny-sd draws blue circles; with "blue" as the negative prompt, the same seeds
        give circles of other colours.

        ## 6. Image-to-image, a recap

        Notebook 09 started the loop from the image instead of from noise (SDEdit, Meng et al. 2022,
        [arXiv:2108.01073](https://arxiv.org/abs/2108.01073)): encode it, z_0 = scaling_factor · a sample of
        VAE.encode(image), noise it to the first kept timestep, z_t = add_noise(z_0, ε, t_start), and run the
        last int(strength · N) steps. The prompt then changes the whole picture. Inpainting keeps the same
        start and adds one line to the loop, so that only the masked region changes: below, image-to-image
        redraws everything, inpainting replaces what is under the mask and keeps the rest.
        """),
        (CODE, """
        import numpy as np
        import PIL.Image, PIL.ImageDraw
        from minidiff.control.inpaint import StableDiffusionInpaintPipeline
        from minidiff.pipelines import StableDiffusionImg2ImgPipeline

        img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
        inpaint = StableDiffusionInpaintPipeline(**pipe.components)
        for p in (img2img, inpaint):
            p.set_progress_bar_config(disable=True)
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        if setup.tiny:   # a red circle and a blue square on gray, in the colours of tiny-sd's training images
            drawing = PIL.Image.new("RGB", (size, size), (128, 128, 128))
            PIL.ImageDraw.Draw(drawing).ellipse((6, 6, 30, 30), fill=(220, 30, 30))
            PIL.ImageDraw.Draw(drawing).rectangle((40, 40, 58, 58), fill=(30, 30, 220))
            init = torch.from_numpy(np.asarray(drawing, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        else:
            init = (viz.sample_photo("chelsea", size) + 1) / 2                           # (1, 3, H, W) in [0, 1]
        top, left, bottom, right = setup.pick(tiny=(0, 0, 40, 40), hub=(80, 128, 400, 448))
        mask = torch.zeros(1, 1, size, size)                                             # 1 = repaint, 0 = keep
        mask[..., top:bottom, left:right] = 1
        new = setup.pick(tiny="a yellow diamond on a gray background", hub="a photo of the face of a small dog")
        edited = img2img(new, init, strength=0.8, num_inference_steps=steps, guidance_scale=guidance,
                         generator=setup.generator(0)).images[0]
        painted = inpaint(new, init, mask, num_inference_steps=steps, guidance_scale=guidance,
                          generator=setup.generator(0)).images[0]
        viz.image_grid([init[0] * 2 - 1, (init * (1 - 0.7 * mask))[0] * 2 - 1, edited, painted],
                       titles=["input", "mask (dark: repaint)", "image-to-image 0.8", "inpainted"]);
        """),
        (MD, """
        ## 7. Inpainting, step by step

        The UNet has 4 input channels and never sees the mask (a dedicated inpainting UNet has 9: the latent,
        the mask and the masked image). So after every step the pipeline puts the known region back, noised
        to the noise level of the next step with the same ε it started from (Avrahami et al. 2022,
        Algorithm 1; RePaint, Lugmayr et al. 2022, [arXiv:2201.09865](https://arxiv.org/abs/2201.09865), does
        the same in pixel space):

            z <- (1 - m) · add_noise(z_0, ε, t_next) + m · z

        with m the mask shrunk to the latent size (nearest neighbour, so it stays 0 or 1). After the last
        step the known region is z_0 itself. By hand, with the generator's draws in the pipeline's order:
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        import torch.nn.functional as F
        from minidiff.core.utils import randn_tensor

        out = inpaint(new, init, mask, num_inference_steps=steps, guidance_scale=guidance,
                      generator=setup.generator(0), return_intermediates=True)
        g = setup.generator(0)
        with torch.no_grad():
            z0 = inpaint.vae.encode(inpaint.preprocess(init).to(setup.device, setup.dtype)).latent_dist.sample(g)
        z0 = z0 * inpaint.vae.config.scaling_factor                                      # (1, 4, h, w)
        noise = randn_tensor(z0.shape, generator=g, device=setup.device, dtype=setup.dtype)
        m = F.interpolate(mask, size=z0.shape[-2:]).to(setup.device, setup.dtype)     # (1, 1, h, w)
        timesteps = out.intermediates.timesteps
        for i, z in enumerate(out.intermediates.latents):
            known = z0 if i == len(timesteps) - 1 else inpaint.scheduler.add_noise(z0, noise, timesteps[i + 1][None])
            assert torch.allclose((1 - m) * z, (1 - m) * known, atol=1e-3 if setup.dtype == torch.float32 else 5e-2)
        print("latent mask:", tuple(m.shape), f"{int(m.sum())} of {m.numel()} positions repainted")
        print(f"the kept region equals add_noise(z0, eps, t_next) after each of the {len(timesteps)} steps")
        """),
        (MD, """
        The latents of every step: outside the mask the noise fades out on the schedule of the image's own
        latent, inside it the model draws something new. Below, the model's prediction of x0 at each step,
        decoded: it has to agree with the kept region at its borders.
        """),
        (CODE, """
        inter = out.intermediates
        ts = [int(t) for t in inter.timesteps]
        with torch.no_grad():
            x0_decoded = [(inpaint.decode(x0)[0] / 2 + 0.5).clamp(0, 1).float().cpu() for x0 in inter.x0]   # (3, H, W)
        latents = [z[0].float().cpu() for z in inter.latents]                                             # (4, h, w)
        if setup.tiny:   # the preview fitted to this run's (latent, decoded image) pairs, as in notebook 07
            factors, bias = viz.fit_latent_rgb(torch.stack([x0[0].float().cpu() for x0 in inter.x0]),
                                               torch.stack(x0_decoded) * 2 - 1)
        else:
            factors, bias = viz.SD_V1_LATENT_RGB, None
        viz.latent_channels_grid(latents, ts, num_rows=4, rgb_factors=factors, rgb_bias=bias);
        """),
        (CODE, """
        viz.steps_grid({"x0 decoded": x0_decoded}, ts, num_cols=6, value_range=(0, 1));
        """),
        (MD, """
        ## 8. The kept region, after decoding

        The latents outside the mask are the image's own, but the decoder does not decode them alone: its
        convolutions (and its attention layer) mix neighbouring latents, so the kept region comes back as the
        VAE's reconstruction of the image, changed a little near the mask. With tiny-sd's 8x8 latents one
        latent is 8x8 pixels and the decoder sees most of the image at once. Blended Latent Diffusion discusses
        this and pastes the original pixels back outside the mask as the last step; here by hand:
        """),
        (CODE, """
        painted_pt = inpaint(new, init, mask, num_inference_steps=steps, guidance_scale=guidance,
                             generator=setup.generator(0), output_type="pt").images.cpu()    # (1, 3, H, W) in [0, 1]
        pasted = mask * painted_pt + (1 - mask) * init                                     # pixels: keep the input outside
        change = (painted_pt - init).abs().mean(dim=1)[0]                                  # (H, W)
        print(f"mean change outside the mask: {change[mask[0, 0] == 0].mean():.3f}, inside: {change[mask[0, 0] == 1].mean():.3f}")
        viz.image_grid(torch.cat([init, painted_pt, pasted]), value_range=(0, 1),
                       titles=["input", "inpainted", "pixels pasted back"]);
        """),
    ],
    exercises=["ComfyUI reads `(word:w)` differently: E_i <- E∅_i + w (E_i - E∅_i), with E∅ the empty prompt's embedding. Write it with `weighted_prompt_embeddings(pipe, '')` and compare the sweep of section 3.",
               "Extrapolate a blend: `[1.5, -0.5]` between the red and the blue prompt. What colour comes out?",
               "Use the prompt itself as the negative prompt. What is ε̃ then, for any guidance scale? Check it on an image.",
               "Inpaint with `strength=0.6`. Which timestep does the run start from, and how much of the old shape survives inside the mask?",
               "Grow the mask by one latent (8 pixels) on each side and compare the seams of the pasted-back image."],
)
