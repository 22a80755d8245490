"""TIME: text-to-image model editing (Orgad, Kawar & Belinkov 2023, https://arxiv.org/abs/2303.08084).

Edit what a model assumes about a concept ("roses" -> "blue roses") by changing the weights once, in closed
form, instead of changing every prompt. The text reaches the UNet only through the key and value projections
W_K, W_V of its cross-attention layers (k = W_K c, v = W_V c for each token embedding c), so TIME moves only
those: the source tokens c_i should now give the keys/values that the destination tokens c*_i gave before.

1. encode the source prompt ("a circle") and the destination prompt ("a blue circle"), and the same two
   after each augmentation ("a photo of ...", "an image of ...", "a picture of ...")   -> (77, D) each
2. align the tokens: source token i -> the next equal destination token j (here "a"->"a", "circle"->"circle";
   "blue" has no source token), then the padding positions; the target of c_i is v*_i = W_old c*_j
3. for every cross-attention to_v (and to_k) projection W, solve the ridge regression
       min_W'  sum_i ||W' c_i - v*_i||^2 + lamb ||W' - W||_F^2
   whose minimum is (TIME, eq. 5)
       W' = (lamb W + sum_i v*_i c_i^T) (lamb I + sum_i c_i c_i^T)^-1
4. generate as usual: every prompt that contains "circle" now reads "circle" as "blue circle"; prompts without
   it change little (the edit is local), and lamb trades editing strength for staying close to W.

The alignment and augmentations follow diffusers' StableDiffusionModelEditingPipeline, whose `edit_model` this
reproduces; `restart_params=True` first restores the original projections so that edits do not compound.
"""

from __future__ import annotations

import math

import torch

from ..pipelines.stable_diffusion import StableDiffusionPipeline
from ..pipelines.text import encode_text
from .attention_maps import attention_layers

AUGMENTATIONS = ("A photo of ", "An image of ", "A picture of ")   # diffusers' AUGS_CONST, as in the paper


def align_tokens(tokenizer, source: str, destination: str) -> list[int]:
    """For each of the 77 source positions, the destination position whose embedding it should take.

    Source token i maps to the first destination token equal to it after the previous match, so every source
    token must appear in the destination, in order. "an" counts as "a". The padding positions follow on.
    """
    a_id = tokenizer.encode("a ")[1]
    ids = [[a_id if tokenizer.decode(t) == "an" else t for t in tokenizer(text).input_ids]   # with BOS and EOS
           for text in (source, destination)]
    tokens_a, tokens_b = ids
    length = tokenizer.model_max_length                                                   # 77
    for text, tokens in zip((source, destination), ids):
        if len(tokens) > length:
            raise ValueError(f"{text!r} has {len(tokens)} tokens; TIME edits with prompts of at most {length} "
                             "(CLIP's limit). Shorten it.")
    replace, j = [], 0
    for token in tokens_a:
        while j < len(tokens_b) and tokens_b[j] != token:
            j += 1
        if j == len(tokens_b):
            words_a, words_b = tokenizer.convert_ids_to_tokens(tokens_a), tokenizer.convert_ids_to_tokens(tokens_b)
            raise ValueError(
                f"Cannot align {source!r} with {destination!r}: TIME needs every source token in the destination, "
                f"in the same order, but {tokenizer.decode(token)!r} is not there (source tokens {words_a}, "
                f"destination {words_b}). Name the concept in the source and add the new attribute in the "
                "destination, e.g. 'a circle' -> 'a blue circle'.")
        replace.append(j)
        j += 1
    replace += list(range(j, length))                  # the padding after the destination's end of text
    replace += [length - 1] * (length - len(replace))  # short by the destination's extra tokens: repeat the last
    return replace


