"""Prompt weighting and prompt blending: steering Stable Diffusion through its text embeddings alone.

The UNet reads the prompt only through CLIP's (77, D) matrix E, one row per token position (text.py). Both
techniques here change E and nothing else; the denoising loop is the one of `stable_diffusion.py`.

Prompt weighting, in the syntax of AUTOMATIC1111's web UI (modules/prompt_parser.py, sd_hijack_clip.py):

    "a (red:1.5) circle"   "red" weighs 1.5       "(red)"  = (red:1.1)     "[red]" = (red:1/1.1)
    groups nest and multiply: "((red))" = 1.21, "((red:1.5))" = 1.65; everything else weighs 1.

1. parse the prompt into pieces of text and their weights              [("a ", 1), ("red", 1.5), (" circle", 1)]
2. tokenize each piece; its tokens get its weight; <start>, <end> and the padding get 1   -> ids, w: (77,)
3. encode the ids with CLIP as usual                                    -> E: (1, 77, D)
4. scale each token's row by its weight, Ẽ_i = w_i E_i, then rescale all of Ẽ so that its mean is E's mean
   (A1111's method: the weights change the rows relative to each other, not the overall level of E)

Literal brackets cannot be written (there is no escape); a ":" outside a "(...)" group is plain text.

Prompt blending (compel's `("a red circle", "a blue circle").blend(0.5, 0.5)`): E = Σ_k b_k E_k / Σ_k b_k,
a weighted average of whole prompts' embeddings (a b_k may be negative, which extrapolates, if Σ b_k > 0).

`StableDiffusionPromptWeightingPipeline` reads weighted prompts and, as diffusers' StableDiffusionPipeline,
accepts ready-made `prompt_embeds=` / `negative_prompt_embeds=` (e.g. a blend) instead of the prompts.
"""

from __future__ import annotations

import math
import re
import warnings

import torch

from ..pipelines.checks import check_finite
from ..pipelines.outputs import ImagePipelineOutput, Intermediates, postprocess
from ..pipelines.stable_diffusion import StableDiffusionPipeline
from ..pipelines.text import as_prompt_list

PAREN_WEIGHT = 1.1      # "(word)": A1111's default emphasis; "[word]" divides by it
MAX_WEIGHT = 10.0

# One match per syntax element: ":1.5)" closes a "(" group with a weight; a lone ":" is plain text.
SYNTAX = re.compile(r"(?P<weight>:(?P<number>[^()\[\]]*)\))|(?P<open>[(\[])|(?P<close>[)\]])|(?P<text>[^()\[\]:]+|:)")


