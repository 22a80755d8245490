"""Parity of DPM-Solver++ and UniPC with diffusers, their errors, and the schedule comparison helper.

Every loop runs minidiff and diffusers side by side from one config with the harness's fixed fake model
(tests/scheduler_harness.py) and compares the final samples (rel err < 1e-5).
"""

import math

import diffusers
import pytest
import torch

import minidiff
from helpers import rel_err
from minidiff.schedulers import DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from minidiff.schedulers.compare import Schedule, schedule_table
from minidiff.viz.schedules import FIGSIZE, plot_sampling_schedules
from scheduler_harness import (DDPM_CAT_CONFIG, SD_PNDM_CONFIG, assert_same_schedule, build_pair, compare_add_noise,
                               compare_sampling, fake_model, reference_configs, sample_loop)

PAIRS = {
    "dpm": (DPMSolverMultistepScheduler, diffusers.DPMSolverMultistepScheduler),
    "unipc": (UniPCMultistepScheduler, diffusers.UniPCMultistepScheduler),
}
TOL = 1e-5
MAX_REL_ERR = {name: 0.0 for name in PAIRS}   # the largest final-sample error seen per scheduler, for reports


def check_parity(name, config, num_inference_steps, model=fake_model, **overrides):
    ours, theirs = build_pair(*PAIRS[name], config, **overrides)
    assert_same_schedule(ours, theirs, num_inference_steps)
    errs = compare_sampling(ours, theirs, num_inference_steps, model=model)
    MAX_REL_ERR[name] = max(MAX_REL_ERR[name], errs["final"])
    assert errs["final"] < TOL, f"{name} {overrides} n={num_inference_steps}: rel err {errs['final']:.2e}"
    return errs["final"]


# --- the real checkpoint configs --------------------------------------------------------------------------
def test_reference_files_equal_dict_spellings(reference_dir):
    files = reference_configs(reference_dir)
    for key, spelled in (("sd", SD_PNDM_CONFIG), ("ddpm_cat", DDPM_CAT_CONFIG)):
        on_disk = {k: v for k, v in files[key].items() if not k.startswith("_diffusers")}
        assert on_disk == spelled


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("config_name", ["sd", "ddpm_cat"])
@pytest.mark.parametrize("n", [1, 10, 25, 50])
def test_real_config_parity(reference_dir, name, config_name, n):
    check_parity(name, reference_configs(reference_dir)[config_name], n)


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("n", [1, 2, 3, 10, 25, 50])
def test_dict_config_parity(name, n):
    check_parity(name, SD_PNDM_CONFIG, n)
    check_parity(name, DDPM_CAT_CONFIG, n)


def test_unipc_from_pretrained_as_the_tutorial_does(reference_dir):
    folder = str(reference_dir / "stable-diffusion-v1-4")
    ours = UniPCMultistepScheduler.from_pretrained(folder, subfolder="scheduler")
    theirs = diffusers.UniPCMultistepScheduler.from_pretrained(folder, subfolder="scheduler")
    assert ours.config.beta_schedule == "scaled_linear" and ours.config.steps_offset == 1
    assert_same_schedule(ours, theirs, 25)
    assert compare_sampling(ours, theirs, 25)["final"] < TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("option", [{"timestep_spacing": "trailing"}, {"use_karras_sigmas": True}])
def test_1000_steps(name, option):
    # The spacings that give 1000 distinct noise levels (Karras rounds some timesteps to the same value).
    check_parity(name, SD_PNDM_CONFIG, 1000, **option)


