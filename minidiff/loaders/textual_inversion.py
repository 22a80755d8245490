"""Textual Inversion (Gal et al. 2022, https://arxiv.org/abs/2208.01618): a new word, learned as embedding rows.

Textual Inversion leaves every weight of the model alone. It adds a token (`<cat-toy>`) to the tokenizer and
one learned row per vector to the text encoder's input embedding table (vocab, D), D = 768 for SD v1. A
concept of n vectors is n tokens, `<cat-toy> <cat-toy>_1 ... <cat-toy>_{n-1}` (diffusers' convention), and
every prompt that names `<cat-toy>` is expanded to all n before it is tokenized (`expand_multi_vector_tokens`).

The files people download (techniques.md, "Textual Inversion"):

    diffusers           learned_embeds.safetensors (or .bin)   {"<token>": (n, D) or (D,)}
    sd-concepts-library learned_embeds.bin (pickle)            {"<token>": (D,)}
    A1111 / webui       name.pt (pickle)                       {"string_to_param": {"*": (n, D)}, "name": str,
                                                                "string_to_token": {"*": 265}, "step": int,
                                                                "sd_checkpoint": str, "sd_checkpoint_name": str}
    A1111 / webui       name.safetensors                       {"emb_params": (n, D)}: the file name is the word

The webui writes plain dicts, strings and numbers, which `torch.load(weights_only=True)` reads. Files saved by
the original textual_inversion code (rinongal, 2022) hold a `torch.nn.ParameterDict` instead: a module class,
which weights_only refuses, so minidiff refuses the file, names it and runs nothing from it.

Where diffusers 0.42.1 differs: it takes the key `emb_params` of an A1111 safetensors file as the token (the
webui uses the file's name, as minidiff does).
"""

from __future__ import annotations

import os

import torch

from ..core.compat import resize_token_embeddings
from .files import find_weight_file, read_weight_file, save_weight_file

TEXT_INVERSION_NAME = "learned_embeds.bin"
TEXT_INVERSION_NAME_SAFE = "learned_embeds.safetensors"


def token_and_embedding(data, token: str | None, source: str) -> tuple[str, torch.Tensor]:
    """One loaded file or dict -> (token, (n, D) embedding rows), in the three layouts of the module docstring."""
    if isinstance(data, torch.Tensor):
        if token is None:
            raise ValueError(f"{source} is a bare tensor: it names no token. Pass token='<your-token>'.")
        found_token, embedding = token, data
    elif isinstance(data, dict) and "string_to_param" in data:   # A1111 / webui
        params = data["string_to_param"]
        if not isinstance(params, dict) or "*" not in params:
            raise ValueError(f"{source} looks like an A1111 embedding but its 'string_to_param' is not "
                             f"{{'*': tensor}}: found {type(params).__name__}. Re-save it from the webui.")
        found_token, embedding = data.get("name"), params["*"]
        if token is None and not isinstance(found_token, str):
            raise ValueError(f"{source} (A1111 format) has no 'name'; pass token='<your-token>'.")
    elif isinstance(data, dict) and set(data) == {"emb_params"}:  # A1111's .safetensors: the file name is the word
        found_token, embedding = os.path.splitext(os.path.basename(source))[0], data["emb_params"]
    elif isinstance(data, dict) and len(data) == 1:              # diffusers / sd-concepts-library
        found_token, embedding = next(iter(data.items()))
    else:
        keys = list(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"{source} is not a Textual Inversion embedding: expected one entry {{'<token>': (n, D) tensor}} "
            f"(diffusers, sd-concepts-library) or an A1111 dict with 'string_to_param'; found {keys}. "
            "A LoRA goes to load_lora_weights, Custom Diffusion's attention weights to load_attn_procs.")
    if not isinstance(embedding, torch.Tensor) or embedding.ndim not in (1, 2) or embedding.numel() == 0:
        shape = tuple(embedding.shape) if isinstance(embedding, torch.Tensor) else type(embedding).__name__
        raise ValueError(f"{source}: expected the embedding as a (D,) or (n, D) tensor, found {shape}.")
    return (token if token is not None else found_token), embedding.reshape(-1, embedding.shape[-1])


