"""A tiny CLIP tokenizer for the tiny world's captions: `vocab.json` + `merges.txt` in CLIP's own format.

CLIP's tokenizer is byte-level BPE (Radford et al. 2021, as in GPT-2, Sennrich et al. 2016): a word is
split into characters, the last one marked with `</w>` (end of word), and then pairs of neighbouring
pieces are merged, always the pair ranked first in `merges.txt`, until no listed pair is left.
Stable Diffusion's real files list 48,894 merges learned from web text. Ours list just enough merges to
build each caption word, so that every word of `scenes.caption_words()` becomes ONE token:

    "red":  r e d</w>  --(e d</w>)-->  r ed</w>  --(r ed</w>)-->  red</w>

Each merge joins one character to a piece that ends a word, so a merge can only ever apply at the end of
a word and words never interfere with one another. Any other text still tokenizes, as single bytes.
By default the words are those of the second edition's scenes (`scenes.caption_words()`: 41 words, 649 tokens,
the bundled tiny-sd's tokenizer); `--data shapes` writes the first edition's (26 words, 608 tokens).

The vocabulary is laid out like CLIP's: the 256 byte characters, the same with `</w>`, the merged
pieces, then `<|startoftext|>` and `<|endoftext|>` last (SD pads with `<|endoftext|>` too).

    python -m minidiff.training tokenizer --out some/folder/tokenizer [--data shapes]
"""

from __future__ import annotations

import json
import os

from . import scenes, shapes

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77  # CLIP's context length, which Stable Diffusion pads every prompt to


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's table from each byte to a printable character (spaces and control bytes are
    shifted to unused code points so that BPE never sees whitespace)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary (token -> id) and the ranked merges that turn each of `words` into one token."""
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[tuple[str, str]] = []
    for word in words:
        if not word.isascii() or not word.isalpha() or not word.islower():
            raise ValueError(f"Caption words must be lowercase ASCII letters; found {word!r}.")
        # Merge from the end: c_{n-1} + "c_n</w>", then c_{n-2} + "c_{n-1}c_n</w>", ...
        for k in range(len(word) - 2, -1, -1):
            pair = (word[k], word[k + 1:] + "</w>")
            if pair not in merges:
                merges.append(pair)
                tokens.append(pair[0] + pair[1])
    tokens += [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def data_caption_words(data: str) -> list[str]:
    """The caption words of --data: 'scenes' (the second edition) or 'shapes' (the first)."""
    return (scenes if data == "scenes" else shapes).caption_words()


def write_tokenizer(folder: str, words: list[str] | None = None) -> dict[str, int]:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json (as in SD v1's
    `tokenizer/`) for `words` (default: the scenes' caption words); returns the vocabulary."""
    vocab, merges = build_vocab(scenes.caption_words() if words is None else words)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, indent=0)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"content": None, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    special_tokens = {"bos_token": {**special, "content": BOS}, "eos_token": {**special, "content": EOS},
                      "pad_token": EOS, "unk_token": {**special, "content": EOS}}
    config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace",
              "model_max_length": MODEL_MAX_LENGTH, "tokenizer_class": "CLIPTokenizer", **special_tokens}
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special_tokens)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
    return vocab


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m minidiff.training tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the folder to write the tokenizer files to")
    parser.add_argument("--data", choices=("scenes", "shapes"), default="scenes",
                        help="whose caption words: 'scenes' (the second edition, the bundled tiny-sd) or 'shapes' "
                             "(the first edition)")
    args = parser.parse_args(argv)
    words = data_caption_words(args.data)
    vocab = write_tokenizer(args.out, words)
    print(f"wrote a {len(vocab)}-token CLIP vocabulary for {len(words)} {args.data} caption words to {args.out}")