# --- options ---------------------------------------------------------------------------------------------
COMMON_OPTIONS = [
    {"solver_order": 1},
    {"use_karras_sigmas": True},
    {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
    {"prediction_type": "v_prediction"},
    {"prediction_type": "sample"},
    {"timestep_spacing": "leading"},
    {"timestep_spacing": "trailing"},
    {"timestep_spacing": "leading", "steps_offset": 0},
    {"final_sigmas_type": "sigma_min"},
    {"lower_order_final": False, "final_sigmas_type": "sigma_min"},
    {"beta_schedule": "squaredcos_cap_v2"},
]
DPM_OPTIONS = [
    {"solver_type": "heun"},
    {"solver_type": "heun", "use_karras_sigmas": True, "prediction_type": "v_prediction"},
    {"euler_at_final": True, "final_sigmas_type": "sigma_min"},
    {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
    {"solver_order": 1, "timestep_spacing": "trailing", "prediction_type": "sample"},
]
UNIPC_OPTIONS = [
    {"solver_order": 3},
    {"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
    {"solver_order": 3, "use_karras_sigmas": True, "prediction_type": "v_prediction"},
    {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    {"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min", "use_karras_sigmas": True},
    {"disable_corrector": [0]},
    {"disable_corrector": [0, 1, 5]},
    {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0},
]


@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("option", COMMON_OPTIONS + DPM_OPTIONS, ids=str)
def test_dpm_options(option, n):
    check_parity("dpm", SD_PNDM_CONFIG, n, **option)


@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("option", COMMON_OPTIONS + UNIPC_OPTIONS, ids=str)
def test_unipc_options(option, n):
    check_parity("unipc", SD_PNDM_CONFIG, n, **option)


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("option", [{"solver_order": 1}, {"use_karras_sigmas": True},
                                    {"prediction_type": "v_prediction"}])
def test_options_with_ddpm_cat_config(name, option):
    check_parity(name, DDPM_CAT_CONFIG, 20, **option)


@pytest.mark.parametrize("name", PAIRS)
def test_cosine_schedule_with_karras_sigmas(name):
    # The cosine schedule's σ_max ≈ 2e4 puts the first Karras steps at t ≈ 998, repeated. The timesteps
    # match diffusers (DPM-Solver truncates them there); diffusers' loop then overruns its schedule, since
    # its first step() starts from the second of the repeated timesteps, so only ours is run.
    ours, theirs = build_pair(*PAIRS[name], dict(SD_PNDM_CONFIG, beta_schedule="squaredcos_cap_v2"),
                              use_karras_sigmas=True)
    assert_same_schedule(ours, theirs, 10)
    assert len(ours.timesteps.unique()) < 10
    x, _ = sample_loop(ours, 10)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("name, option", [
    ("dpm", {}), ("dpm", {"lower_order_final": False}), ("unipc", {}),
    ("unipc", {"lower_order_final": False}),   # diffusers: NaN (an order-2 step to λ = ∞)
    ("unipc", {"solver_type": "bh1"}),         # diffusers: NaN (B(h) = -∞ times a zero correction)
])
def test_last_step_to_zero_noise_is_first_order(name, option):
    # Landing on σ = 0 (α = 1, λ = ∞), the only defined update is the first-order one, x = x_θ.
    scheduler = PAIRS[name][0].from_config(SD_PNDM_CONFIG, **option)
    final, x0_preds = sample_loop(scheduler, 20)
    assert torch.isfinite(final).all()
    assert rel_err(final, x0_preds[-1]) < 1e-6


def test_dpm_learned_variance_channels_are_dropped():
    def model_with_variance(x, t):       # (B, 2C, H, W): ε, then variance values the solver ignores
        eps = fake_model(x, t)
        return torch.cat([eps, 3 * eps + 1], dim=1)

    check_parity("dpm", DDPM_CAT_CONFIG, 10, model=model_with_variance, variance_type="learned_range")


@pytest.mark.parametrize("name", PAIRS)
def test_half_precision_sample(name):
    ours, theirs = build_pair(*PAIRS[name], SD_PNDM_CONFIG)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    a, b = x.clone(), x.clone()
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    for t in ours.timesteps:
        a = ours.step(fake_model(a, t), t, a).prev_sample
        b = theirs.step(fake_model(b, t), t, b).prev_sample
    assert a.dtype == b.dtype == torch.float16
    assert rel_err(a, b) < 1e-3


# --- the comparison can fail ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, ours_option, theirs_option", [
    ("dpm", {"solver_type": "heun"}, {"solver_type": "midpoint"}),
    ("dpm", {"solver_order": 1}, {"solver_order": 2}),
    ("unipc", {"disable_corrector": [3]}, {}),
    ("unipc", {"solver_type": "bh1"}, {"solver_type": "bh2"}),
])
def test_one_option_apart_is_detected(name, ours_option, theirs_option):
    config = dict(SD_PNDM_CONFIG, final_sigmas_type="sigma_min")
    ours = PAIRS[name][0].from_config(config, **ours_option)
    theirs = PAIRS[name][1].from_config(config, **theirs_option)
    assert compare_sampling(ours, theirs, 10)["final"] > 10 * TOL


# --- building from another sampler's config -----------------------------------------------------------
@pytest.mark.parametrize("source", [diffusers.UniPCMultistepScheduler, diffusers.DEISMultistepScheduler,
                                    diffusers.DPMSolverMultistepScheduler, diffusers.PNDMScheduler])
@pytest.mark.parametrize("name", PAIRS)
def test_from_another_schedulers_config(name, source):
    # The pipelines swap samplers with from_config(pipe.scheduler.config); solver names translate as in diffusers.
    config = dict(source.from_config(SD_PNDM_CONFIG).config)
    check_parity(name, config, 12)


@pytest.mark.parametrize("source", ["PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"])
@pytest.mark.parametrize("name", PAIRS)
def test_swapped_in_for_a_pipelines_scheduler(name, source):
    # minidiff's `from_config(pipe.scheduler.config)` equals diffusers' with the same swap.
    ours_source = getattr(minidiff.schedulers, source).from_config(SD_PNDM_CONFIG)
    theirs_source = getattr(diffusers, source).from_config(SD_PNDM_CONFIG)
    ours = PAIRS[name][0].from_config(ours_source.config)
    theirs = PAIRS[name][1].from_config(theirs_source.config)
    assert_same_schedule(ours, theirs, 20)
    assert compare_sampling(ours, theirs, 20)["final"] < TOL


def test_from_a_minidiff_schedulers_config():
    dpm = DPMSolverMultistepScheduler.from_config(SD_PNDM_CONFIG, use_karras_sigmas=True)
    unipc = UniPCMultistepScheduler.from_config(dpm.config)
    assert unipc.config.solver_type == "bh2" and unipc.config.use_karras_sigmas
    back = DPMSolverMultistepScheduler.from_config(unipc.config)
    assert back.config == dpm.config


# --- the history is plain state ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", PAIRS)
def test_history_and_reset(name):
    scheduler = PAIRS[name][0].from_config(SD_PNDM_CONFIG)
    scheduler.set_timesteps(10)
    assert scheduler.model_outputs == [None, None] and scheduler.lower_order_nums == 0
    x = torch.randn(1, 4, 8, 8)
    t0, t1 = scheduler.timesteps[:2]
    out = scheduler.step(fake_model(x, t0), t0, x)
    # pred_original_sample is x_0 = (x_t - σ_t ε) / α_t at the first step
    alpha_bar = scheduler.alphas_cumprod[int(t0)]
    expected_x0 = (x - (1 - alpha_bar).sqrt() * fake_model(x, t0)) / alpha_bar.sqrt()
    assert rel_err(out.pred_original_sample, expected_x0) < 1e-5
    scheduler.step(fake_model(out.prev_sample, t1), t1, out.prev_sample)
    assert scheduler.timestep_list == [t0, t1]
    assert all(m is not None for m in scheduler.model_outputs) and scheduler.lower_order_nums == 2
    assert scheduler.step_index == 2

    # set_timesteps forgets the last loop: a second loop equals the first
    first, _ = sample_loop(scheduler, 10)
    second, _ = sample_loop(scheduler, 10)
    assert torch.equal(first, second)


# --- add_noise --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("option", [{}, {"use_karras_sigmas": True}])
def test_add_noise_at_schedule_timesteps(name, option):
    ours, theirs = build_pair(*PAIRS[name], SD_PNDM_CONFIG, **option)
    ours.set_timesteps(25)
    theirs.set_timesteps(25)
    timesteps = ours.timesteps[[0, 5, 17, 24]]
    assert compare_add_noise(ours, theirs, timesteps) < 1e-6


@pytest.mark.parametrize("name", PAIRS)
def test_add_noise_before_set_timesteps_is_the_training_forward_process(name):
    # x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε (Ho et al. eq. 4), as used for training.
    scheduler = PAIRS[name][0].from_config(SD_PNDM_CONFIG)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 990])
    alpha_bar = scheduler.alphas_cumprod[t].view(3, 1, 1, 1)
    expected = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    assert rel_err(scheduler.add_noise(x0, noise, t), expected) < 1e-6


