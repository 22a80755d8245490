"""Textual Inversion loading and saving against diffusers on a small random SD model: the diffusers safetensors,
sd-concepts-library .bin and A1111 .pt layouts, multi-vector tokens, files saved by minidiff read by diffusers, and
clear errors (token in the vocabulary, wrong width, a file of another kind, a pickle with code) with nothing
changed and nothing run."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from fake_checkpoints import make_fake_sd
from helpers import gen, load_diffusers, load_minidiff, max_pixel_diff, rel_err
from minidiff import StableDiffusionPipeline
from minidiff.core.checkpoint_file import UnsafeCheckpointError
from minidiff.loaders.textual_inversion import expand_multi_vector_tokens
from minidiff.pipelines.text import encode_text

pytestmark = pytest.mark.usefixtures("one_thread")
D = 32            # the fake SD's text encoder width (tests/fake_checkpoints.py TINY_CLIP_TEXT)
RUN = dict(num_inference_steps=3, output_type="np")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory, reference_dir):
    return make_fake_sd(tmp_path_factory.mktemp("sd"), reference_dir)


def pair(folder):
    """Fresh pipelines (Textual Inversion changes the tokenizer and text encoder in place)."""
    return load_minidiff(StableDiffusionPipeline, folder), load_diffusers("StableDiffusionPipeline", folder)


def rows(n: int, seed: int) -> torch.Tensor:
    """n random embedding vectors, at the scale of CLIP's token embeddings (randomize_ gives 1/sqrt(D))."""
    return torch.randn(n, D, generator=gen(seed)) / D ** 0.5


def write(folder, layout: str, token: str, embedding: torch.Tensor) -> str:
    """A file in one of the downloaded layouts; returns its path."""
    os.makedirs(folder, exist_ok=True)
    if layout == "diffusers":            # diffusers' train_textual_inversion.py save_progress
        path = os.path.join(folder, "learned_embeds.safetensors")
        save_file({token: embedding.contiguous()}, path)
    elif layout == "sd-concepts":        # sd-concepts-library: a pickle, one (D,) vector
        path = os.path.join(folder, "learned_embeds.bin")
        torch.save({token: embedding[0].clone()}, path)
    else:                                # A1111 webui: plain dict, strings and numbers, as textual_inversion.py saves
        path = os.path.join(folder, f"{token}.pt")
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": embedding.clone().requires_grad_()},
                    "name": token, "step": 1500, "sd_checkpoint": "7460a6fa", "sd_checkpoint_name": "v1-5"}, path)
    return path


@pytest.mark.parametrize("layout, n", [("diffusers", 3), ("diffusers", 1), ("sd-concepts", 1), ("a1111", 2)])
def test_images_equal_diffusers(sd_folder, tmp_path, layout, n):
    path = write(tmp_path / layout, layout, "<toy>", rows(n, seed=n))
    mine, ref = pair(sd_folder)
    added = mine.load_textual_inversion(path)
    ref.load_textual_inversion(path)
    assert added == ["<toy>"] + [f"<toy>_{i}" for i in range(1, n)]
    assert len(mine.tokenizer) == len(ref.tokenizer) == 49408 + n
    table = mine.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[-n:], rows(n, seed=n)[:n] if layout != "sd-concepts" else rows(1, seed=1))

    prompt, negative = "a <toy> on a table", "a blurry <toy>"
    a = mine(prompt, negative_prompt=negative, generator=gen(0), **RUN).images
    b = ref(prompt, negative_prompt=negative, generator=gen(0), **RUN).images
    assert max_pixel_diff(a, b) <= 1 / 255
    # The concept's vectors are read: another embedding under the same prompt changes the image.
    other, _ = pair(sd_folder)
    other.load_textual_inversion({"<toy>": rows(n, seed=99)})
    c = other(prompt, negative_prompt=negative, generator=gen(0), **RUN).images
    assert max_pixel_diff(a, c) > 5 / 255


def test_multi_vector_prompt_expansion_and_several_concepts(sd_folder):
    mine, ref = pair(sd_folder)
    added = mine.load_textual_inversion([{"<a>": rows(3, 0)}, {"<b>": rows(1, 1)}])
    ref.load_textual_inversion([{"<a>": rows(3, 0)}, {"<b>": rows(1, 1)}])
    assert added == ["<a>", "<a>_1", "<a>_2", "<b>"]
    prompt = "<a> and <b>, <a>"
    assert expand_multi_vector_tokens(mine.tokenizer, prompt) == ref.maybe_convert_prompt(prompt, ref.tokenizer) \
        == "<a> <a>_1 <a>_2 and <b>, <a> <a>_1 <a>_2"
    a = mine(prompt, generator=gen(1), **RUN).images
    b = ref(prompt, generator=gen(1), **RUN).images
    assert max_pixel_diff(a, b) <= 1 / 255


