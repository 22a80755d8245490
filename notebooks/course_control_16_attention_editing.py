"""The cells of notebook 16 (Pix2Pix-Zero and TIME: editing through cross-attention); see course_cells.py."""

MD, CODE = "md", "code"

SPEC = dict(
    file="16_pix2pix_zero_and_model_editing.ipynb", title="Editing through cross-attention: TIME and Pix2Pix-Zero",
    intro="""
    The prompt reaches the UNet in one place only: the keys and values of its cross-attention layers,
    k = W_K c and v = W_V c for every token embedding c. Two training-free editing methods work right there.
    **TIME** ([Orgad et al. 2023](https://arxiv.org/abs/2303.08084)) edits the *model*: one closed-form update
    of every W_K, W_V makes "triangle" mean "yellow triangle" in every prompt from then on.
    **Pix2Pix-Zero** ([Parmar et al. 2023](https://arxiv.org/abs/2302.03027)) edits *one image*: it moves the
    prompt's embedding along a direction ("red" -> "blue"), and keeps the layout by pulling the edited
    pass's cross-attention maps towards those of the original pass.
    """,
    learn=["where the text enters the UNet: the `to_k` / `to_v` projections of every cross-attention layer",
           "TIME's closed form W' = (λW + Σ v*cᵀ)(λI + Σ ccᵀ)⁻¹, re-derived by hand and checked against `edit_model`",
           "what λ trades, and how local an edit stays (the edited prompt vs an unrelated one)",
           "Pix2Pix-Zero's edit direction: the difference of two mean caption embeddings",
           "cross-attention guidance: reference maps, a loss on the maps, one gradient step on the latents per step",
           "editing a real image: DDIM inversion with the noise regularised towards white noise"],
    cells=[
        (MD, """
        ## 1. TIME: the pipeline and the edit

        `StableDiffusionModelEditingPipeline` is the text-to-image pipeline plus one method,
        `edit_model(source_prompt, destination_prompt, lamb=0.1)`. The destination must contain every token
        of the source, in order, plus the new attribute: "a pack of roses" -> "a pack of blue roses".
        """),
        (CODE, """
        from minidiff.control.model_editing import StableDiffusionModelEditingPipeline, align_tokens

        pipe = StableDiffusionModelEditingPipeline.from_pretrained(setup.sd, torch_dtype=setup.dtype,
                                                                   safety_checker=None, feature_extractor=None).to(setup.device)
        pipe.set_progress_bar_config(disable=True)
        source, destination = setup.pick(tiny=("a triangle", "a yellow triangle"),
                                         hub=("a pack of roses", "a pack of blue roses"))
        probes = setup.pick(tiny=["a triangle", "a small triangle", "a square"],
                            hub=["a pack of roses", "a field of roses", "a field of sunflowers"])
        steps, guidance = setup.pick(tiny=20, hub=30), setup.pick(tiny=3.0, hub=7.5)
        """),
        (MD, """
        The edit touches only the cross-attention projections: every `attn2.to_v` and `attn2.to_k`. Each source
        token is matched to the same token in the destination (the new word has no partner), and the padding
        positions follow: `align_tokens` gives, for each of the 77 source positions, the destination position
        whose embedding it should now act like.
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        projections = pipe.projections()
        print(len(projections), "projections, e.g.")
        for name in list(projections)[:2]:
            print(" ", name, tuple(projections[name].weight.shape))
        words = lambda text: [t.replace("</w>", "") for t in pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(text).input_ids)]
        print("source     ", list(enumerate(words(source))))
        print("destination", list(enumerate(words(destination))))
        print("source position -> destination position:", align_tokens(pipe.tokenizer, source, destination)[:8], "...")
        """),
        (MD, """
        ## 2. Before and after

        The same seeds, before (top row) and after (bottom row) one call to `edit_model`. Each prompt is
        drawn twice; the first two contain the edited concept, the third does not.
        """),
        (CODE, """
        def draw(prompts, seed=0):
            return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance,
                        generator=[setup.generator(seed + i) for i in range(len(prompts))]).images

        before = draw(probes * 2)
        pipe.edit_model(source, destination, lamb=0.1)
        after = draw(probes * 2)
        viz.image_grid(before + after, titles=[p[:18] for p in probes * 2] + ["after TIME"] * len(after),
                       ncols=2 * len(probes));
        """),
        (MD, """
        The concept changed wherever it appears, also in prompts never used for the edit: the edit lives in
        the weights. How far it leaks into unrelated prompts depends on how close their embeddings are to the
        edited one. With SD v1.4 the paper's unrelated prompts barely move. `tiny-sd`'s text encoder learned
        thirty words from captions of shapes, so its "square" and "triangle" embeddings sit close together and
        the edit can leak; compare the third and the last column.

        ## 3. The closed form, by hand

        For each projection W (to_v or to_k) TIME solves a ridge regression: the source embeddings c_i should
        give the values v*_i = W c*_i that the aligned destination embeddings gave, while W' stays near W:

            min_W'  Σ_i ||W' c_i - v*_i||² + λ ||W' - W||²   =>   W' = (λ W + Σ_i v*_i c_iᵀ)(λ I + Σ_i c_i c_iᵀ)⁻¹

        The sums run over the 77 positions of the prompt pair and of three augmented pairs ("a photo of ...",
        "an image of ...", "a picture of ..."). Here it is for one projection, against `edit_model`'s result:
        """),
        (CODE, """
        from minidiff.pipelines.text import encode_text

        pairs = [(source, destination)] + [(aug + source, aug + destination) for aug in pipe.with_augs]
        c, c_star = [], []
        with torch.no_grad():
            for s, d in pairs:
                old, new = encode_text(pipe.tokenizer, pipe.text_encoder, [s, d], setup.device)   # 2 x (77, D)
                c.append(old)
                c_star.append(new[align_tokens(pipe.tokenizer, s, d)])                            # aligned: (77, D)
        c, c_star = torch.cat(c).double(), torch.cat(c_star).double()                             # (4*77, D)

        name = next(iter(projections))
        W = pipe.original_weights[name].double()                                                  # (D_out, D)
        lamb = 0.1
        v_star = c_star @ W.T                                                                     # (4*77, D_out)
        eye = torch.eye(W.shape[1], dtype=torch.float64, device=W.device)
        W_mine = (lamb * W + v_star.T @ c) @ torch.linalg.inv(lamb * eye + c.T @ c)
        W_edit = projections[name].weight.double()
        assert ((W_mine - W_edit).norm() / W_edit.norm()) < 5e-3
        print(f"{name}: relative change of W {((W_edit - W).norm() / W.norm()).item():.2f}; by hand = edit_model")
        """),
        (MD, """
        ## 4. What λ trades

        λ weighs "stay close to W" against "map c to v*". Large λ leaves the model as it was; small λ follows
        the edit completely. Below, the first probe after an edit with each λ (ΔW: the relative change of the
        first projection); each call starts again from the original weights (`restart_params=True`).
        """),
        (CODE, """
        lambs = [0.01, 0.1, 1.0, 10.0, 1e4]
        images, titles = [], []
        for lamb in lambs:
            pipe.edit_model(source, destination, lamb=lamb)
            W_l = projections[name].weight.double()
            titles.append(f"λ={lamb:g}, ΔW {((W_l - W).norm() / W.norm()).item():.2f}")
            images += draw(probes[:1])
        pipe.restore_projections()                         # back to the original model
        viz.image_grid(images, titles=titles, panel=1.6);
        """),
        (MD, """
        ## 5. Pix2Pix-Zero: the edit direction

        Pix2Pix-Zero leaves the weights alone and edits one generation. The direction Δc is the difference of
        the mean CLIP embeddings of two sets of captions that differ only in the change we want, so that what
        the captions share cancels: Δc = mean(target captions) - mean(source captions), one (77, D) offset
        added to the prompt's embedding. (The paper generates hundreds of captions with a language model;
        a handful written by hand will do here.)

        It needs a deterministic scheduler: the edited pass must meet the same timesteps as the source pass.
        The pipeline shares the models already loaded.
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        from minidiff.control.pix2pix_zero import StableDiffusionPix2PixZeroPipeline
        from minidiff.schedulers import DDIMScheduler

        p2p = StableDiffusionPix2PixZeroPipeline(**{**pipe.components,
                                                    "scheduler": DDIMScheduler.from_pretrained(setup.sd, subfolder="scheduler")})
        p2p.set_progress_bar_config(disable=True)
        prompt, word = setup.pick(tiny=("a red circle at the top left", "circle"), hub=("a photo of a cat sitting on a sofa", "cat"))
        source_captions = setup.pick(tiny=["a red circle", "a red square", "a red triangle", "a red diamond"],
                                     hub=["a cat sitting on a sofa", "a photo of a cat", "a cat in the garden", "a cat sleeping"])
        target_captions = setup.pick(tiny=[c.replace("red", "blue") for c in source_captions],
                                     hub=[c.replace("cat", "dog") for c in source_captions])
        source_embeds, target_embeds = p2p.get_embeds(source_captions), p2p.get_embeds(target_captions)
        direction = p2p.construct_direction(source_embeds, target_embeds)
        print("mean source embedding", tuple(source_embeds.shape), "-> direction", tuple(direction.shape))
        """),
        (MD, """
        ## 6. Two passes from the same noise

        One call runs two passes from the same z_T: the source pass with the prompt as written, keeping every
        cross-attention map at every step, then the edited pass with c + Δc. Before each step of the edited
        pass, cross-attention guidance compares its maps M^edit with the reference M^ref of the same step,

            loss = Σ_layers mean_(batch, heads) Σ_(positions, tokens) (M^edit - M^ref)²,   x_t <- x_t - λ ∇_x loss

        so that each token keeps looking at the same place: the object stays where it was, only its
        description changes. λ (`cross_attention_guidance_amount`) is 0.1 for SD's 64x64 latents; tiny-sd's
        8x8 maps give a smaller gradient and need a larger step. For comparison, the same edit without guidance:
        """),
        (CODE, """
        amount = setup.pick(tiny=30.0, hub=0.1)
        p2p_steps = setup.pick(tiny=20, hub=50)
        run = lambda amount: p2p(prompt, source_embeds, target_embeds, num_inference_steps=p2p_steps,
                                 guidance_scale=guidance, generator=setup.generator(0),
                                 cross_attention_guidance_amount=amount, return_intermediates=True)
        guided, unguided = run(amount), run(0.0)
        viz.image_grid([guided.source_images[0], unguided.images[0], guided.images[0]],
                       titles=["source", "edited, no guidance", f"edited, λ={amount:g}"], panel=1.8);
        """),
        (MD, """
        ## 7. The maps, step by step

        Where does the object's token look at each step, in the source pass and in the edited pass? These are
        the maps the guidance compares (heads averaged, layers resized to the latent grid and averaged, the
        prompt half of the batch). With SD v1.4 the object's token lights up the object (Hertz et al. 2022 show such maps; not run here). tiny-sd's maps are
        8x8 and its tiny text encoder spreads each token's attention differently (its shape token may even look
        at the background); what counts is that the edited pass keeps the pattern of the source pass.
        """),
        (CODE, """
        ids = p2p.tokenizer(prompt).input_ids
        k = [t.replace("</w>", "") for t in p2p.tokenizer.convert_ids_to_tokens(ids)].index(word)   # the object's position
        timesteps = guided.intermediates.timesteps
        viz.steps_grid({f"source '{word}'": [m[0, k] for m in guided.source_maps],
                        f"edited '{word}'": [m[0, k] for m in guided.edited_maps],
                        "no guidance": [m[0, k] for m in unguided.edited_maps]},
                       timesteps, num_cols=6, value_range=None);
        """),
        (MD, """
        The loss before each step's gradient step, with and without guidance: it stays lower with guidance,
        which is the whole mechanism. (Too large a λ overshoots: the loss and the image blow up. Try it.)
        """),
        (CODE, """
        viz.line_plot({f"λ={amount:g}": guided.attention_loss, "no guidance": unguided.attention_loss},
                      title="attention loss per step", xlabel="step", ylabel="Σ ||M_edit - M_ref||²");
        """),
        (CODE, """
        # NBVAL_CHECK_OUTPUT
        print("steps per pass:", len(guided.attention_loss), " maps per step:", tuple(guided.edited_maps[0].shape))
        print("guided loss lower than unguided:", sum(guided.attention_loss) < sum(unguided.attention_loss))
        """),
        (MD, """
        ## 8. A real image

        A real image has no z_T, so `invert` finds one: DDIM inversion (notebook 15) with one addition from
        the paper. At every step the predicted noise ε is nudged, by a few gradient steps, towards
        white Gaussian noise: no auto-correlation between shifted copies of itself (at several scales) and
        mean 0, variance 1 (a KL term). Plain DDIM inversion reproduces the image, but its z_T looks less like
        Gaussian noise, which the paper found makes edits from it less reliable. Then the same two passes start
        from that z_T.
        """),
        (CODE, """
        if setup.tiny:                                # a drawing from tiny-sd's training data, not a generated image
            from minidiff.training import shapes
            drawn, captions = shapes.render_all(64, seed=0, resolution=64)
            k = next(i for i, c in enumerate(captions) if " red " in f" {c} ")
            real, caption = drawn[k:k + 1].float() / 255, captions[k]                   # (1, 3, 64, 64) in [0, 1]
        else:
            size = p2p.unet.config.sample_size * p2p.vae_scale_factor               # the model's own size: 512 for SD v1
            real, caption = (viz.sample_photo("chelsea", size) + 1) / 2, "a photo of a cat"
        inverted = p2p.invert(caption, real, num_inference_steps=p2p_steps, generator=setup.generator(0))
        edited = p2p(caption, source_embeds, target_embeds, latents=inverted.latents, num_inference_steps=p2p_steps,
                     guidance_scale=guidance, cross_attention_guidance_amount=amount)
        viz.image_grid([real[0] * 2 - 1, edited.source_images[0], edited.images[0]],
                       titles=[caption[:20], "from the inverted z_T", "edited"], panel=1.8);
        """),
    ],
    exercises=["TIME: edit with `restart_params=False` twice (two different concepts). Do both edits survive? What happens if the second edit is the first one reversed?",
               "TIME: set `pipe.with_augs = []` and `pipe.with_to_k = False` (edit only W_V). Which prompts still change, and how much weaker is the edit?",
               "TIME: why does an edit from a prompt to itself leave every W unchanged? Show it from the formula (hint: v*_i = W c_i).",
               "Pix2Pix-Zero: sweep `cross_attention_guidance_amount` (0, a few values, one too large) and plot the attention loss per step of each. Where does the image start to break?",
               "Pix2Pix-Zero: build the direction from one caption pair only, then from ten. Which one changes less of the rest of the image?"],
)