# --- bad input --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PAIRS)
def test_step_before_set_timesteps(name):
    scheduler = PAIRS[name][0].from_config(SD_PNDM_CONFIG)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(RuntimeError, match="before set_timesteps"):
        scheduler.step(x, 999, x)


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("n", [0, 1001, 2.5])
def test_bad_number_of_steps(name, n):
    scheduler = PAIRS[name][0].from_config(SD_PNDM_CONFIG)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(n)


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("n, option, match", [
    (1000, {}, "repeat timestep"),                                   # linspace rounds two steps to one t
    (999, {"timestep_spacing": "leading"}, "outside the trained range"),   # steps_offset=1 reaches t = 1000
    (61, {"timestep_spacing": "trailing"}, "outside the trained range"),   # T/n rounding reaches t = -1
])
def test_degenerate_schedules_are_refused(name, n, option, match):
    scheduler = PAIRS[name][0].from_config(SD_PNDM_CONFIG, **option)
    with pytest.raises(ValueError, match=match):
        scheduler.set_timesteps(n)


@pytest.mark.parametrize("name", PAIRS)
def test_wrong_timesteps(name):
    scheduler = PAIRS[name][0].from_config(SD_PNDM_CONFIG)
    scheduler.set_timesteps(3)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="not in this scheduler's schedule"):
        scheduler.step(x, 500, x)
    t0, t1, t2 = scheduler.timesteps
    scheduler.step(x, t0, x)
    with pytest.raises(ValueError, match=f"expected timestep {int(t1)}"):
        scheduler.step(x, t2, x)
    scheduler.step(x, t1, x)
    scheduler.step(x, t2, x)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        scheduler.step(x, t2, x)