def test_a1111_safetensors_takes_the_file_name(sd_folder, tmp_path):
    save_file({"emb_params": rows(2, 6)}, tmp_path / "shiny-style.safetensors")
    mine, ref = pair(sd_folder)
    assert mine.load_textual_inversion(str(tmp_path / "shiny-style.safetensors")) == ["shiny-style", "shiny-style_1"]
    # diffusers names the concept after the key: the same rows under the token "emb_params"
    ref.load_textual_inversion(str(tmp_path / "shiny-style.safetensors"))
    a = mine("a shiny-style house", generator=gen(2), **RUN).images
    b = ref("a emb_params house", generator=gen(2), **RUN).images
    assert max_pixel_diff(a, b) <= 1 / 255


def test_token_argument_renames_and_bare_tensor(sd_folder, tmp_path):
    path = write(tmp_path, "diffusers", "<stored>", rows(2, 3))
    mine, ref = pair(sd_folder)
    assert mine.load_textual_inversion(path, token="<mine>") == ["<mine>", "<mine>_1"]
    assert mine.load_textual_inversion(rows(1, 4), token="<bare>") == ["<bare>"]
    ref.load_textual_inversion(path, token="<mine>")
    ref.load_textual_inversion(rows(1, 4), token="<bare>")
    # the pipeline's tokenize expands <mine> to <mine> <mine>_1, as diffusers' maybe_convert_prompt does
    assert rel_err(encode_text(mine.tokenizer, mine.text_encoder, ["<mine> <bare>"], "cpu"),
                   ref.encode_prompt("<mine> <bare>", "cpu", 1, False)[0]) < 1e-6


@pytest.mark.parametrize("safe", [True, False])
def test_saved_by_minidiff_loads_in_diffusers_and_back(sd_folder, tmp_path, safe):
    mine, ref = pair(sd_folder)
    mine.load_textual_inversion({"<c>": rows(2, 5)})
    path = mine.save_textual_inversion(tmp_path, "<c>", safe_serialization=safe)
    assert os.path.basename(path) == ("learned_embeds.safetensors" if safe else "learned_embeds.bin")
    ref.load_textual_inversion(str(tmp_path))                # diffusers finds it by its default name
    ids = ref.tokenizer.convert_tokens_to_ids(["<c>", "<c>_1"])
    assert torch.equal(ref.text_encoder.get_input_embeddings().weight[ids], rows(2, 5))
    again, _ = pair(sd_folder)
    assert again.load_textual_inversion(str(tmp_path)) == ["<c>", "<c>_1"]


# --- bad inputs: a clear error, and the tokenizer and text encoder left as they were ------------------------------

def assert_refused(pipe, source, match, **kwargs):
    vocab, table = len(pipe.tokenizer), pipe.text_encoder.get_input_embeddings().weight.clone()
    with pytest.raises((ValueError, TypeError), match=match):
        pipe.load_textual_inversion(source, **kwargs)
    assert len(pipe.tokenizer) == vocab and torch.equal(pipe.text_encoder.get_input_embeddings().weight, table)


def test_bad_inputs(sd_folder, tmp_path):
    mine, _ = pair(sd_folder)
    assert_refused(mine, {"cat": rows(1, 0)}, r"\['cat'\] .*already in the tokenizer's vocabulary")
    assert_refused(mine, {"<w>": torch.randn(2, 768)}, r"768 wide but this text encoder's token embeddings are 32")
    lora = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 32),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 4)}
    assert_refused(mine, lora, r"not a Textual Inversion embedding.*load_lora_weights")
    assert_refused(mine, rows(1, 0), r"bare tensor.*token=")
    assert_refused(mine, [{"<x>": rows(1, 0)}, {"<x>": rows(1, 1)}], r"duplicates")
    assert_refused(mine, [{"<x>": rows(1, 0)}, {"<y>": rows(1, 1)}], r"2 embeddings and 1 tokens", token=["<x>"])
    assert_refused(mine, {"<z>": torch.randn(0, 32)}, r"\(D,\) or \(n, D\) tensor")
    assert_refused(mine, {"<nan>": torch.full((1, 32), float("nan"))}, r"NaN or inf")
    assert_refused(mine, rows(1, 0), r"token as a non-empty string", token=" ")
    # a second concept may not reuse a loaded token, nor its _1 row
    mine.load_textual_inversion({"<twice>": rows(2, 0)})
    assert_refused(mine, {"<twice>": rows(1, 1)}, r"already in the tokenizer's vocabulary")
    with pytest.raises(FileNotFoundError, match=r"learned_embeds.safetensors.*weight_name="):
        mine.load_textual_inversion(str(tmp_path))


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch ran",))


def test_pickles_that_name_code_are_refused_and_nothing_runs(sd_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine, _ = pair(sd_folder)
    torch.save({"<evil>": RunsCode()}, tmp_path / "evil.bin")
    with pytest.raises(UnsafeCheckpointError, match=r"evil.bin asks to load \['posix.system'\].*nothing from the file was run"):
        mine.load_textual_inversion(str(tmp_path / "evil.bin"))
    # The original textual_inversion code (rinongal) saved an nn.ParameterDict: a module class, refused by name.
    torch.save({"string_to_token": {"*": torch.tensor(265)},
                "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(rows(1, 0))})},
               tmp_path / "old.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"old.pt asks to load .*ParameterDict"):
        mine.load_textual_inversion(str(tmp_path / "old.pt"), token="<old>")
    assert not (tmp_path / "ran").exists()
