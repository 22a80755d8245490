"""Pix2Pix-Zero: zero-shot image-to-image translation (Parmar et al. 2023, https://arxiv.org/abs/2302.03027).

Turn a cat into a dog (or a red circle into a blue one) without training and without a new prompt: move the
prompt's text embedding along an edit direction, and keep the image's layout by asking the edited pass to
attend where the original pass attended.

1. edit direction: Δc = mean CLIP embedding of target captions - mean of source captions  -> (1, 77, D)
   ("a blue circle", ... minus "a red circle", ...: the captions describe the change, not this image)
2. source pass: from z_T, generate the original image with c; at every step keep each cross-attention
   layer's maps M_t^ref = softmax(Q K^T / sqrt(d)) (the reference: where each token looks)  -> (2B, heads, N, 77)
3. edited pass, from the same z_T with c_edit = c + Δc; at every step t:
   a. cross-attention guidance: one UNet call with c_edit records M_t^edit, and
          loss = sum_layers mean_(batch, heads) ||M_t^edit - M_t^ref||^2
          x_t <- x_t - λ ∇_{x_t} loss        (λ = cross_attention_guidance_amount; one SGD step)
   b. ε̃ = guided UNet(x_t, t, c_edit); x_{t-1} = scheduler.step(ε̃, t, x_t)
4. decode both: the source image and the edited one share the noise, the layout and the other details

For a real photo, z_T comes from `invert(caption, image)`: DDIM inversion (minidiff.control.inversion) whose
noise prediction ε is pulled towards white Gaussian noise at every step (the paper's noise regularisation: an
auto-correlation loss and a KL term), so that z_T stays editable; pass it as `latents`. Without it, the source
image is generated.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..pipelines.outputs import Intermediates, postprocess
from ..pipelines.stable_diffusion import StableDiffusionPipeline
from ..pipelines.text import as_prompt_list, classifier_free_guidance, encode_text, prompt_embeddings
from ..schedulers.ddim_inverse import DDIMInverseScheduler
from .attention_maps import attention_layers, average_maps, capture
from .inversion import InversionOutput, encode_image, preprocess_image


def auto_correlation_loss(eps: torch.Tensor, generator=None) -> torch.Tensor:
    """Σ over channels and a pyramid of scales of the squared auto-correlation of ε at a random shift.

    White noise has none; ε: (B, C, h, w). Each level is halved (average pooling) down to 8x8.
    """
    loss = 0.0
    for i in range(eps.shape[0]):
        for j in range(eps.shape[1]):
            noise = eps[i:i + 1, j:j + 1]                                        # (1, 1, h, w)
            while True:
                shift = torch.randint(noise.shape[2] // 2, (1,), generator=generator).item()
                loss += (noise * torch.roll(noise, shifts=shift, dims=2)).mean() ** 2
                loss += (noise * torch.roll(noise, shifts=shift, dims=3)).mean() ** 2
                if noise.shape[2] <= 8:
                    break
                noise = F.avg_pool2d(noise, kernel_size=2)                      # (1, 1, h/2, w/2)
    return loss


def kl_divergence(eps: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) || N(0, 1)) up to a factor 1/2, with μ, σ² of all entries of ε."""
    mean, var = eps.mean(), eps.var()
    return var + mean ** 2 - 1 - torch.log(var + 1e-7)