def parse_prompt_weights(prompt: str) -> list[tuple[str, float]]:
    """"a (red:1.5) circle" -> [("a ", 1.0), ("red", 1.5), (" circle", 1.0)] (step 1)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string; found {type(prompt).__name__}.")
    pieces: list[list] = []           # [text, weight], in the order of the prompt
    groups: list[tuple[str, int, int]] = []   # open groups: (bracket, position in the prompt, index of first piece)

    def close(bracket: str, position: int, weight: float) -> None:
        if not groups or groups[-1][0] != bracket:
            found = f"'{groups[-1][0]}' opened at position {groups[-1][1]}" if groups else "no open group"
            raise ValueError(f"Unbalanced brackets in prompt {prompt!r}: the '{')' if bracket == '(' else ']'}' at "
                             f"position {position} closes a '{bracket}', but there is {found}. Write '(words)', "
                             "'(words:1.3)' or '[words]'; literal brackets are not supported.")
        _, _, first = groups.pop()
        for piece in pieces[first:]:  # nested groups multiply
            piece[1] *= weight

    for m in SYNTAX.finditer(prompt):
        if m["open"]:
            groups.append((m["open"], m.start(), len(pieces)))
        elif m["close"]:
            close("(" if m["close"] == ")" else "[", m.start(), PAREN_WEIGHT if m["close"] == ")" else 1 / PAREN_WEIGHT)
        elif m["weight"]:
            number = m["number"].strip()
            try:
                weight = float(number)
            except ValueError:
                raise ValueError(f"In prompt {prompt!r} the weight after ':' at position {m.start()} is {number!r}, "
                                 "not a number. Write e.g. '(red:1.3)'.") from None
            check_weight(weight, f"In prompt {prompt!r} the weight at position {m.start() + 1}")
            close("(", m.start() + len(m[0]) - 1, weight)
        else:
            pieces.append([m["text"], 1.0])
    if groups:
        bracket, position, _ = groups[-1]
        raise ValueError(f"Unbalanced brackets in prompt {prompt!r}: the '{bracket}' at position {position} is never "
                         f"closed. Close it with '{')' if bracket == '(' else ']'}'.")
    for text, weight in pieces:
        check_weight(weight, f"In prompt {prompt!r} the weight of {text!r} (nested groups multiply)")
    return [(text, weight) for text, weight in pieces if text]


def check_weight(weight: float, what: str) -> None:
    if not (math.isfinite(weight) and 0 <= weight <= MAX_WEIGHT):
        raise ValueError(
            f"{what} is {weight}; token weights must be numbers in [0, {MAX_WEIGHT:g}]. A negative weight flips the "
            "sign of the token's embedding, which does not mean 'the opposite of the word' (use negative_prompt for "
            f"that); a weight far above 1 pushes the token outside anything the UNet saw in training and the image "
            "breaks. Weights of 0.5 to 1.5 are the useful range.")


def prompt_token_weights(tokenizer, prompt: str, weights=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: (ids, weights), both (77,). `weights`: optional, one per token of the prompt read as plain
    text (no syntax), instead of the "(word:w)" syntax; the start, end and padding tokens get weight 1."""
    if weights is None:
        pieces = parse_prompt_weights(prompt)
        ids, token_weights = [], []
        for text, weight in pieces:
            piece_ids = tokenizer(text, add_special_tokens=False).input_ids   # a word may be several tokens
            ids += piece_ids
            token_weights += [weight] * len(piece_ids)
    else:
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        token_weights = [float(w) for w in weights]
        if len(token_weights) != len(ids):
            tokens = [t.replace("</w>", "") for t in tokenizer.convert_ids_to_tokens(ids)]
            raise ValueError(f"Got {len(token_weights)} weights for the {len(ids)} tokens of {prompt!r}: {tokens}. "
                             "Pass one weight per token (without the start and end tokens).")
        for i, w in enumerate(token_weights):
            check_weight(w, f"weights[{i}]")
    length = tokenizer.model_max_length                                      # 77 for CLIP
    if len(ids) > length - 2:
        warnings.warn(f"CLIP reads at most {length} tokens; this part of the prompt was cut off: "
                      f"{tokenizer.decode(ids[length - 2:])}", stacklevel=3)
        ids, token_weights = ids[:length - 2], token_weights[:length - 2]
    padding = length - 2 - len(ids)
    ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding
    token_weights = [1.0, *token_weights, 1.0] + [1.0] * padding
    return torch.tensor(ids), torch.tensor(token_weights)


def apply_token_weights(embeddings: torch.Tensor, weights: torch.Tensor, renormalize: bool = True) -> torch.Tensor:
    """Step 4: (B, 77, D) embeddings, (77,) weights -> (B, 77, D)."""
    # Ẽ_i = w_i E_i: one weight per row (token position)
    weighted = embeddings * weights.to(embeddings)[None, :, None]              # (B, 77, D) * (1, 77, 1)
    mean_before, mean_after = embeddings.mean(), weighted.mean()
    if not renormalize or mean_before.abs() <= 1e-4 * embeddings.abs().mean():
        # A text encoder whose last LayerNorm has no bias (the first tiny-sd's random one) gives rows of mean 0: there is
        # no mean to restore, and mean_before / mean_after would be a ratio of rounding errors.
        return weighted
    if mean_after.abs() <= 1e-4 * weighted.abs().mean():
        raise ValueError("These weights cancel the mean of the embeddings, so A1111's rescale (mean before / mean "
                         "after) is undefined; use weights closer to 1, or renormalize=False.")
    # Ẽ <- Ẽ · mean(E) / mean(Ẽ): the same mean as before the weighting
    return weighted * (mean_before / mean_after)


@torch.no_grad()
def weighted_prompt_embeddings(pipe, prompt: str, weights=None, renormalize: bool = True) -> torch.Tensor:
    """Steps 1-4: a prompt with "(word:w)" weights (or plain text and a `weights` list) -> (1, 77, D)."""
    ids, token_weights = prompt_token_weights(pipe.tokenizer, prompt, weights)   # (77,), (77,)
    embeddings = pipe.text_encoder(ids[None].to(pipe.device))[0]                # last_hidden_state: (1, 77, D)
    return apply_token_weights(embeddings, token_weights, renormalize)