def multi_vector_tokens(token: str, n: int) -> list[str]:
    """n vectors -> n tokens: `<t>`, `<t>_1`, ..., `<t>_{n-1}` (diffusers' names)."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def load_textual_inversion(tokenizer, text_encoder, pretrained_model_name_or_path, token=None,
                           weight_name: str | None = None, subfolder: str | None = None) -> list[str]:
    """Add one or several concepts to `tokenizer` and `text_encoder`; returns the tokens added.

    `pretrained_model_name_or_path`: a file, folder or hub repo id (learned_embeds.safetensors, else .bin), a
    dict, a (n, D) tensor (with token=), or a list of those (with a list of tokens, or None). Every input is
    checked before the tokenizer or the text encoder is changed.
    """
    sources = pretrained_model_name_or_path if isinstance(pretrained_model_name_or_path, list) \
        else [pretrained_model_name_or_path]
    tokens = token if isinstance(token, list) else [token] * len(sources)
    if len(tokens) != len(sources):
        raise ValueError(f"Got {len(sources)} embeddings and {len(tokens)} tokens; pass one token per embedding "
                         "(or token=None to use the names stored in the files).")

    # 1. Read every file, and name every token.
    concepts = []
    for src, tok in zip(sources, tokens):
        if isinstance(src, (dict, torch.Tensor)):
            data, where = src, "the given embedding"
        else:
            where = find_weight_file(src, (TEXT_INVERSION_NAME_SAFE, TEXT_INVERSION_NAME), weight_name, subfolder,
                                     "Textual Inversion embedding")
            data = read_weight_file(where)
        concepts.append(token_and_embedding(data, tok, where) + (where,))

    # 2. Check them all: new tokens, no duplicates, the text encoder's width.
    width = text_encoder.get_input_embeddings().weight.shape[1]              # D
    vocab = tokenizer.get_vocab()
    new_tokens = []
    for tok, embedding, where in concepts:
        names = multi_vector_tokens(tok, embedding.shape[0])
        taken = [t for t in names + [f"{tok}_1"] if t in vocab]
        if taken:
            raise ValueError(f"The token(s) {sorted(set(taken))} of {where} are already in the tokenizer's "
                             "vocabulary; a concept needs a new word. Pass another token=, or load the pipeline "
                             "again to drop the concepts loaded before.")
        if embedding.shape[1] != width:
            raise ValueError(f"{where}: the embedding is {embedding.shape[1]} wide but this text encoder's token "
                             f"embeddings are {width} wide (SD v1: 768, SD 2: 1024). The concept was trained for "
                             "another model; use an embedding made for this one.")
        if not torch.isfinite(embedding).all():
            raise ValueError(f"{where}: the embedding holds NaN or inf; every image with the token would be black. "
                             "The file is damaged or the training diverged: use another embedding.")
        if not isinstance(tok, str) or not tok.strip():
            raise TypeError(f"{where}: expected the token as a non-empty string, found {tok!r}. Pass token=.")
        new_tokens += names
    if len(set(new_tokens)) != len(new_tokens):
        raise ValueError(f"The tokens {new_tokens} hold duplicates; give each concept its own token.")

    # 3. Grow the embedding table by one row per vector and write the learned rows there.
    # The new rows are written over below, so transformers need not sample them (core/compat.py).
    resize_token_embeddings(text_encoder, len(tokenizer) + len(new_tokens))
    table = text_encoder.get_input_embeddings().weight                       # (vocab + new, D)
    with torch.no_grad():
        for tok, embedding, _ in concepts:
            for name, row in zip(multi_vector_tokens(tok, embedding.shape[0]), embedding):
                tokenizer.add_tokens(name)
                table[tokenizer.convert_tokens_to_ids(name)] = row.to(table.device, table.dtype)
    return new_tokens


def expand_multi_vector_tokens(tokenizer, prompt: str) -> str:
    """"a <t> toy" -> "a <t> <t>_1 <t>_2 toy" when <t> has three vectors (diffusers' maybe_convert_prompt)."""
    added = tokenizer.get_added_vocab()
    for token in set(tokenizer.tokenize(prompt)):
        if token in added and f"{token}_1" in added:
            replacement, i = token, 1
            while f"{token}_{i}" in added:
                replacement += f" {token}_{i}"
                i += 1
            prompt = prompt.replace(token, replacement)
    return prompt


def save_textual_inversion(save_directory: str, tokenizer, text_encoder, token: str, weight_name: str | None = None,
                           safe_serialization: bool = True) -> str:
    """Write the rows of `token` (and `token_1`, ...) as diffusers' training script does: {token: (n, D)}.

    Returns the file's path (learned_embeds.safetensors, or .bin with safe_serialization=False)."""
    added = tokenizer.get_added_vocab()
    if token not in added:
        raise ValueError(f"{token!r} is not a token added to this tokenizer; found the added tokens "
                         f"{sorted(added)}. Load or add the concept first.")
    n = 1
    while f"{token}_{n}" in added:
        n += 1
    ids = [tokenizer.convert_tokens_to_ids(t) for t in multi_vector_tokens(token, n)]
    rows = text_encoder.get_input_embeddings().weight[ids].detach().cpu()    # (n, D)
    weight_name = weight_name or (TEXT_INVERSION_NAME_SAFE if safe_serialization else TEXT_INVERSION_NAME)
    return save_weight_file({token: rows}, os.fspath(save_directory), weight_name, safe_serialization)
