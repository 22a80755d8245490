"""Text conditioning for Stable Diffusion: prompt -> CLIP token ids -> CLIP text embeddings, and
classifier-free guidance.

Stable Diffusion v1 conditions its UNet on the last hidden state of CLIP ViT-L/14's text encoder
(Radford et al. 2021; Rombach et al. 2022, sec. 3.3): every prompt becomes exactly 77 token ids
(`<|startoftext|>`, the words, `<|endoftext|>`, then `<|endoftext|>` as padding), and the encoder
turns them into a (77, 768) matrix that the UNet's cross-attention layers read.

Classifier-free guidance (Ho & Salimans 2022) runs the UNet twice per step, with the prompt and with
an "unconditional" prompt (the empty string, or a negative prompt), and extrapolates away from the
unconditional prediction:

    ε̃ = ε(x_t, ∅) + w · (ε(x_t, c) - ε(x_t, ∅))      (Ho & Salimans 2022, eq. 6, with w = 1 + their w)
"""

from __future__ import annotations

import warnings

import torch

from ..loaders.textual_inversion import expand_multi_vector_tokens


def as_prompt_list(prompt, what: str = "prompt") -> list[str]:
    """A prompt (str) or prompts (list of str) as a list, with a clear error for anything else."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"{what} must be a string or a non-empty list of strings; found {prompt!r}.")


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Prompts -> token ids padded (and truncated) to the tokenizer's 77 positions: (B, 77)."""
    max_length = tokenizer.model_max_length  # 77 for CLIP
    # A Textual Inversion concept of n vectors is n tokens: "<t>" -> "<t> <t>_1 ... <t>_{n-1}" (loaders/).
    prompts = [expand_multi_vector_tokens(tokenizer, p) for p in prompts]
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids
    full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > max_length:
        cut = tokenizer.batch_decode(full[:, max_length - 1: -1])
        warnings.warn(f"CLIP reads at most {max_length} tokens; this part of the prompt was cut off: {cut}",
                      stacklevel=3)
    return ids


def encode_text(tokenizer, text_encoder, prompts: list[str], device) -> torch.Tensor:
    """Prompts -> CLIP's last hidden state: (B, 77, D), D = 768 for SD v1."""
    ids = tokenize(tokenizer, prompts).to(device)                   # (B, 77)
    text = text_encoder(ids)[0]                                     # last_hidden_state: (B, 77, D)
    # Checked once here (one host sync), because a NaN in the text spreads to every latent at the first step.
    if not torch.isfinite(text).all():
        raise FloatingPointError(
            "The text encoder's output (the prompt embeddings) holds non-finite values (NaN or inf); the image would "
            "be all black. Expected finite embeddings. Likely cause: a NaN or inf weight in the text encoder, or "
            "float16 overflow: run it in torch.float32 or torch.bfloat16 (pipe.text_encoder.to(torch.float32)).")
    return text


def prompt_embeddings(tokenizer, text_encoder, prompts: list[str], negative_prompt, num_images_per_prompt: int,
                      guidance: bool, device) -> torch.Tensor:
    """The UNet's `encoder_hidden_states` for a batch of B = len(prompts) * num_images_per_prompt images.

    With guidance, (2B, 77, D): the B unconditional rows first, then the B prompt rows, in the order
    that `classifier_free_guidance` undoes with `chunk(2)`. Without, (B, 77, D).
    """
    cond = encode_text(tokenizer, text_encoder, prompts, device)       # (P, 77, D)
    cond = cond.repeat_interleave(num_images_per_prompt, dim=0)      # (B, 77, D): p0, p0, p1, p1, ...
    if not guidance:
        if negative_prompt is not None:
            warnings.warn(f"negative_prompt={negative_prompt!r} is not used: guidance_scale <= 1 turns classifier-free "
                          "guidance off, and the negative prompt acts only through it. Raise guidance_scale above 1 "
                          "(7.5 is usual) or drop negative_prompt.", stacklevel=3)
        return cond
    if negative_prompt is None:
        negatives = [""] * len(prompts)                              # the unconditional prompt ∅
    else:
        negatives = as_prompt_list(negative_prompt, "negative_prompt")
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"Got {len(negatives)} negative prompts for {len(prompts)} prompts; pass one "
                             "negative prompt, or one per prompt.")
    uncond = encode_text(tokenizer, text_encoder, negatives, device)
    uncond = uncond.repeat_interleave(num_images_per_prompt, dim=0)  # (B, 77, D)
    return torch.cat([uncond, cond])                                 # (2B, 77, D)


def classifier_free_guidance(eps: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """(2B, C, h, w) from one UNet call on [unconditional; conditional] -> the guided ε̃: (B, C, h, w)."""
    eps_uncond, eps_text = eps.chunk(2)                              # (2B, ...) -> 2 x (B, ...)
    return eps_uncond + guidance_scale * (eps_text - eps_uncond)