@pytest.mark.parametrize("name, option", [
    ("dpm", {"algorithm_type": "sde-dpmsolver++"}),
    ("dpm", {"algorithm_type": "dpmsolver"}),
    ("dpm", {"solver_order": 3}),
    ("dpm", {"solver_type": "bh2"}),
    ("dpm", {"use_lu_lambdas": True}),
    ("dpm", {"use_exponential_sigmas": True}),
    ("dpm", {"variance_type": "something"}),
    ("unipc", {"predict_x0": False}),
    ("unipc", {"solver_type": "midpoint"}),
    ("unipc", {"solver_p": "DDIM"}),
    ("unipc", {"use_beta_sigmas": True}),
    ("dpm", {"thresholding": True}),
    ("unipc", {"thresholding": True}),
    ("dpm", {"prediction_type": "flow_prediction"}),
    ("unipc", {"timestep_spacing": "karras"}),
    ("dpm", {"final_sigmas_type": "one"}),
    ("unipc", {"rescale_betas_zero_snr": True}),
    ("dpm", {"use_flow_sigmas": True}),
])
def test_unsupported_options_are_refused(name, option):
    key = next(iter(option))
    with pytest.raises(ValueError, match=f"does not implement {key}="):
        PAIRS[name][0](**option)
    # from_config ignores unknown keys, but refuses a known key at an unsupported value
    # (solver names of other samplers excepted: they translate, as in diffusers)
    if key != "solver_type":
        with pytest.raises(ValueError, match=f"does not implement {key}="):
            PAIRS[name][0].from_config(dict(SD_PNDM_CONFIG, **option))


