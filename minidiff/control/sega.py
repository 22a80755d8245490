"""Semantic Guidance, SEGA (Brack et al. 2023, https://arxiv.org/abs/2301.12247).

Classifier-free guidance pushes the noise estimate from the unconditional ε(z_t) towards the prompt's
ε(z_t, c_p). SEGA adds, in the same step, one more push per *edit concept* c_e ("blue", "glasses"):
towards it, or away from it (`reverse_editing_direction`), on only the latent values where that
concept's estimate differs most from the unconditional one. The prompt and the seed stay; the image
changes only where the concept lives. One UNet call per step on B * (2 + C) latents (C concepts):

1. encode [unconditional; prompt; concept 1; ...; concept C]                   -> ((2 + C)B, 77, D)
2. ε(z_t), ε(z_t, c_p), ε(z_t, c_e^i) from one UNet call                         -> (2 + C) x (B, 4, h, w)
3. per concept i (after its warm-up δ_i, before its cooldown):
   ψ_i = ±(ε(z_t, c_e^i) - ε(z_t)),  γ_i = s_e^i ψ_i where |s_e^i ψ_i| is in its top (1 - λ_i), else 0
4. γ = Σ_i g_i γ_i + s_m ν_t,  ν_{t+1} = β_m ν_t + (1 - β_m) γ     (momentum; built up during warm-up too)
5. ε̄ = ε(z_t) + s_g (ε(z_t, c_p) - ε(z_t)) + γ, then the scheduler step

Paper symbols -> arguments: s_e edit_guidance_scale, λ edit_threshold, δ edit_warmup_steps, s_m
edit_momentum_scale, β_m edit_mom_beta, g_i edit_weights. The arguments are diffusers'
`SemanticStableDiffusionPipeline`'s, and so is the algorithm, including two of its details: the
percentile η_λ is taken per image and per latent channel, and while only some concepts are past their
warm-up, those guide alone with weights normalised to sum 1 and without momentum.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ..pipelines.outputs import ImagePipelineOutput, Intermediates, postprocess
from ..pipelines.stable_diffusion import StableDiffusionPipeline
from ..pipelines.text import as_prompt_list, encode_text, prompt_embeddings


@dataclass
class SemanticStableDiffusionPipelineOutput(ImagePipelineOutput):
    """With `return_intermediates=True`, per step i: `edit_guidance[i]` (B, 4, h, w), the SEGA term added to
    the guidance (zeros during warm-up), and `concept_guidance[i]` (C, B, 4, h, w), each concept's γ_i."""

    edit_guidance: list[torch.Tensor] | None = None
    concept_guidance: list[torch.Tensor] | None = None


def per_concept(value, name: str, num_concepts: int) -> list:
    """One value for every concept, or a list with one per concept -> a list of `num_concepts` values."""
    if not isinstance(value, (list, tuple)):
        return [value] * num_concepts
    if len(value) != num_concepts:
        raise ValueError(f"{name} has {len(value)} values for {num_concepts} editing prompts; pass one value "
                         f"for all of them, or exactly one per editing prompt.")
    return list(value)


