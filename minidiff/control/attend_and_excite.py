"""Attend-and-Excite (Chefer et al. 2023, https://arxiv.org/abs/2301.13826).

Stable Diffusion often drops one subject of "a cat and a frog": no image position attends strongly to
"frog". Attend-and-Excite nudges the latents, during the first denoising steps, until every chosen subject
token has at least one image patch that attends to it (Algorithm 1 of the paper). At step i (timestep t):

1. run the UNet on z_t with the prompt alone, with gradients on, and keep its cross-attention maps at
   `attn_res` (16 x 16 for SD v1, 16 x 16 for tiny-sd), averaged over heads and layers  -> (77, h, w)
2. drop <|startoftext|> (it takes most of the attention) and the last padding position, and softmax the
   remaining 75 maps over the tokens (x100 first, as the authors' code does)          -> (75, h, w)
3. smooth each subject token s's map with a 3 x 3 Gaussian (a single hot patch is not enough)
4. loss:  L = max_s (1 - max_ij A_t^s[i, j])          (the most neglected subject decides)
5. for i < max_iter_to_alter:  z_t <- z_t - α_i ∇_z L,  α_i = scale_factor · sqrt(1 - 0.5 · i / (N - 1));
   at the steps named in `thresholds` ({0: 0.05, 10: 0.5, 20: 0.8}), first repeat 1-5 until
   L <= 1 - threshold (or `max_refinement_steps` tries): the paper's iterative latent refinement
6. the ordinary guided denoising step from the updated z_t
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..pipelines.outputs import ImagePipelineOutput, Intermediates, postprocess
from ..pipelines.stable_diffusion import StableDiffusionPipeline
from ..pipelines.text import as_prompt_list, prompt_embeddings
from .attention_maps import attention_layers, average_maps, capture, layer_size


def gaussian_kernel(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """The authors' smoothing kernel, (1, 1, size, size), summing to 1.

    Their code writes the Gaussian as exp(-((x - μ) / 2σ)²), i.e. a standard deviation of σ·sqrt(2);
    kept here so the results match theirs and diffusers'.
    """
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-((x / (2 * sigma)) ** 2))                          # (size,)
    kernel = g[:, None] * g[None, :]                                  # (size, size): separable
    return (kernel / kernel.sum())[None, None]                        # (1, 1, size, size)


def max_attention_per_token(maps: torch.Tensor, token_indices: list[int]) -> torch.Tensor:
    """Steps 2-3: per-token maps of one image (77, h, w) -> the largest smoothed attention of each subject: (K,)."""
    # Step 2: the 75 tokens between <|startoftext|> and the last position; softmax over tokens at each patch.
    text_maps = (100 * maps[1:-1]).softmax(dim=0)                      # (77, h, w) -> (75, h, w)
    kernel = gaussian_kernel().to(maps)
    maxima = []
    for index in token_indices:
        a = text_maps[index - 1][None, None]                           # token index - 1: <|startoftext|> is gone
        a = F.conv2d(F.pad(a, (1, 1, 1, 1), mode="reflect"), kernel)  # step 3: (1, 1, h, w), smoothed
        maxima.append(a.max())
    return torch.stack(maxima)                                         # (K,)


def attend_and_excite_loss(max_attention: torch.Tensor) -> torch.Tensor:
    """Step 4: L = max_s (1 - max A^s) from the peaks (K,); zero once every subject reaches an attention of 1."""
    return (1.0 - max_attention).clamp(min=0).max()


@dataclass
class AttendAndExciteOutput(ImagePipelineOutput):
    """`images` and `intermediates` as for every pipeline; `losses[k]`: each image's L at the k-th updated step
    (before its update)."""

    losses: list[list[float]] = field(default_factory=list)


class StableDiffusionAttendAndExcitePipeline(StableDiffusionPipeline):
    """(prompt, token_indices) -> image. `pipe.get_indices(prompt)` lists the token indices to choose from."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        token_indices: list[int] | list[list[int]],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback=None,
        return_intermediates: bool = False,
        max_iter_to_alter: int = 25,
        thresholds: dict | None = None,
        scale_factor: float = 20,
        attn_res: tuple[int, int] | None = (16, 16),
        max_refinement_steps: int = 20,
    ) -> AttendAndExciteOutput:
        """`token_indices`: the subject tokens (as in `get_indices`), one list for all prompts or one per prompt.

        `thresholds` ({step: minimum max-attention}, default {0: 0.05, 10: 0.5, 20: 0.8}) names the refinement
        steps. `attn_res`: (rows, columns) of the maps used; None: (height / 32, width / 32) rounded up (diffusers
        writes (width, height), the same for square images). The output's `losses[k]` holds each image's loss L
        at the k-th step that was updated or refined (the first `max_iter_to_alter`, then threshold steps).
        """
        # 0. Check the inputs before any work is done.
        prompts = as_prompt_list(prompt)
        thresholds = {0: 0.05, 10: 0.5, 20: 0.8} if thresholds is None else thresholds
        per_prompt = self.check_token_indices(prompts, token_indices)
        self.check_schedule(max_iter_to_alter, thresholds, scale_factor, max_refinement_steps)
        batch_size = len(prompts) * num_images_per_prompt
        height, width, latent_shape = self.check_inputs(batch_size, height, width, output_type, generator, latents,
                                                        num_inference_steps, guidance_scale)
        attn_res = (math.ceil(height / 32), math.ceil(width / 32)) if attn_res is None else tuple(attn_res)
        self.warn_if_slow()
        device = self.device
        guidance = guidance_scale > 1.0

        # 1. Text embeddings: (2B, 77, D) = [unconditional; prompt] with guidance; the prompt rows alone for the loss.
        text = prompt_embeddings(self.tokenizer, self.text_encoder, prompts, negative_prompt, num_images_per_prompt,
                                 guidance, device)
        text_cond = text[batch_size:] if guidance else text                    # (B, 77, D)
        indices = [ix for ix in per_prompt for _ in range(num_images_per_prompt)]   # one list per image

        # 2. Timesteps, z_T, and the step sizes α_i = scale_factor · sqrt(linspace(1, 0.5, N)[i]).
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(latent_shape, text.dtype, generator, latents)
        step_sizes = scale_factor * np.sqrt(np.linspace(1.0, 0.5, len(timesteps)))

        intermediates = Intermediates(initial_latents=latents.clone()) if return_intermediates else None
        losses = []
        for i, t in enumerate(self.progress_bar(timesteps)):
            if i < max_iter_to_alter or i in thresholds:
                # Steps 1-5, one image at a time (each has its own subject tokens), with gradients.
                updated, step_losses = [], []
                with torch.enable_grad():
                    for b in range(batch_size):
                        z = latents[b:b + 1]                                    # (1, 4, h, w)
                        loss, z = self.excite(z, t, text_cond[b:b + 1], indices[b], attn_res)
                        if i in thresholds and loss > 1.0 - thresholds[i]:
                            loss, z = self.refine(z, t, text_cond[b:b + 1], indices[b], attn_res, loss,
                                                  thresholds[i], float(step_sizes[i]), max_refinement_steps)
                        if i < max_iter_to_alter and loss > 0:
                            # Step 5: z_t <- z_t - α_t ∇_z L
                            grad = torch.autograd.grad(loss, z)[0]
                            z = z - float(step_sizes[i]) * grad
                        updated.append(z.detach())
                        step_losses.append(float(loss.detach()))
                latents = torch.cat(updated)                                    # B x (1, 4, h, w) -> (B, 4, h, w)
                losses.append(step_losses)

            # 6. The ordinary guided step from the updated latents.
            eps = self.guided_eps(latents, t, text, guidance_scale)              # ε̃: (B, 4, h, w)
            out = self.scheduler.step(eps, t, latents, generator=generator)
            self.record_step(i, t, latents, eps, out, callback, intermediates)
            latents = out.prev_sample

        images = latents if output_type == "latent" else postprocess(self.decode(latents), output_type)
        return AttendAndExciteOutput(images=images, intermediates=intermediates, losses=losses)

    def token_attention(self, z: torch.Tensor, t, text: torch.Tensor, attn_res: tuple[int, int]) -> torch.Tensor:
        """Step 1: one UNet call on z (B, 4, h, w) with the prompt (B, 77, D) -> its per-token cross-attention maps
        at `attn_res`, averaged over heads and layers: (B, 77, *attn_res). Differentiable in z."""
        layers = attention_layers(self.unet, "cross")
        latent_hw = tuple(z.shape[-2:])
        with capture(layers):
            self.unet(z, t, encoder_hidden_states=text)
            probs = {name: layer.attention_probs for name, layer in layers.items()}  # each (B, heads, N, 77)
            sizes = {name: layer_size(p.shape[2], latent_hw) for name, p in probs.items()}
            chosen = [probs[name] for name, hw in sizes.items() if hw == tuple(attn_res)]
            if not chosen:
                raise ValueError(f"attn_res={tuple(attn_res)}: no cross-attention layer of this UNet has maps of that "
                                 f"size for {latent_hw[0]} x {latent_hw[1]} latents; its layers have "
                                 f"{sorted(set(sizes.values()), reverse=True)}. Pass one of those as attn_res "
                                 "((16, 16) for SD v1 at 512 x 512, (16, 16) for the bundled tiny-sd).")
            return average_maps(chosen, latent_hw, size=attn_res)

    def excite(self, z, t, text, token_indices, attn_res):
        """Steps 1-4 for one image: (loss L, z with gradients on). z: (1, 4, h, w), text: (1, 77, D)."""
        z = z.detach().requires_grad_(True)
        maps = self.token_attention(z, t, text, attn_res)[0]                 # (77, h, w)
        return attend_and_excite_loss(max_attention_per_token(maps, token_indices)), z

    def refine(self, z, t, text, token_indices, attn_res, loss, threshold, step_size, max_steps):
        """Iterative latent refinement (step 5): gradient steps on z until every subject's max attention reaches
        `threshold` (L <= 1 - threshold), at most `max_steps` times. Returns the new loss and z."""
        for _ in range(max_steps):
            if loss <= 1.0 - threshold:
                break
            loss, z = self.excite(z, t, text, token_indices, attn_res)
            if loss > 0:
                z = z - step_size * torch.autograd.grad(loss, z)[0]
        return self.excite(z, t, text, token_indices, attn_res)

    def get_indices(self, prompt: str) -> dict[int, str]:
        """{index: token} of the prompt, <|startoftext|> and <|endoftext|> included: pick the subjects from it."""
        ids = self.tokenizer(prompt).input_ids
        return dict(enumerate(self.tokenizer.convert_ids_to_tokens(ids)))

    def check_token_indices(self, prompts: list[str], token_indices) -> list[list[int]]:
        """One list of subject token indices per prompt, each a word of that prompt (not a start or end token)."""
        if isinstance(token_indices, (list, tuple)) and token_indices and all(
                isinstance(i, int) for i in token_indices):
            token_indices = [list(token_indices)] * len(prompts)
        if not (isinstance(token_indices, (list, tuple)) and token_indices and all(
                isinstance(ix, (list, tuple)) and ix and all(isinstance(i, int) for i in ix) for ix in token_indices)):
            raise TypeError(f"token_indices must be a non-empty list of ints (e.g. [2, 5]) or one such list per "
                            f"prompt; found {token_indices!r}.")
        if len(token_indices) != len(prompts):
            raise ValueError(f"Got {len(token_indices)} lists of token indices for {len(prompts)} prompts; pass one "
                             "list for all prompts, or one per prompt.")
        for prompt, ix in zip(prompts, token_indices):
            tokens = self.get_indices(prompt)
            last_word = min(len(tokens) - 2, self.tokenizer.model_max_length - 2)
            bad = [i for i in ix if not 1 <= i <= last_word]
            if bad:
                raise ValueError(f"token_indices {bad} are not words of the prompt {prompt!r}: choose among 1 to "
                                 f"{last_word} (0 is the start token, {last_word + 1} the end token). The prompt's "
                                 f"tokens are {tokens}.")
        return [list(ix) for ix in token_indices]

    @staticmethod
    def check_schedule(max_iter_to_alter, thresholds, scale_factor, max_refinement_steps) -> None:
        if not isinstance(max_iter_to_alter, int) or max_iter_to_alter < 0:
            raise ValueError(f"max_iter_to_alter must be an integer >= 0 (how many first steps to update); "
                             f"found {max_iter_to_alter!r}.")
        if not isinstance(thresholds, dict) or not all(
                isinstance(k, int) and isinstance(v, (int, float)) and 0 <= v <= 1 for k, v in thresholds.items()):
            raise ValueError(f"thresholds must be a dict {{step: minimum max-attention in [0, 1]}}, e.g. "
                             f"{{0: 0.05, 10: 0.5, 20: 0.8}}; found {thresholds!r}.")
        if not isinstance(scale_factor, (int, float)) or scale_factor < 0:
            raise ValueError(f"scale_factor must be a number >= 0 (the step size α); found {scale_factor!r}.")
        if not isinstance(max_refinement_steps, int) or max_refinement_steps < 0:
            raise ValueError(f"max_refinement_steps must be an integer >= 0; found {max_refinement_steps!r}.")
