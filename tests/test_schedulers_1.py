"""Parity of DDPM, DDIM, PNDM, Euler and Euler-ancestral with diffusers' schedulers of the same name.

Every test builds the minidiff and the diffusers scheduler from the same config and checks: identical
`timesteps` (dtype included) and `init_noise_sigma`, and the same final sample after a whole sampling loop
with a fixed fake model and the same random numbers (rel err < 1e-5; in practice the loops are bit-equal).
"""

import dataclasses

import diffusers
import pytest
import torch

import minidiff
from helpers import rel_err
from scheduler_harness import (
    DDPM_CAT_CONFIG,
    SD_PNDM_CONFIG,
    assert_same_schedule,
    build_pair,
    compare_add_noise,
    compare_sampling,
    fake_model,
    reference_configs,
    sample_loop,
)

TOL = 1e-5
STEPS = [1, 10, 25, 50]

PAIRS = {
    "ddpm": (minidiff.DDPMScheduler, diffusers.DDPMScheduler),
    "ddim": (minidiff.DDIMScheduler, diffusers.DDIMScheduler),
    "pndm": (minidiff.PNDMScheduler, diffusers.PNDMScheduler),
    "euler": (minidiff.EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler),
    "euler_a": (minidiff.EulerAncestralDiscreteScheduler, diffusers.EulerAncestralDiscreteScheduler),
}
REAL_CONFIGS = {"sd": SD_PNDM_CONFIG, "ddpm_cat": DDPM_CAT_CONFIG}


def prk_too_short(ours, n: int) -> bool:
    """PNDM's Runge-Kutta warm-up needs 4 steps (diffusers fails there with a broadcast error)."""
    return isinstance(ours, minidiff.PNDMScheduler) and not ours.config.skip_prk_steps and n < 4


def check_parity(ours, theirs, n: int, step_kwargs=None, shape=(1, 3, 8, 8)) -> dict:
    """Same schedule, then the same sampling loop; returns the errors (asserted below TOL)."""
    if prk_too_short(ours, n):
        with pytest.raises(ValueError, match="Runge-Kutta warm-up needs num_inference_steps >= 4"):
            ours.set_timesteps(n)
        return {"final": 0.0, "x0": 0.0}
    assert_same_schedule(ours, theirs, n)
    errs = compare_sampling(ours, theirs, n, shape=shape, step_kwargs=step_kwargs)
    assert errs["final"] < TOL and errs["x0"] < TOL, f"{type(ours).__name__}, {n} steps: {errs}"
    return errs


# --- the real configs -----------------------------------------------------------------------------
def test_reference_files_equal_the_dict_spellings(reference_dir):
    files = reference_configs(reference_dir)
    for name, spelled in REAL_CONFIGS.items():
        found = {k: v for k, v in files[name].items() if k != "_diffusers_version"}
        assert found == spelled, f"{name}: the file {found} differs from its dict spelling {spelled}"


@pytest.mark.parametrize("source", ["file", "dict"])
@pytest.mark.parametrize("config_name", list(REAL_CONFIGS))
@pytest.mark.parametrize("name", list(PAIRS))
def test_real_configs(name, config_name, source, request):
    ours_cls, theirs_cls = PAIRS[name]
    if source == "file":
        reference_dir = request.getfixturevalue("reference_dir")
        folder = reference_dir / ("stable-diffusion-v1-4" if config_name == "sd" else "ddpm-cat-256")
        subfolder = "scheduler" if config_name == "sd" else None
        make_ours = lambda: ours_cls.from_pretrained(str(folder), subfolder=subfolder)  # noqa: E731
        make_theirs = lambda: theirs_cls.from_pretrained(str(folder), subfolder=subfolder)  # noqa: E731
    else:
        make_ours = lambda: ours_cls.from_config(REAL_CONFIGS[config_name])  # noqa: E731
        make_theirs = lambda: theirs_cls.from_config(REAL_CONFIGS[config_name])  # noqa: E731
    for n in STEPS:
        check_parity(make_ours(), make_theirs(), n)


@pytest.mark.parametrize("config_name", list(REAL_CONFIGS))
@pytest.mark.parametrize("name", list(PAIRS))
def test_1000_steps(name, config_name):
    ours, theirs = build_pair(*PAIRS[name], REAL_CONFIGS[config_name])
    if config_name == "sd" and name in ("ddpm", "ddim", "pndm"):
        # "leading" + steps_offset=1 reaches t = 1000, past the trained range: diffusers fails inside step()
        # with an IndexError; minidiff refuses at set_timesteps, saying why and what to do.
        with pytest.raises(ValueError, match=r"outside the trained range \[0, 999\]"):
            ours.set_timesteps(1000)
        return
    check_parity(ours, theirs, 1000)