class StableDiffusionModelEditingPipeline(StableDiffusionPipeline):
    """Text -> image, plus `edit_model(source_prompt, destination_prompt)` that rewrites the cross-attention
    projections. Generation itself is StableDiffusionPipeline's."""

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, with_to_k: bool = True,
                 with_augs=AUGMENTATIONS, safety_checker=None, feature_extractor=None,
                 requires_safety_checker: bool = False):
        # The last three as in diffusers' constructor; see StableDiffusionPipeline.__init__.
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                         requires_safety_checker)
        self.with_to_k = with_to_k          # edit W_K as well as W_V (the paper edits both)
        self.with_augs = list(with_augs)    # [] for no augmentation
        self.original_weights = None        # {name: weight} of every edited projection, kept at the first edit

    def projections(self) -> dict[str, torch.nn.Linear]:
        """The projections TIME edits: every cross-attention layer's to_v, then its to_k, by checkpoint name."""
        layers = attention_layers(self.unet, "cross")
        names = ["to_v", "to_k"] if self.with_to_k else ["to_v"]
        return {f"{layer_name}.{p}": getattr(layer, p) for p in names for layer_name, layer in layers.items()}

    @torch.no_grad()
    def restore_projections(self) -> None:
        """Undo every edit: copy the weights kept at the first edit back (a no-op before any edit)."""
        for name, projection in self.projections().items():
            if self.original_weights is not None and name in self.original_weights:
                projection.weight.copy_(self.original_weights[name])

    @torch.no_grad()
    def edit_model(self, source_prompt: str, destination_prompt: str, lamb: float = 0.1,
                   restart_params: bool = True) -> None:
        """Make `source_prompt`'s concept read as `destination_prompt` (TIME, eq. 5); `lamb` > 0 keeps W close.

        `restart_params=False` edits the already edited weights (edits accumulate).
        """
        # 0. Check the inputs.
        for what, text in (("source_prompt", source_prompt), ("destination_prompt", destination_prompt)):
            if not isinstance(text, str) or not text:
                raise TypeError(f"{what} must be a non-empty string; found {text!r}.")
        if not isinstance(lamb, (int, float)) or not (lamb > 0 and math.isfinite(lamb)):
            raise ValueError(f"lamb must be a positive finite number (the pull towards the original weights; "
                             f"0.1 in the paper); found {lamb!r}.")
        layers = attention_layers(self.unet, "cross")
        if any(layer.fused for layer in layers.values()):
            raise RuntimeError("The cross-attention projections are fused (fuse_qkv_projections), so an edit of "
                               "to_k / to_v would not be used; call pipe.unfuse_qkv_projections() first.")

        # 1. The prompt pairs: the prompts themselves, then each augmentation ("A red rose" -> "a photo of a red rose"),
        # and for each pair the destination position of every source position (raises before any weight changes).
        pairs = [(source_prompt, destination_prompt)]
        for aug in self.with_augs:
            pairs.append(tuple(aug + (p if p[:1] != "A" else "a" + p[1:]) for p in (source_prompt, destination_prompt)))
        replaces = [align_tokens(self.tokenizer, source, destination) for source, destination in pairs]  # P x 77

        projections = self.projections()
        if self.original_weights is None:
            self.original_weights = {name: p.weight.detach().clone() for name, p in projections.items()}
        if restart_params:
            self.restore_projections()

        # 2. Token embeddings: c_i of the source, c*_i of the aligned destination token, each (P*77, D).
        c, c_star = [], []
        for (source, destination), replace in zip(pairs, replaces):
            old, new = encode_text(self.tokenizer, self.text_encoder, [source, destination], self.device)  # 2 x (77, D)
            c.append(old)
            c_star.append(new[replace])                                                   # (77, D) reordered
        c, c_star = torch.cat(c), torch.cat(c_star)                                       # (P*77, D)

        # 3. W' = (lamb W + sum_i v*_i c_i^T)(lamb I + sum_i c_i c_i^T)^-1 for every projection, v*_i = W c*_i.
        # The token embeddings are nearly collinear (for SD, 4 x 77 of them in 768 dimensions: only lamb I makes
        # the sum invertible), so the normal equations are solved in float64; in float32 the round-off is ~1e-3 of W.
        D = c.shape[1]
        c64 = c.double()
        mat2 = lamb * torch.eye(D, device=c.device, dtype=torch.float64) + c64.T @ c64       # (D, D), symmetric
        for projection in projections.values():
            W = projection.weight.double()                                                # (D_out, D)
            v_star = projection(c_star).double()                                          # (P*77, D_out)
            mat1 = lamb * W + v_star.T @ c64                                              # (D_out, D)
            # W' = mat1 mat2^-1  <=>  mat2 W'^T = mat1^T   (mat2 = mat2^T)
            projection.weight.copy_(torch.linalg.solve(mat2, mat1.T).T)
