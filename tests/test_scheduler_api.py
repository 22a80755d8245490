"""The diffusers API surface of every minidiff scheduler that a tutorial or a teacher's code touches.

- `.config` is a dict as diffusers' is: `diffusers.X.from_config(minidiff_scheduler.config)` and
  `minidiff.X.from_config(diffusers_scheduler.config)` both work and give the same timesteps and steps;
- `save_config(folder)` / `save_pretrained(folder)` write a scheduler_config.json that both libraries read;
- `trained_betas` as a list, tuple, numpy array or tensor; saved as a JSON list; round-trips;
- a model's config handed to `from_config` is refused, with a message that says what to pass instead;
- bad numbers are refused before any work.
"""

import copy
import dataclasses
import json
import math
import pickle

import diffusers
import numpy as np
import pytest
import torch

import minidiff
from scheduler_harness import (ALL_PAIRS, DDPM_CAT_CONFIG, SD_PNDM_CONFIG, assert_same_schedule, compare_sampling,
                               fake_model)

TOL = 1e-5
CONFIGS = {"sd": SD_PNDM_CONFIG, "ddpm_cat": DDPM_CAT_CONFIG}


def without_version(config) -> dict:
    """A config as a plain dict, without diffusers' version stamp (bookkeeping that minidiff does not write);
    `_use_default_values` sorted (diffusers builds it from a set); tuples as lists (minidiff keeps a frozen
    config's lists as tuples, diffusers as it was given)."""
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if k != "_diffusers_version"}
    if "_use_default_values" in out:
        out["_use_default_values"] = sorted(out["_use_default_values"])
    return out


def check_same_run(ours, theirs, n: int = 10) -> None:
    assert_same_schedule(ours, theirs, n)
    errs = compare_sampling(ours, theirs, n)
    assert errs["final"] < TOL and errs["x0"] < TOL, f"{type(ours).__name__}: {errs}"