# --- options varied, each against diffusers ---------------------------------------------------------
def _cases(*cases):
    return [pytest.param(cfg, kw, id=",".join(f"{k}={v}" for k, v in {**cfg, **kw}.items()) or "defaults")
            for cfg, kw in cases]


DDPM_CASES = _cases(
    ({}, {}),
    ({"prediction_type": "v_prediction"}, {}),
    ({"prediction_type": "sample"}, {}),
    ({"variance_type": "fixed_large"}, {}),
    ({"clip_sample_range": 0.5}, {}),
    ({"clip_sample": False}, {}),
    ({"timestep_spacing": "trailing"}, {}),
    ({"timestep_spacing": "linspace"}, {}),
    ({"steps_offset": 1}, {}),
    ({"beta_schedule": "squaredcos_cap_v2"}, {}),
    ({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, {}),
    ({"num_train_timesteps": 100, "trained_betas": torch.linspace(1e-3, 0.2, 100).tolist()}, {}),
)


@pytest.mark.parametrize("config,step_kwargs", DDPM_CASES)
def test_ddpm_options(config, step_kwargs):
    for n in STEPS:
        check_parity(*build_pair(*PAIRS["ddpm"], DDPM_CAT_CONFIG, **config), n, step_kwargs)


DDIM_CASES = _cases(
    ({}, {}),
    ({}, {"eta": 0.5}),
    ({}, {"eta": 1.0}),
    ({"set_alpha_to_one": True}, {}),
    ({"clip_sample": True}, {"eta": 0.3}),
    ({"prediction_type": "v_prediction"}, {}),
    ({"prediction_type": "sample"}, {"eta": 0.3}),
    ({"timestep_spacing": "trailing"}, {}),
    ({"timestep_spacing": "linspace"}, {}),
    ({"steps_offset": 0, "beta_schedule": "squaredcos_cap_v2"}, {}),
)


@pytest.mark.parametrize("config,step_kwargs", DDIM_CASES)
def test_ddim_options(config, step_kwargs):
    for n in STEPS:
        check_parity(*build_pair(*PAIRS["ddim"], SD_PNDM_CONFIG, **config), n, step_kwargs)


PNDM_CASES = _cases(
    ({}, {}),
    ({"skip_prk_steps": False}, {}),
    ({"skip_prk_steps": False, "timestep_spacing": "trailing"}, {}),
    ({"skip_prk_steps": False, "prediction_type": "v_prediction", "set_alpha_to_one": True}, {}),
    ({"prediction_type": "v_prediction"}, {}),
    ({"timestep_spacing": "trailing"}, {}),
    ({"timestep_spacing": "linspace"}, {}),
    ({"set_alpha_to_one": True}, {}),
)


@pytest.mark.parametrize("config,step_kwargs", PNDM_CASES)
def test_pndm_options(config, step_kwargs):
    for n in STEPS + [4, 9]:  # 4: the shortest PRK schedule; 9: T // n odd, the PRK midpoint quirk
        check_parity(*build_pair(*PAIRS["pndm"], SD_PNDM_CONFIG, **config), n, step_kwargs)


EULER_CASES = _cases(
    ({}, {}),
    ({"use_karras_sigmas": True}, {}),
    ({"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}, {}),
    ({"use_karras_sigmas": True, "timestep_spacing": "leading"}, {}),
    ({"prediction_type": "v_prediction"}, {}),
    ({"prediction_type": "sample"}, {}),
    ({"timestep_spacing": "leading"}, {}),
    ({"timestep_spacing": "trailing"}, {}),
    ({}, {"s_churn": 1.0}),
    ({}, {"s_churn": 20.0, "s_tmin": 0.5, "s_tmax": 5.0, "s_noise": 1.003}),
)


@pytest.mark.parametrize("config,step_kwargs", EULER_CASES)
def test_euler_options(config, step_kwargs):
    for n in STEPS:
        check_parity(*build_pair(*PAIRS["euler"], SD_PNDM_CONFIG, **config), n, step_kwargs)


EULER_A_CASES = _cases(
    ({}, {}),
    ({"prediction_type": "v_prediction"}, {}),
    ({"timestep_spacing": "leading"}, {}),
    ({"timestep_spacing": "trailing"}, {}),
    ({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, {}),
)


@pytest.mark.parametrize("config,step_kwargs", EULER_A_CASES)
def test_euler_ancestral_options(config, step_kwargs):
    for n in STEPS:
        check_parity(*build_pair(*PAIRS["euler_a"], SD_PNDM_CONFIG, **config), n, step_kwargs)


def test_the_harness_can_fail():
    """A wrong scheduler ends far from diffusers' sample: the parity checks above are not vacuous."""
    mismatches = [
        ("ddim", {}, {"set_alpha_to_one": True}),
        ("ddpm", {}, {"variance_type": "fixed_large"}),
        ("pndm", {}, {"skip_prk_steps": False}),
        ("euler", {}, {"use_karras_sigmas": True}),
        ("euler_a", {}, {"timestep_spacing": "trailing"}),
    ]
    for name, ours_cfg, theirs_cfg in mismatches:
        ours_cls, theirs_cls = PAIRS[name]
        ours = ours_cls.from_config(SD_PNDM_CONFIG, **ours_cfg)
        theirs = theirs_cls.from_config(SD_PNDM_CONFIG, **theirs_cfg)
        assert compare_sampling(ours, theirs, 10)["final"] > 1e-3, name
    # and the stochastic samplers depend on the generator
    a, _ = sample_loop(minidiff.DDPMScheduler.from_config(DDPM_CAT_CONFIG), 10, seed=0)
    b, _ = sample_loop(minidiff.DDPMScheduler.from_config(DDPM_CAT_CONFIG), 10, seed=5)
    assert rel_err(a, b) > 1e-2


def test_stochastic_steps_with_a_generator_per_image():
    """randn_tensor with a list of generators: image i of the batch depends only on generator i."""
    for name in ("ddpm", "euler_a"):
        ours, theirs = build_pair(*PAIRS[name], DDPM_CAT_CONFIG)
        finals = []
        for s in (ours, theirs):
            s.set_timesteps(10)
            gens = [torch.Generator().manual_seed(i) for i in (3, 4)]
            x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * s.init_noise_sigma
            for t in s.timesteps:
                x = s.step(fake_model(s.scale_model_input(x, t), t), t, x, generator=gens).prev_sample
            finals.append(x)
        assert rel_err(finals[0], finals[1]) < TOL, name


# --- state -------------------------------------------------------------------------------------------
def test_pndm_history_is_explicit_and_equals_diffusers():
    for skip_prk in (True, False):
        ours, theirs = build_pair(*PAIRS["pndm"], SD_PNDM_CONFIG, skip_prk_steps=skip_prk)
        for s in (ours, theirs):
            s.set_timesteps(10)
        x = torch.randn(1, 3, 8, 8)
        x_ours, x_theirs = x.clone(), x.clone()
        for i, t in enumerate(ours.timesteps):
            assert t == theirs.timesteps[i]
            x_ours = ours.step(fake_model(x_ours, t), t, x_ours).prev_sample
            x_theirs = theirs.step(fake_model(x_theirs, t), t, x_theirs).prev_sample
            assert ours.counter == theirs.counter == i + 1
            assert len(ours.ets) == len(theirs.ets) <= 4
            for e_ours, e_theirs in zip(ours.ets, theirs.ets):
                assert torch.equal(e_ours, e_theirs)
        assert rel_err(x_ours, x_theirs) < TOL


@pytest.mark.parametrize("name", list(PAIRS))
def test_set_timesteps_again_starts_over(name):
    ours, theirs = build_pair(*PAIRS[name], SD_PNDM_CONFIG)
    sample_loop(ours, 7)        # leaves step index / history behind
    ours.set_timesteps(3)       # a half-used schedule of another length ...
    ours.step(fake_model(torch.ones(1, 3, 8, 8), ours.timesteps[0]), ours.timesteps[0], torch.ones(1, 3, 8, 8))
    errs = compare_sampling(ours, theirs, 10)  # ... and a fresh set_timesteps(10) forgets both
    assert errs["final"] < TOL


def test_timesteps_dtype_and_device():
    for name, (ours_cls, _) in PAIRS.items():
        s = ours_cls.from_config(SD_PNDM_CONFIG)
        s.set_timesteps(10, device="cpu")
        expected = torch.float32 if name.startswith("euler") else torch.int64
        assert s.timesteps.dtype == expected and s.timesteps.device.type == "cpu", name


# --- add_noise ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ddpm", "ddim", "pndm"])
def test_add_noise(name):
    for config in REAL_CONFIGS.values():
        ours, theirs = build_pair(*PAIRS[name], config)
        for timesteps in (torch.tensor([0, 1, 500, 999]), torch.randint(0, 1000, (4,))):
            assert compare_add_noise(ours, theirs, timesteps) < TOL


@pytest.mark.parametrize("name", ["euler", "euler_a"])
def test_add_noise_euler(name):
    """Euler-type schedulers noise in σ: x = x_0 + σ ε, at timesteps of their current schedule."""
    ours, theirs = build_pair(*PAIRS[name], SD_PNDM_CONFIG)
    # before set_timesteps: the T training timesteps
    assert compare_add_noise(ours, theirs, theirs.timesteps[[0, 10, 500, 999]]) < TOL
    for s in (ours, theirs):
        s.set_timesteps(25)
    assert compare_add_noise(ours, theirs, theirs.timesteps[[0, 3, 12, 24]]) < TOL
    # image-to-image: a pipeline sets the starting index, and every image is noised to that σ
    for s in (ours, theirs):
        s.set_begin_index(5)
    assert compare_add_noise(ours, theirs, theirs.timesteps[[5, 5, 5, 5]]) < TOL
    with pytest.raises(ValueError, match="not in this scheduler's schedule"):
        fresh = PAIRS[name][0].from_config(SD_PNDM_CONFIG)
        fresh.set_timesteps(25)
        fresh.add_noise(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), torch.tensor([3.5]))


# --- from_config of another scheduler's config ---------------------------------------------------------
@pytest.mark.parametrize("source", list(PAIRS))
@pytest.mark.parametrize("config_name", list(REAL_CONFIGS))
def test_from_config_of_another_scheduler(source, config_name):
    """X.from_config(y.config) equals diffusers doing the same: y's defaults are not passed on (Euler from
    SD's PNDM config keeps its own "linspace" spacing) while y's explicitly given keys are, even those y
    ignores (SD's clip_sample=False reaches DDIM through PNDM)."""
    src_ours = PAIRS[source][0].from_config(REAL_CONFIGS[config_name])
    src_theirs = PAIRS[source][1].from_config(REAL_CONFIGS[config_name])
    for name, (ours_cls, theirs_cls) in PAIRS.items():
        for ours, label in ((ours_cls.from_config(src_ours.config), "minidiff config"),
                            (ours_cls.from_config(src_theirs.config), "diffusers config")):
            theirs = theirs_cls.from_config(src_theirs.config)
            for field in dataclasses.fields(ours.config):
                a, b = getattr(ours.config, field.name), theirs.config[field.name]
                assert a == (tuple(b) if isinstance(b, list) else b), \
                    f"{name} from {source} ({label}): {field.name}={a!r}, diffusers has {b!r}"
            check_parity(ours, theirs, 10)


# --- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PAIRS))
def test_errors(name):
    cls = PAIRS[name][0]
    s = cls.from_config(SD_PNDM_CONFIG)
    x = torch.zeros(1, 3, 8, 8)
    t0 = torch.tensor(999.0) if name.startswith("euler") else torch.tensor(999)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        s.step(x, t0, x)
    with pytest.raises(ValueError, match="num_inference_steps must be an int between 1 and num_train_timesteps=1000"):
        s.set_timesteps(1001)
    s.set_timesteps(10)
    wrong = torch.tensor(3.0) if name.startswith("euler") else torch.tensor(3)
    with pytest.raises(ValueError, match="not in this scheduler's schedule"):
        s.step(x, wrong, x)
    with pytest.raises(ValueError, match="beta_schedule"):
        cls(beta_schedule="cosine")
    with pytest.raises(ValueError, match="prediction_type='x_start'"):
        cls(prediction_type="x_start")
    with pytest.raises(ValueError, match="timestep_spacing='uniform'"):
        cls(timestep_spacing="uniform")
    with pytest.raises(ValueError, match=r"does not implement the config key\(s\) \['num_train_steps'\]"):
        cls(num_train_steps=1000)  # a typo of num_train_timesteps
    cls.from_config({**SD_PNDM_CONFIG, "num_train_steps": 1000})  # from a config, unknown keys are ignored


def test_scheduler_specific_errors():
    with pytest.raises(ValueError, match="variance_type='learned_range'"):
        minidiff.DDPMScheduler(variance_type="learned_range")
    with pytest.raises(ValueError, match="Runge-Kutta warm-up needs num_inference_steps >= 4"):
        minidiff.PNDMScheduler(skip_prk_steps=False).set_timesteps(3)
    with pytest.raises(ValueError, match="use_exponential_sigmas=True"):
        minidiff.EulerDiscreteScheduler(use_exponential_sigmas=True)
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        minidiff.EulerAncestralDiscreteScheduler(prediction_type="sample")
    euler = minidiff.EulerDiscreteScheduler.from_config(SD_PNDM_CONFIG)
    euler.set_timesteps(10)
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="not over indices"):
        euler.step(x, 0, x)  # an index from enumerate(), not a timestep
    with pytest.raises(ValueError, match="not over indices"):
        euler.scale_model_input(x, torch.tensor(999))