class SemanticStableDiffusionPipeline(StableDiffusionPipeline):
    """Text -> image, edited by concepts: `pipe(prompt, editing_prompt=["blue"], edit_guidance_scale=5)`."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback=None,
        return_intermediates: bool = False,
        editing_prompt: str | list[str] | None = None,
        editing_prompt_embeddings: torch.Tensor | None = None,
        reverse_editing_direction: bool | list[bool] = False,
        edit_guidance_scale: float | list[float] = 5,
        edit_warmup_steps: int | list[int] = 10,
        edit_cooldown_steps: int | list[int] | None = None,
        edit_threshold: float | list[float] = 0.9,
        edit_momentum_scale: float = 0.1,
        edit_mom_beta: float = 0.4,
        edit_weights: list[float] | None = None,
        sem_guidance: list[torch.Tensor] | None = None,
    ) -> SemanticStableDiffusionPipelineOutput:
        """Generate images for `prompt`, steered by the `editing_prompt` concepts (module docstring).

        Per-concept arguments take one value for all concepts or a list with one per concept.
        `edit_cooldown_steps=None`: the concept guides until the last step. `sem_guidance`: precomputed
        guidance terms, one (B, 4, h, w) tensor per step, added to the guidance. `eta` reaches schedulers
        whose step() takes it (DDIM). Other arguments as for StableDiffusionPipeline.
        """
        # 0. Check the inputs before any work is done.
        prompts = as_prompt_list(prompt)
        batch_size = len(prompts) * num_images_per_prompt
        _, _, latent_shape = self.check_inputs(batch_size, height, width, output_type, generator, latents,
                                               num_inference_steps, guidance_scale)
        concepts = self.check_edit_arguments(editing_prompt, editing_prompt_embeddings, guidance_scale,
                                             reverse_editing_direction, edit_guidance_scale, edit_warmup_steps,
                                             edit_cooldown_steps, edit_threshold, edit_momentum_scale, edit_mom_beta,
                                             edit_weights)
        self.check_edit_window(concepts, num_inference_steps)
        if sem_guidance is not None and (len(sem_guidance) != num_inference_steps
                                         or any(tuple(g.shape) != latent_shape for g in sem_guidance)):
            raise ValueError(f"sem_guidance must be a list of {num_inference_steps} tensors (one per step) of shape "
                             f"{latent_shape}; found {len(sem_guidance)} of shapes "
                             f"{sorted({tuple(g.shape) for g in sem_guidance})}.")
        self.warn_if_slow()
        device = self.device
        guidance = guidance_scale > 1.0
        C = len(concepts["scale"])

        # 1. Text embeddings: [unconditional; prompt] (2B, 77, D), then each concept repeated B times.
        text = prompt_embeddings(self.tokenizer, self.text_encoder, prompts, negative_prompt, num_images_per_prompt,
                                 guidance, device)
        if C:
            if editing_prompt_embeddings is None:
                edit = encode_text(self.tokenizer, self.text_encoder, as_prompt_list(editing_prompt), device)
            else:
                edit = editing_prompt_embeddings.to(device=device, dtype=text.dtype)        # (C, 77, D)
            edit = edit.repeat_interleave(batch_size, dim=0)   # (C, 77, D) -> (C*B, 77, D): c1 x B, c2 x B, ...
            text = torch.cat([text, edit])                               # ((2 + C)B, 77, D)

        # 2. Timesteps and z_T, as in text-to-image.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(latent_shape, text.dtype, generator, latents)
        step_kwargs = {"eta": eta} if "eta" in inspect.signature(self.scheduler.step).parameters else {}

        # 3. The denoising loop, with SEGA's term next to classifier-free guidance.
        intermediates = Intermediates(initial_latents=latents.clone()) if return_intermediates else None
        recorded = dict(edit_guidance=[], concept_guidance=[]) if return_intermediates and C else {}
        momentum = torch.zeros_like(latents)                             # ν_t: (B, 4, h, w)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            copies = 2 + C if guidance else 1
            model_input = torch.cat([latents] * copies)                  # (B, ...) -> ((2 + C)B, ...)
            model_input = self.scheduler.scale_model_input(model_input, t)
            eps = self.unet(model_input, t, encoder_hidden_states=text).sample
            if guidance:
                eps_uncond, eps_prompt, *eps_edit = eps.chunk(copies)     # ((2 + C)B, ...) -> (2 + C) x (B, ...)
                # ε̄ = ε(z_t) + s_g (ε(z_t, c_p) - ε(z_t)) + γ   (classifier-free guidance plus SEGA's term)
                noise_guidance = guidance_scale * (eps_prompt - eps_uncond)
                if C:
                    gamma, gammas, momentum = self.semantic_guidance(i, eps_uncond, eps_edit, momentum, concepts,
                                                                     edit_momentum_scale, edit_mom_beta)
                    noise_guidance = noise_guidance + gamma
                    if recorded:
                        recorded["edit_guidance"].append(gamma.detach().clone())
                        recorded["concept_guidance"].append(gammas.detach().clone())
                if sem_guidance is not None:
                    noise_guidance = noise_guidance + sem_guidance[i].to(device=device, dtype=eps.dtype)
                eps = eps_uncond + noise_guidance                        # (B, 4, h, w)
            out = self.scheduler.step(eps, t, latents, generator=generator, **step_kwargs)
            self.record_step(i, t, latents, eps, out, callback, intermediates)
            latents = out.prev_sample

        # 4. Decode the latents into images.
        images = latents if output_type == "latent" else postprocess(self.decode(latents), output_type)
        return SemanticStableDiffusionPipelineOutput(images=images, intermediates=intermediates,
                                                     edit_guidance=recorded.get("edit_guidance"),
                                                     concept_guidance=recorded.get("concept_guidance"))

    def semantic_guidance(self, i, eps_uncond, eps_edit, momentum, concepts, momentum_scale, mom_beta):
        """SEGA's term at step i -> (γ to add (B, 4, h, w), each concept's γ_i (C, B, 4, h, w), ν_{t+1})."""
        C = len(eps_edit)
        gammas = torch.zeros((C, *eps_uncond.shape), device=eps_uncond.device, dtype=eps_uncond.dtype)
        weights = torch.zeros(C, device=eps_uncond.device, dtype=eps_uncond.dtype)   # g_i; 0 once cooled down
        warmed_up = []
        for c in range(C):
            if i >= concepts["warmup"][c]:
                warmed_up.append(c)
            if concepts["cooldown"][c] is not None and i >= concepts["cooldown"][c]:
                continue                                                 # past its cooldown: γ_i = 0
            # ψ_i = ε(z_t, c_e^i) - ε(z_t), or its negative to steer away from the concept
            psi = eps_edit[c] - eps_uncond                               # (B, 4, h, w)
            if concepts["reverse"][c]:
                psi = -psi
            psi = concepts["scale"][c] * psi
            # γ_i = s_e ψ_i where |s_e ψ_i| >= η_λ, its λ-th percentile (per image and channel), else 0
            B, channels = psi.shape[:2]
            eta_lambda = torch.quantile(psi.abs().flatten(2).float(), concepts["threshold"][c], dim=2)  # (B, 4)
            eta_lambda = eta_lambda.to(psi.dtype).reshape(B, channels, 1, 1)
            gammas[c] = torch.where(psi.abs() >= eta_lambda, psi, torch.zeros_like(psi))
            weights[c] = concepts["weight"][c]

        gamma = torch.zeros_like(eps_uncond)
        if 0 < len(warmed_up) < C:
            # Some concepts are past their warm-up, not all: they guide alone, weights normalised, no momentum.
            w = weights[warmed_up]
            if w.sum() > 0:                                              # (diffusers divides 0 by 0 here: NaN)
                gamma = torch.einsum("c,cbijk->bijk", w / w.sum(), gammas[warmed_up])
        # γ = Σ_i g_i γ_i + s_m ν_t;  ν_{t+1} = β_m ν_t + (1 - β_m) γ
        total = torch.einsum("c,cbijk->bijk", weights, gammas) + momentum_scale * momentum
        momentum = mom_beta * momentum + (1 - mom_beta) * total
        if len(warmed_up) == C:
            gamma = total
        return gamma, gammas, momentum

    @staticmethod
    def check_edit_arguments(editing_prompt, editing_prompt_embeddings, guidance_scale, reverse, scale, warmup,
                             cooldown, threshold, momentum_scale, mom_beta, weights) -> dict:
        """The per-concept settings as lists of one value per concept (empty without concepts), or a clear error."""
        if editing_prompt and editing_prompt_embeddings is not None:
            raise ValueError("Pass editing_prompt or editing_prompt_embeddings, not both.")
        if editing_prompt:
            C = len(as_prompt_list(editing_prompt, "editing_prompt"))
        elif editing_prompt_embeddings is not None:
            if editing_prompt_embeddings.ndim != 3:
                raise ValueError(f"editing_prompt_embeddings must be (C, 77, D), one row per concept; found shape "
                                 f"{tuple(editing_prompt_embeddings.shape)}.")
            C = editing_prompt_embeddings.shape[0]
        else:
            C = 0
        if C and guidance_scale <= 1.0:
            raise ValueError(f"SEGA guides next to classifier-free guidance (it needs the unconditional ε(z_t)), "
                             f"so it needs guidance_scale > 1; found {guidance_scale}. Raise guidance_scale.")
        concepts = dict(reverse=per_concept(reverse, "reverse_editing_direction", C),
                        scale=per_concept(scale, "edit_guidance_scale", C),
                        warmup=per_concept(warmup, "edit_warmup_steps", C),
                        cooldown=per_concept(cooldown, "edit_cooldown_steps", C),
                        threshold=per_concept(threshold, "edit_threshold", C),
                        weight=per_concept(1.0 if weights is None else weights, "edit_weights", C))
        for c in range(C):
            if not isinstance(concepts["reverse"][c], bool):
                raise ValueError(f"reverse_editing_direction must be True (steer away from the concept) or False "
                                 f"(towards it); found {concepts['reverse'][c]!r} for concept {c}.")
            if not isinstance(concepts["scale"][c], (int, float)) or concepts["scale"][c] < 0:
                raise ValueError(f"edit_guidance_scale must be >= 0 (to steer away from a concept, set "
                                 f"reverse_editing_direction=True); found {concepts['scale'][c]!r} for concept {c}.")
            if not isinstance(concepts["threshold"][c], (int, float)) or not 0 <= concepts["threshold"][c] < 1:
                raise ValueError(f"edit_threshold must be in [0, 1): the share of latent values left unedited "
                                 f"(0.9 edits the top 10%); found {concepts['threshold'][c]!r} for concept {c}.")
            if not isinstance(concepts["weight"][c], (int, float)) or concepts["weight"][c] < 0:
                raise ValueError(f"edit_weights must be >= 0; found {concepts['weight'][c]!r} for concept {c}.")
            for name, steps in (("edit_warmup_steps", concepts["warmup"][c]),
                                ("edit_cooldown_steps", concepts["cooldown"][c])):
                if steps is not None and (not isinstance(steps, int) or steps < 0):
                    raise ValueError(f"{name} must be a step count >= 0; found {steps!r} for concept {c}.")
        if not 0 <= momentum_scale or not 0 <= mom_beta <= 1:
            raise ValueError(f"edit_momentum_scale must be >= 0 and edit_mom_beta in [0, 1]; found "
                             f"{momentum_scale!r} and {mom_beta!r}.")
        return concepts

    @staticmethod
    def check_edit_window(concepts: dict, num_inference_steps: int) -> None:
        """Refuse a concept whose edit would never apply: it guides from step `warmup` until step `cooldown`
        (or the last step), so a warm-up at or past that end leaves the image unedited, with no other sign."""
        for c, (warmup, cooldown) in enumerate(zip(concepts["warmup"], concepts["cooldown"])):
            end = num_inference_steps if cooldown is None else min(cooldown, num_inference_steps)
            if warmup >= end:
                raise ValueError(
                    f"Concept {c} would never be applied: edit_warmup_steps={warmup} but it guides only until step "
                    f"{end} (num_inference_steps={num_inference_steps}, edit_cooldown_steps={cooldown}). Expected "
                    f"edit_warmup_steps < {end}: lower it (10 is diffusers' default, meant for 50 steps) or raise "
                    "num_inference_steps."
                )