def test_bad_numbers_in_config():
    with pytest.raises(ValueError, match="solver_order must be a positive int"):
        UniPCMultistepScheduler(solver_order=0)
    with pytest.raises(ValueError, match="disable_corrector"):
        UniPCMultistepScheduler(disable_corrector=["first"])
    with pytest.raises(ValueError, match="beta_schedule"):
        DPMSolverMultistepScheduler(beta_schedule="cubic")
    with pytest.raises(ValueError, match="does not implement the config key"):
        DPMSolverMultistepScheduler(solver_ordr=2)   # a typo passed to the constructor is an error


def test_exported():
    assert minidiff.DPMSolverMultistepScheduler is DPMSolverMultistepScheduler
    assert minidiff.UniPCMultistepScheduler is UniPCMultistepScheduler
    assert DPMSolverMultistepScheduler.order == UniPCMultistepScheduler.order == 1


# --- compare.py -------------------------------------------------------------------------------------------
def test_schedule_table_matches_each_scheduler():
    classes = [DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler]
    table = schedule_table(SD_PNDM_CONFIG, classes, 10)
    assert [s.name for s in table] == ["DDPM", "DPMSolverMultistep", "UniPCMultistep"]

    reference = diffusers.DPMSolverMultistepScheduler.from_config(SD_PNDM_CONFIG)
    reference.set_timesteps(10)
    dpm = table[1]
    assert dpm.timesteps == reference.timesteps.tolist()
    assert torch.allclose(torch.tensor(dpm.sigma, dtype=torch.float64), reference.sigmas[:10].double(), rtol=1e-6)

    ddpm = diffusers.DDPMScheduler.from_config(SD_PNDM_CONFIG)
    ddpm.set_timesteps(10)
    assert table[0].timesteps == ddpm.timesteps.tolist()
    expected_alpha_bar = ddpm.alphas_cumprod[ddpm.timesteps].double()
    assert torch.allclose(torch.tensor(table[0].alpha_bar, dtype=torch.float64), expected_alpha_bar, rtol=1e-6)

    for s in table:
        assert isinstance(s, Schedule) and len(s.timesteps) == len(s.sigma) == len(s.alpha_bar) == 10
        for row in s.rows():
            assert math.isclose(row["alpha_bar"], 1 / (1 + row["sigma"] ** 2), rel_tol=1e-12)
            assert math.isclose(row["log_snr"], math.log(row["alpha_bar"] / (1 - row["alpha_bar"])), rel_tol=1e-9)


def test_schedule_table_reads_karras_sigmas():
    table = schedule_table(SD_PNDM_CONFIG, [DPMSolverMultistepScheduler], 10)
    karras = schedule_table(dict(SD_PNDM_CONFIG, use_karras_sigmas=True), [DPMSolverMultistepScheduler], 10)
    scheduler = DPMSolverMultistepScheduler.from_config(SD_PNDM_CONFIG, use_karras_sigmas=True)
    scheduler.set_timesteps(10)
    assert karras[0].sigma == scheduler.sigmas[:10].double().tolist()
    assert karras[0].sigma != table[0].sigma


def test_schedule_table_bad_input():
    with pytest.raises(TypeError, match="list of scheduler classes"):
        schedule_table(SD_PNDM_CONFIG, DPMSolverMultistepScheduler, 10)
    with pytest.raises(TypeError, match="not an instance"):
        schedule_table(SD_PNDM_CONFIG, [DPMSolverMultistepScheduler()], 10)


def test_plot_sampling_schedules():
    fig = plot_sampling_schedules(SD_PNDM_CONFIG, [DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler], 10)
    try:
        assert tuple(fig.get_size_inches()) == pytest.approx(FIGSIZE)
        assert len(fig.axes) == 3
        for ax in fig.axes:
            assert len(ax.lines) == 3 and all(len(line.get_xdata()) == 10 for line in ax.lines)
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)