def gradient(loss_fn, eps: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        x = eps.detach().requires_grad_(True)
        grad, = torch.autograd.grad(loss_fn(x), x)
    return grad


@dataclass
class Pix2PixZeroOutput:
    """`images`: the edited images; `source_images`: the images of the source pass (same noise, prompt
    unchanged), both of `output_type`. With `return_intermediates=True`, per step of each pass: the latents
    (`intermediates`, `source_intermediates`), the per-token cross-attention maps of the conditional half
    (`edited_maps`, `source_maps`: (B, 77, h, w) each), the guidance loss before its gradient step
    (`attention_loss`) and after it, on the moved latents (`attention_loss_after`: what the step lowered; the next
    step's loss starts from a new x_{t-1}, so the losses of later steps need not fall)."""

    images: object
    source_images: object
    intermediates: Intermediates | None = None
    source_intermediates: Intermediates | None = None
    source_maps: list[torch.Tensor] = field(default_factory=list)
    edited_maps: list[torch.Tensor] = field(default_factory=list)
    attention_loss: list[float] = field(default_factory=list)
    attention_loss_after: list[float] = field(default_factory=list)


class StableDiffusionPix2PixZeroPipeline(StableDiffusionPipeline):
    """(prompt, source_embeds, target_embeds) -> edited image. Loads from a Stable Diffusion folder."""

    def construct_direction(self, embs_source: torch.Tensor, embs_target: torch.Tensor) -> torch.Tensor:
        """Δc = mean(target) - mean(source): (N_s, 77, D), (N_t, 77, D) -> (1, 77, D)."""
        return (embs_target.mean(0) - embs_source.mean(0)).unsqueeze(0)

    @torch.no_grad()
    def get_embeds(self, prompt: list[str], batch_size: int = 16) -> torch.Tensor:
        """The mean CLIP embedding of many captions: list of N str -> (1, 77, D), encoded `batch_size` at a time."""
        prompts = as_prompt_list(prompt, "captions")
        embeds = [encode_text(self.tokenizer, self.text_encoder, prompts[i:i + batch_size], self.device)
                  for i in range(0, len(prompts), batch_size)]                       # each (n, 77, D)
        return torch.cat(embeds).mean(0, keepdim=True)                               # (N, 77, D) -> (1, 77, D)

    def as_embeds(self, embeds, what: str) -> torch.Tensor:
        """Captions (list of str) or embeddings (N, 77, D) -> (N, 77, D) on the pipeline's device, checked."""
        if isinstance(embeds, (str, list, tuple)):
            embeds = self.get_embeds(embeds)
        D = self.text_encoder.config.hidden_size
        length = self.tokenizer.model_max_length
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or tuple(embeds.shape[1:]) != (length, D):
            found = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"{what} must be CLIP embeddings of shape (N, {length}, {D}) or a list of captions; "
                             f"found {found}. Make them with pipe.get_embeds(['a red circle', ...]).")
        return embeds.to(self.device)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        source_embeds: torch.Tensor | list[str],
        target_embeds: torch.Tensor | list[str],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        cross_attention_guidance_amount: float = 0.1,
        output_type: str = "pil",
        callback=None,
        return_intermediates: bool = False,
    ) -> Pix2PixZeroOutput:
        """Generate with `prompt`, then again from the same noise with the edited prompt; see the module docstring.

        `source_embeds` / `target_embeds`: (N, 77, D) embeddings or lists of captions. `latents`: the z_T to
        start both passes from (e.g. DDIM-inverted noise of a real image). `callback(i, t, latents, x0)` is
        called after every step of the edited pass. Other arguments as for text-to-image.
        """
        # 0. Check the inputs before any work is done.
        prompts = as_prompt_list(prompt)
        if not isinstance(cross_attention_guidance_amount, (int, float)) or cross_attention_guidance_amount < 0:
            raise ValueError(f"cross_attention_guidance_amount must be a number >= 0 (the step size λ of the "
                             f"attention-map guidance; 0.1 in diffusers); found {cross_attention_guidance_amount!r}.")
        source_embeds = self.as_embeds(source_embeds, "source_embeds")
        target_embeds = self.as_embeds(target_embeds, "target_embeds")
        B = len(prompts) * num_images_per_prompt
        _, _, latent_shape = self.check_inputs(B, height, width, output_type, generator, latents, num_inference_steps,
                                               guidance_scale)
        h, w = latent_shape[2:]
        self.warn_if_slow()
        device = self.device
        guidance = guidance_scale > 1.0

        # 1. Text embeddings c: (2B, 77, D) = [unconditional; prompt] with guidance, else (B, 77, D).
        text = prompt_embeddings(self.tokenizer, self.text_encoder, prompts, negative_prompt, num_images_per_prompt,
                                 guidance, device)
        # One z_T for both passes: (B, 4, h, w), drawn after set_timesteps (an Euler-type init_noise_sigma needs it).
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        z_T = self.prepare_latents(latent_shape, text.dtype, generator, latents)
        layers = attention_layers(self.unet, "cross")
        cond = slice(B, 2 * B) if guidance else slice(0, B)          # the rows that carry the prompt
        out = Pix2PixZeroOutput(images=None, source_images=None)

        # 2. Source pass: plain generation, keeping every cross-attention map M_t^ref, per step i and layer (by
        # step, not by timestep as diffusers: PNDM repeats a timestep). Kept on the CPU, as diffusers does: at
        # 512x512 they take ~150 MB a step.
        reference = []
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = z_T
        out.source_intermediates = Intermediates(initial_latents=z_T.clone()) if return_intermediates else None
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = self.scheduler.scale_model_input(torch.cat([latents] * 2) if guidance else latents, t)
            with capture(layers):
                eps = self.unet(model_input, t, encoder_hidden_states=text).sample
                probs = [layer.attention_probs for layer in layers.values()]         # each (2B, heads, N, 77)
                reference.append([p.detach().cpu() for p in probs])
                if return_intermediates:
                    out.source_maps.append(average_maps([p[cond] for p in probs], (h, w)).cpu())  # (B, 77, h, w)
            if guidance:
                eps = classifier_free_guidance(eps, guidance_scale)                 # (2B, ...) -> (B, ...)
            step = self.scheduler.step(eps, t, latents, generator=generator)
            self.record_step(i, t, latents, eps, step, None, out.source_intermediates)
            latents = step.prev_sample
        source_latents = latents

        # 3. c_edit = c + Δc on the prompt rows (diffusers adds Δc to row 1: the prompt row for one image).
        direction = self.construct_direction(source_embeds, target_embeds).to(text.dtype)   # (1, 77, D)
        text_edit = text.clone()
        text_edit[cond] += direction                                                  # broadcast over the B rows

        # 4. Edited pass from the same z_T.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = z_T
        out.intermediates = Intermediates(initial_latents=z_T.clone()) if return_intermediates else None
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            # a. loss = sum_layers mean_(batch, heads) sum_(N, 77) (M_t^edit - M_t^ref)^2, then one gradient step
            #    x <- x - λ ∇_x loss. x is the doubled batch: each half moves on its own maps, and (as in the
            #    authors' code) the unconditional half becomes the new latents. diffusers moves x after
            #    scale_model_input: the same for DDIM and DDPM, whose scaling is the identity.
            x = (torch.cat([latents] * 2) if guidance else latents).detach().requires_grad_(True)  # (2B, 4, h, w)
            def map_loss(probs):                                                     # (2B, heads, N, 77) each
                return sum(((p - ref.to(p.device)) ** 2).sum(dim=(-2, -1)).mean() for p, ref in zip(probs, reference[i]))

            with torch.enable_grad(), capture(layers):
                self.unet(self.scheduler.scale_model_input(x, t), t, encoder_hidden_states=text_edit)
                probs = [layer.attention_probs for layer in layers.values()]
                loss = map_loss(probs)                                                # ()
                grad, = torch.autograd.grad(loss, x)
                if return_intermediates:
                    out.edited_maps.append(average_maps([p.detach()[cond] for p in probs], (h, w)).cpu())
                    out.attention_loss.append(loss.item())
            x = (x - cross_attention_guidance_amount * grad).detach()
            latents = x.chunk(2)[0] if guidance else x                                # (2B, ...) -> (B, ...)

            # b. The ordinary guided step from the moved x with the edited prompt (its maps give the loss after a).
            with capture(layers) if return_intermediates else nullcontext():
                eps = self.unet(self.scheduler.scale_model_input(x, t), t, encoder_hidden_states=text_edit).sample
                if return_intermediates:
                    out.attention_loss_after.append(map_loss([layer.attention_probs for layer in layers.values()]).item())
            if guidance:
                eps = classifier_free_guidance(eps, guidance_scale)
            step = self.scheduler.step(eps, t, latents, generator=generator)
            self.record_step(i, t, latents, eps, step, callback, out.intermediates)
            latents = step.prev_sample

        # 5. Decode both passes.
        if output_type == "latent":
            out.images, out.source_images = latents, source_latents
        else:
            out.images = postprocess(self.decode(latents), output_type)
            out.source_images = postprocess(self.decode(source_latents), output_type)
        return out

    @torch.no_grad()
    def invert(
        self,
        prompt: str | list[str],
        image,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        lambda_auto_corr: float = 20.0,
        lambda_kl: float = 20.0,
        num_reg_steps: int = 5,
        num_auto_corr_rolls: int = 5,
        inverse_scheduler=None,
    ) -> InversionOutput:
        """Real image (PIL, or (B, 3, H, W) in [0, 1]) -> `.latents` z_T to pass to `__call__(latents=...)`.

        DDIM inversion with, at each step, `num_reg_steps` rounds of gradient steps on ε: `num_auto_corr_rolls`
        on the auto-correlation loss (step lambda_auto_corr / rolls each), one on the KL term (step lambda_kl).
        `inverse_scheduler` defaults to DDIMInverseScheduler from this pipeline's scheduler config.
        """
        # 0. Check the inputs.
        prompts = as_prompt_list(prompt)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"invert takes one torch.Generator (it draws the VAE sample and the random shifts of "
                            f"the auto-correlation loss); found {type(generator).__name__}.")
        for name, value in (("lambda_auto_corr", lambda_auto_corr), ("lambda_kl", lambda_kl),
                            ("num_reg_steps", num_reg_steps), ("num_auto_corr_rolls", num_auto_corr_rolls)):
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0 (0 switches that regularisation off); found {value!r}.")
        inverse = inverse_scheduler or DDIMInverseScheduler.from_config(self.scheduler.config)
        if inverse.config.prediction_type != "epsilon":
            raise ValueError(f"invert regularises ε, so it needs an epsilon-prediction model; this scheduler's "
                             f"prediction_type is {inverse.config.prediction_type!r}.")
        device = self.device
        guidance = guidance_scale > 1.0

        # 1. z_0 = scaling_factor · a sample of VAE.encode(image): (B, 4, h, w); 2. the prompt's embeddings.
        latents = encode_image(self, preprocess_image(self, image), len(prompts), generator)
        text = prompt_embeddings(self.tokenizer, self.text_encoder, prompts, None, 1, guidance, device)

        # 3. The inverse DDIM loop z_0 -> z_T, ε regularised towards white noise before every step.
        inverse.set_timesteps(num_inference_steps, device=device)
        intermediates = Intermediates(initial_latents=latents.clone())
        for i, t in enumerate(self.progress_bar(inverse.timesteps)):
            eps = self.guided_eps(latents, t, text, guidance_scale, scheduler=inverse)   # ε̃: (B, 4, h, w)
            for _ in range(int(num_reg_steps)):
                if lambda_auto_corr > 0:
                    for _ in range(int(num_auto_corr_rolls)):
                        grad = gradient(lambda e: auto_correlation_loss(e, generator), eps)
                        eps = eps - lambda_auto_corr * grad / num_auto_corr_rolls
                if lambda_kl > 0:
                    eps = eps - lambda_kl * gradient(kl_divergence, eps)
            out = inverse.step(eps, t, latents)
            self.record_step(i, t, latents, eps, out, None, intermediates)
            latents = out.prev_sample
        return InversionOutput(latents=latents, intermediates=intermediates)