@torch.no_grad()
def blend_prompt_embeddings(pipe, prompts: list[str], weights: list[float]) -> torch.Tensor:
    """E = Σ_k b_k E_k / Σ_k b_k over (weighted) prompts: K prompts, K weights -> (1, 77, D)."""
    prompts = as_prompt_list(prompts, "prompts")
    if not isinstance(weights, (list, tuple)) or len(weights) != len(prompts):
        raise ValueError(f"Got {len(prompts)} prompts and weights={weights!r}; pass one blend weight per prompt.")
    total = sum(float(b) for b in weights)
    if not total > 0:
        raise ValueError(f"The blend weights {list(weights)} sum to {total}; the blend divides by their sum, so it "
                         "must be > 0 (e.g. [0.5, 0.5], or [1.5, -0.5] to extrapolate).")
    embeddings = torch.cat([weighted_prompt_embeddings(pipe, p) for p in prompts])       # (K, 77, D)
    b = torch.tensor([float(w) / total for w in weights]).to(embeddings)               # (K,), sums to 1
    return (b[:, None, None] * embeddings).sum(dim=0, keepdim=True)                    # (K, 77, D) -> (1, 77, D)


class StableDiffusionPromptWeightingPipeline(StableDiffusionPipeline):
    """Text-to-image whose prompts may carry "(word:w)" weights, or which takes `prompt_embeds=` (and
    `negative_prompt_embeds=`) of shape (P, 77, D) instead of prompts, as diffusers' StableDiffusionPipeline."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback=None,
        return_intermediates: bool = False,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> ImagePipelineOutput:
        """As `StableDiffusionPipeline.__call__`; only step 1, the text embeddings, differs."""
        # 0. Check the inputs before any work is done.
        guidance = guidance_scale > 1.0
        text = self.text_embeddings(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                    num_images_per_prompt, guidance)       # (2B, 77, D) or (B, 77, D)
        batch_size = text.shape[0] // 2 if guidance else text.shape[0]
        _, _, latent_shape = self.check_inputs(batch_size, height, width, output_type, generator, latents,
                                               num_inference_steps, guidance_scale)
        self.warn_if_slow()

        # 2.-5. Timesteps, z_T, the denoising loop and decoding, exactly as in text-to-image.
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        latents = self.prepare_latents(latent_shape, text.dtype, generator, latents)
        intermediates = Intermediates(initial_latents=latents.clone()) if return_intermediates else None
        latents = self.denoise(latents, self.scheduler.timesteps, text, guidance_scale, generator, callback,
                               intermediates)
        images = latents if output_type == "latent" else postprocess(self.decode(latents), output_type)
        return ImagePipelineOutput(images=images, intermediates=intermediates)

    def text_embeddings(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                        num_images_per_prompt: int, guidance: bool) -> torch.Tensor:
        """Step 1: [unconditional; prompt], (2B, 77, D) with guidance, else (B, 77, D); B = P · images per prompt."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Pass either prompt or prompt_embeds (of shape (P, 77, D)), not both and not neither.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either negative_prompt or negative_prompt_embeds, not both.")
        if prompt_embeds is None:
            cond = torch.cat([weighted_prompt_embeddings(self, p) for p in as_prompt_list(prompt)])   # (P, 77, D)
        else:
            cond = self.check_embeds(prompt_embeds, "prompt_embeds")
        P = cond.shape[0]
        cond = cond.repeat_interleave(num_images_per_prompt, dim=0)       # (B, 77, D): p0, p0, p1, p1, ...
        if not guidance:
            return cond
        if negative_prompt_embeds is not None:
            uncond = self.check_embeds(negative_prompt_embeds, "negative_prompt_embeds")
            if uncond.shape != (P, *cond.shape[1:]):
                raise ValueError(f"negative_prompt_embeds has shape {tuple(uncond.shape)} but the prompts' embeddings "
                                 f"are {(P, *cond.shape[1:])}; pass one negative embedding per prompt.")
        else:
            negatives = [""] * P if negative_prompt is None else as_prompt_list(negative_prompt, "negative_prompt")
            negatives = negatives * P if len(negatives) == 1 else negatives
            if len(negatives) != P:
                raise ValueError(f"Got {len(negatives)} negative prompts for {P} prompts; pass one negative prompt, "
                                 "or one per prompt.")
            uncond = torch.cat([weighted_prompt_embeddings(self, n) for n in negatives])            # (P, 77, D)
        uncond = uncond.repeat_interleave(num_images_per_prompt, dim=0)   # (B, 77, D)
        return torch.cat([uncond, cond])                                  # (2B, 77, D)

    def check_embeds(self, embeds, name: str) -> torch.Tensor:
        D = self.unet.config.cross_attention_dim
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[-1] != D:
            found = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"{name} must be a (P, 77, {D}) tensor (one row of CLIP embeddings per token, e.g. "
                             f"from weighted_prompt_embeddings); found {found}.")
        check_finite(embeds, name, "Check how the embeddings were made (a weight or a blend that divided by zero?).")
        return embeds.to(device=self.device, dtype=self.dtype)