# --- .config is a dict, as diffusers' -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_PAIRS)
def test_config_is_a_frozen_dict_and_a_dataclass(name):
    ours_cls, theirs_cls = ALL_PAIRS[name]
    config = ours_cls.from_config(SD_PNDM_CONFIG).config
    assert isinstance(config, dict) and dataclasses.is_dataclass(config)
    assert config["_class_name"] == theirs_cls.__name__
    for field in dataclasses.fields(config):
        assert config[field.name] == getattr(config, field.name)
    # the same keys, given values and defaults as diffusers' own config from the same file
    theirs = theirs_cls.from_config(SD_PNDM_CONFIG).config
    assert without_version(config) == without_version(theirs)
    with pytest.raises(TypeError, match="frozen"):
        config["beta_end"] = 0.5
    with pytest.raises(TypeError, match="frozen"):
        config.update(beta_end=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.beta_end = 0.5


@pytest.mark.parametrize("name", ALL_PAIRS)
def test_config_copies_and_pickles(name):
    # pipelines deepcopy schedulers (panorama: one per view); the copy must equal the original, dict included
    scheduler = ALL_PAIRS[name][0].from_config(SD_PNDM_CONFIG)
    for other in (copy.deepcopy(scheduler).config, copy.copy(scheduler.config), pickle.loads(pickle.dumps(scheduler.config))):
        assert other == scheduler.config and dict(other) == dict(scheduler.config)


# --- from_config both ways ------------------------------------------------------------------------------------
@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("name", ALL_PAIRS)
def test_diffusers_scheduler_from_a_minidiff_config(name, config_name):
    ours_cls, theirs_cls = ALL_PAIRS[name]
    ours = ours_cls.from_config(CONFIGS[config_name])
    theirs = theirs_cls.from_config(ours.config)                         # minidiff -> diffusers
    assert without_version(theirs.config) == without_version(theirs_cls.from_config(CONFIGS[config_name]).config)
    check_same_run(ours, theirs)


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("name", ALL_PAIRS)
def test_minidiff_scheduler_from_a_diffusers_config(name, config_name):
    ours_cls, theirs_cls = ALL_PAIRS[name]
    theirs = theirs_cls.from_config(CONFIGS[config_name])
    ours = ours_cls.from_config(theirs.config)                           # diffusers -> minidiff
    assert ours.config == ours_cls.from_config(CONFIGS[config_name]).config
    check_same_run(ours, theirs)


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("source", ALL_PAIRS)
def test_every_swap_of_sampler_reads_the_same_in_both_libraries(source, config_name):
    """`Target.from_config(pipe.scheduler.config)` for every source and target class: a diffusers target built
    from the minidiff source's config equals one built from the diffusers source's config, and the same for
    a minidiff target (the keys a source ignores but was given, like SD's clip_sample on PNDM, pass through)."""
    ours_src = ALL_PAIRS[source][0].from_config(CONFIGS[config_name])
    theirs_src = ALL_PAIRS[source][1].from_config(CONFIGS[config_name])
    for target, (ours_cls, theirs_cls) in ALL_PAIRS.items():
        a, b = theirs_cls.from_config(ours_src.config), theirs_cls.from_config(theirs_src.config)
        assert without_version(a.config) == without_version(b.config), f"diffusers {target} from {source}"
        c, d = ours_cls.from_config(ours_src.config), ours_cls.from_config(theirs_src.config)
        assert c.config == d.config and dict(c.config) == dict(d.config), f"minidiff {target} from {source}"
        # and the minidiff target is the diffusers target, value for value
        assert without_version(c.config) == without_version(b.config), f"{target} from {source}"


# --- save_config / save_pretrained ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_PAIRS)
def test_save_config_is_read_by_both_libraries(name, tmp_path):
    ours_cls, theirs_cls = ALL_PAIRS[name]
    ours = ours_cls.from_config(SD_PNDM_CONFIG, prediction_type="v_prediction")
    ours.save_config(tmp_path / "scheduler")
    written = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert written["_class_name"] == theirs_cls.__name__
    assert written["prediction_type"] == "v_prediction" and written["clip_sample"] is False

    back = ours_cls.from_pretrained(str(tmp_path), subfolder="scheduler")
    assert back.config == ours.config
    theirs = theirs_cls.from_pretrained(str(tmp_path), subfolder="scheduler")
    for key, value in written.items():
        assert without_version(theirs.config)[key] == value, f"diffusers read {key} from the file differently"
    check_same_run(back, theirs)

    # diffusers' own save_config writes the same values (it also stamps its version)
    theirs.save_config(tmp_path / "theirs")
    theirs_written = json.loads((tmp_path / "theirs" / "scheduler_config.json").read_text())
    assert without_version(theirs_written) == written

    ours.save_pretrained(tmp_path / "pretrained")   # a scheduler has no weights: the same file
    assert json.loads((tmp_path / "pretrained" / "scheduler_config.json").read_text()) == written


def test_save_config_into_a_file_is_refused(tmp_path):
    a_file = tmp_path / "scheduler_config.json"
    a_file.write_text("{}")
    with pytest.raises(NotADirectoryError, match="is a file"):
        ALL_PAIRS["ddim"][0]().save_config(a_file)
    assert a_file.read_text() == "{}"


# --- trained_betas -----------------------------------------------------------------------------------------------
BETAS = np.linspace(0.0001, 0.02, 1000) ** 1.1   # not any named schedule
FORMS = {
    "list": lambda: BETAS.tolist(),
    "tuple": lambda: tuple(BETAS.tolist()),
    "numpy float64": lambda: BETAS.copy(),
    "numpy float32": lambda: BETAS.astype(np.float32),
    "tensor float32": lambda: torch.tensor(BETAS, dtype=torch.float32),
    "tensor float64": lambda: torch.tensor(BETAS, dtype=torch.float64),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", ALL_PAIRS)
def test_trained_betas_in_any_form(name, form, tmp_path):
    ours_cls, theirs_cls = ALL_PAIRS[name]
    ours = ours_cls(trained_betas=FORMS[form]())
    expected = torch.tensor(np.asarray(FORMS[form]()), dtype=torch.float32)
    assert torch.equal(ours.betas, expected)
    assert isinstance(ours.config.trained_betas, tuple) and isinstance(ours.config.trained_betas[0], float)

    ours.save_config(tmp_path)   # valid JSON, the betas as a list
    written = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert isinstance(written["trained_betas"], list) and len(written["trained_betas"]) == 1000
    back = ours_cls.from_pretrained(str(tmp_path))
    assert back.config == ours.config and torch.equal(back.betas, ours.betas)
    # and diffusers reads both the file and the config to the same betas
    assert torch.equal(theirs_cls.from_pretrained(str(tmp_path)).betas, ours.betas)
    theirs = theirs_cls.from_config(ours.config)
    assert torch.equal(theirs.betas, ours.betas)
    check_same_run(ours, theirs)


@pytest.mark.parametrize("name", ["ddpm", "dpm"])
def test_trained_betas_from_a_diffusers_config(name):
    ours_cls, theirs_cls = ALL_PAIRS[name]
    theirs = theirs_cls(trained_betas=BETAS)                 # diffusers keeps the numpy array in its config
    ours = ours_cls.from_config(theirs.config)
    assert torch.equal(ours.betas, theirs.betas)
    check_same_run(ours, theirs)


@pytest.mark.parametrize("bad, match", [
    (BETAS[:999], "999 values; expected num_train_timesteps=1000"),
    (BETAS.reshape(10, 100), "1-D sequence of numbers"),
    (["0.1"] * 1000, "1-D sequence of numbers"),
    (np.concatenate([BETAS[:-1], [1.5]]), r"in \(0, 1\).*index 999"),
    (np.concatenate([[0.0], BETAS[1:]]), r"in \(0, 1\).*index 0"),
    (np.concatenate([BETAS[:-1], [np.nan]]), r"in \(0, 1\)"),
])
@pytest.mark.parametrize("name", ALL_PAIRS)
def test_bad_trained_betas(name, bad, match):
    with pytest.raises(ValueError, match=match):
        ALL_PAIRS[name][0](trained_betas=bad)


# --- a model's config is not a scheduler's --------------------------------------------------------------------
MODEL_FILES = {
    "unet": ("stable-diffusion-v1-4/unet/config.json", "UNet2DConditionModel config"),
    "vae": ("stable-diffusion-v1-4/vae/config.json", "AutoencoderKL config"),
    "ddpm_cat_unet": ("ddpm-cat-256/config.json", "UNet2DModel config"),
    "model_index": ("stable-diffusion-v1-4/model_index.json", "StableDiffusionPipeline config"),
    "text_encoder": ("stable-diffusion-v1-4/text_encoder/config.json", "a model's config"),   # no _class_name
}


@pytest.mark.parametrize("file", MODEL_FILES)
@pytest.mark.parametrize("name", ALL_PAIRS)
def test_a_model_config_file_is_refused(name, file, reference_dir):
    path, what = MODEL_FILES[file]
    config = json.loads((reference_dir / path).read_text())
    with pytest.raises(ValueError, match=f"{what}.*pass pipe.scheduler.config"):
        ALL_PAIRS[name][0].from_config(config)


@pytest.mark.parametrize("name", ALL_PAIRS)
def test_a_model_objects_config_is_refused(name):
    ours_cls = ALL_PAIRS[name][0]
    # diffusers' model config: a dict with the model's keys (and no _class_name when built, not loaded)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    with pytest.raises(ValueError, match="this is a model's config .*block_out_channels.*; pass pipe.scheduler.config"):
        ours_cls.from_config(vae.config)
    # minidiff's model config: a dataclass that is no scheduler's
    with pytest.raises(ValueError, match="UNet2DConditionConfig \\(a model's config\\); pass pipe.scheduler.config"):
        ours_cls.from_config(minidiff.UNet2DConditionModel.config_class())
    with pytest.raises(TypeError, match="expects a scheduler's config"):
        ours_cls.from_config("CompVis/stable-diffusion-v1-4")


@pytest.mark.parametrize("name", ALL_PAIRS)
def test_configs_diffusers_accepts_are_still_accepted(name):
    ours_cls, theirs_cls = ALL_PAIRS[name]
    # unknown keys, as diffusers ignores them (with a warning), and an empty config (all defaults)
    for config in ({**SD_PNDM_CONFIG, "some_future_option": 3}, {}, {"_class_name": "LCMScheduler", "beta_end": 0.012},
                   {"sample_size": 64, "num_train_timesteps": 1000}):   # a model-ish key beside a scheduler key
        ours, theirs = ours_cls.from_config(config), theirs_cls.from_config(config)
        # (diffusers records _class_name only where the config had one; minidiff always does)
        assert without_version(ours.config) == {"_class_name": type(ours).__name__, **without_version(theirs.config)}


# --- bad numbers, before any work --------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, -1, 1001, 2.5, True, "10", None])
@pytest.mark.parametrize("name", ALL_PAIRS)
def test_bad_num_inference_steps(name, n):
    scheduler = ALL_PAIRS[name][0].from_config(SD_PNDM_CONFIG)
    with pytest.raises(ValueError, match=f"num_inference_steps must be an int between 1 and num_train_timesteps=1000; "
                                         f"found {n!r}"):
        scheduler.set_timesteps(n)
    assert scheduler.num_inference_steps is None   # nothing was set


@pytest.mark.parametrize("name", ALL_PAIRS)
def test_step_before_set_timesteps_and_foreign_timesteps(name):
    scheduler = ALL_PAIRS[name][0].from_config(SD_PNDM_CONFIG)
    x = torch.zeros(1, 4, 8, 8)
    floats = name.startswith("euler")
    with pytest.raises(RuntimeError, match="set_timesteps"):
        scheduler.step(x, torch.tensor(999.0) if floats else torch.tensor(999), x)
    scheduler.set_timesteps(10)
    foreign = torch.tensor(3.5) if floats else torch.tensor(3)
    with pytest.raises(ValueError, match="not in this scheduler's schedule"):
        scheduler.step(x, foreign, x)


@pytest.mark.parametrize("option, match", [
    ({"num_train_timesteps": 0}, "num_train_timesteps must be an int >= 2"),
    ({"num_train_timesteps": 1000.0}, "num_train_timesteps must be an int >= 2"),
    ({"num_train_timesteps": True}, "num_train_timesteps must be an int >= 2"),
    ({"steps_offset": -1}, "steps_offset must be an int >= 0"),
    ({"beta_start": 0.02, "beta_end": 0.0001}, "0 < beta_start <= beta_end < 1"),
    ({"beta_start": 0.0}, "0 < beta_start <= beta_end < 1"),
    ({"beta_end": 1.0}, "0 < beta_start <= beta_end < 1"),
    ({"beta_end": math.nan}, "0 < beta_start <= beta_end < 1"),
    ({"beta_end": "0.012"}, "0 < beta_start <= beta_end < 1"),
])
@pytest.mark.parametrize("name", ALL_PAIRS)
def test_bad_numbers_in_config(name, option, match):
    ours_cls = ALL_PAIRS[name][0]
    with pytest.raises(ValueError, match=match):
        ours_cls(**option)
    with pytest.raises(ValueError, match=match):
        ours_cls.from_config({**SD_PNDM_CONFIG, **option})


def test_beta_range_is_not_checked_where_unused():
    # the cosine schedule and trained betas do not read beta_start / beta_end (diffusers' defaults stay in the file)
    ALL_PAIRS["ddpm"][0](beta_schedule="squaredcos_cap_v2", beta_start=0.5, beta_end=0.1)
    ALL_PAIRS["ddpm"][0](trained_betas=BETAS, beta_start=0.5, beta_end=0.1)


@pytest.mark.parametrize("t", [[-1], [1000], [3.5], [10, -5]])
@pytest.mark.parametrize("name", ["ddpm", "ddim", "ddim_inverse", "pndm", "dpm", "unipc"])
def test_add_noise_outside_the_training_timesteps(name, t):
    scheduler = ALL_PAIRS[name][0].from_config(SD_PNDM_CONFIG)
    x = torch.zeros(len(t), 4, 8, 8)
    with pytest.raises(ValueError, match=r"whole numbers in \[0, 999\]"):
        scheduler.add_noise(x, x, torch.tensor(t))
    # a float tensor holding whole numbers is fine (as diffusers takes it)
    scheduler.add_noise(x[:1], x[:1], torch.tensor([999.0]))


@pytest.mark.parametrize("eta", [-0.5, math.nan, "1"])
def test_ddim_bad_eta(eta):
    scheduler = ALL_PAIRS["ddim"][0].from_config(SD_PNDM_CONFIG)
    scheduler.set_timesteps(10)
    x, t = torch.zeros(1, 4, 8, 8), scheduler.timesteps[0]
    with pytest.raises(ValueError, match="eta must be a number >= 0"):
        scheduler.step(fake_model(x, t), t, x, eta=eta)



@pytest.mark.parametrize("name", ["euler", "euler_a", "dpm", "unipc"])
def test_stateful_schedulers_refuse_steps_out_of_order_or_past_the_end(name):
    scheduler = ALL_PAIRS[name][0].from_config(SD_PNDM_CONFIG)
    scheduler.set_timesteps(3)
    x = torch.zeros(1, 4, 8, 8)
    t0, t1, t2 = scheduler.timesteps
    scheduler.step(fake_model(scheduler.scale_model_input(x, t0), t0), t0, x)
    with pytest.raises(ValueError, match="expected timestep"):
        scheduler.step(x, t2, x)   # skips t1
    for t in (t1, t2):
        scheduler.step(fake_model(scheduler.scale_model_input(x, t), t), t, x)
    with pytest.raises(RuntimeError, match="All 3 steps of the schedule were taken"):
        scheduler.step(x, t2, x)


@pytest.mark.parametrize("name", ALL_PAIRS)
def test_model_output_of_another_shape_is_refused(name):
    # the classic guidance slip: 2B outputs (uncond and cond) for B samples would broadcast to a batch of 2B
    scheduler = ALL_PAIRS[name][0].from_config(SD_PNDM_CONFIG)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[0]
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"model_output of the shape of sample, \(1, 4, 8, 8\); found \(2, 4, 8, 8\)"):
        scheduler.step(torch.zeros(2, 4, 8, 8), t, x)
    scheduler.step(fake_model(scheduler.scale_model_input(x, t), t), t, x)   # the right shape still steps


def test_dpm_learned_variance_channels_still_pass_the_shape_check():
    scheduler = ALL_PAIRS["dpm"][0].from_config(DDPM_CAT_CONFIG, variance_type="learned_range")
    scheduler.set_timesteps(10)
    t, x = scheduler.timesteps[0], torch.zeros(1, 3, 8, 8)
    scheduler.step(torch.zeros(1, 6, 8, 8), t, x)   # the extra channels hold the variance and are dropped first
