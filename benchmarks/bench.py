"""Speed and memory of minidiff against diffusers, side by side in one process, on the same inputs (issue 7).

    python benchmarks/bench.py                  # on a GPU: the real SD v1 and ddpm-cat-256 configs, random weights
    python benchmarks/bench.py --device cpu     # no GPU: the bundled tiny checkpoints (small random configs until
                                                # they exist), a few steps
    python benchmarks/bench.py --help           # every option (dtypes, steps, repeats, sections, time budget)

Both libraries get the same models: each diffusers model is built from its config (random weights, or a
checkpoint's) and its state dict is loaded, strictly, into the minidiff twin (module names are equal). The
CLIP text encoder is a transformers `CLIPTextModel` at the real config, one copy per pipeline, with the real
tokenizer files. The latents, prompt, scheduler config and seed are the same for both.

Measured, for fp32 / fp16 / bf16 (minidiff / diffusers and their ratio):
- seconds per image of the whole pipeline call (SD 512x512, 50 UniPC steps, guidance 7.5, batch 1; DDPM
  google/ddpm-cat-256, 50 and 1000 steps), wall clock between two `torch.cuda.synchronize()`;
- the same with per-step capture (minidiff `return_intermediates=True`; diffusers `callback_on_step_end`
  keeping a copy of the latents);
- the UNet alone per step (batch 2 for SD: guidance), the VAE decode, the text encoding (tokenizer +
  CLIP, both prompts), the scheduler step: CUDA events, after warm-up, median of several;
- GPU syncs per scheduler step (`torch.cuda.set_sync_debug_mode`), and the peak GPU memory of a call: the
  pipeline's own weights plus the most memory the call allocated on top of what was allocated before;
- `torch.compile(mode="reduce-overhead")` (Inductor + CUDA graphs) of the UNet, in both libraries;
- minidiff's other switches: fused QKV, channels_last, model CPU offload, VAE slicing and tiling.

Results: `benchmarks/results/<machine>.md` and `.json`, with the hardware, versions and exact command.
Sections run in order of importance; with `--budget-s` a section that would not fit is skipped and listed
as such, and the files are rewritten after every section, so a run cut short still leaves its numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROMPT = "a photograph of an astronaut riding a horse"

# Small versions of the real configs, for a CPU without the tiny checkpoints (the keys stay the real ones).
SMALL_SD_UNET = dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, cross_attention_dim=32, sample_size=8)
SMALL_SD_VAE = dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1, sample_size=64)
SMALL_CLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
SMALL_DDPM_UNET = dict(block_out_channels=[16, 16, 32, 32, 32, 32], norm_num_groups=8, layers_per_block=1,
                       sample_size=32)


# --- options ------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="'auto' (CUDA when there is one), 'cuda' or 'cpu'")
    p.add_argument("--models", default="auto",
                   help="'real': the real configs with random weights (the GPU default); 'tiny': the bundled "
                        "tiny checkpoints, or small random configs where they are missing (the CPU default)")
    p.add_argument("--reference", default=os.environ.get("MINIDIFF_REFERENCE", str(REPO.parent / "shared" / "reference")),
                   help="folder with the real configs: stable-diffusion-v1-4/, ddpm-cat-256/ (env MINIDIFF_REFERENCE)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,fp16,bf16 (GPU default: all; CPU: fp32)")
    p.add_argument("--main-dtype", default=None, help="the dtype of the full sections (GPU default fp16; CPU fp32)")
    p.add_argument("--sd-steps", type=int, default=50)
    p.add_argument("--ddpm-steps", default="50,1000", help="comma list; the first is timed in every dtype")
    p.add_argument("--height", type=int, default=None, help="SD image size (default: the UNet's, 512 for SD v1)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--warmup", type=int, default=1, help="untimed pipeline calls before timing")
    p.add_argument("--repeats", type=int, default=3, help="timed pipeline calls in the main dtype (median)")
    p.add_argument("--other-repeats", type=int, default=2, help="timed pipeline calls in the other dtypes")
    p.add_argument("--component-calls", type=int, default=20, help="timed calls of the UNet / VAE / text encoder")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode of the compiled section (GPU default 'reduce-overhead'; 'none', the "
                        "CPU default, skips it)")
    p.add_argument("--sections", default="all",
                   help="comma list of sd,ddpm,switches,compiled,sd-dtypes,ddpm-dtypes,ddpm-long (default all)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip sections that would end after this many seconds from the start")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder for the .md and .json")
    p.add_argument("--name", default=None, help="file name stem of the results (default: from the device)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)   # recorded with the results
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: PyTorch sees no CUDA GPU here. Use --device cpu (tiny models) or run on a GPU machine.")
    gpu = args.device == "cuda"
    if args.models == "auto":
        args.models = "real" if gpu else "tiny"
    args.dtypes = (args.dtypes or ("fp32,fp16,bf16" if gpu else "fp32")).split(",")
    args.main_dtype = args.main_dtype or ("fp16" if gpu else "fp32")
    args.compile_mode = args.compile_mode or ("reduce-overhead" if gpu else "none")
    for d in [*args.dtypes, args.main_dtype]:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; expected one of {list(DTYPES)}")
    args.ddpm_steps = [int(s) for s in args.ddpm_steps.split(",")]
    args.sections = ["sd", "ddpm", "switches", "compiled", "sd-dtypes", "ddpm-dtypes", "ddpm-long"] \
        if args.sections == "all" else args.sections.split(",")
    return args


# --- timing and memory ----------------------------------------------------------------------------------
class Clock:
    """Wall time of a GPU or CPU region: `synchronize()` on both sides on a GPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def wall(self, fn) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def per_call_ms(self, fns, calls: int, warmup: int = 3) -> list[float]:
        """Median milliseconds of one call of each of `fns`, called in turn (a, b, a, b, ...) so that a drift of
        the clocks hits all alike: CUDA events around each call on a GPU, perf_counter on a CPU."""
        for fn in fns:
            for _ in range(warmup):
                fn()
        times = [[] for _ in fns]
        for _ in range(calls):
            for fn, kept in zip(fns, times):
                if self.cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    kept.append(start.elapsed_time(end))
                else:
                    kept.append(self.wall(fn) * 1e3)
        return [statistics.median(t) for t in times]


def peak_memory_gib(device: str, fn, own_bytes: int) -> float | None:
    """The pipeline's own weights plus the most that `fn` allocated beyond what was allocated before, GiB.
    (Both libraries' models sit on the GPU together; this counts only the one that runs.)"""
    if device != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (own_bytes + torch.cuda.max_memory_allocated() - base) / 2**30


def syncs_during(device: str, fn) -> int | None:
    """How many synchronizing CUDA calls (a .item(), a blocking copy) `fn` makes."""
    if device != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def weight_bytes(*models) -> int:
    return sum(p.numel() * p.element_size() for m in models for p in m.parameters())


# --- the models: diffusers' built from a config, minidiff's loaded with the same state dict -----------------
def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def build(diffusers_cls, config: dict, weights_folder: Path | None, device: str):
    """A diffusers model: random weights from `config`, or the checkpoint in `weights_folder`."""
    if weights_folder is not None:
        return diffusers_cls.from_pretrained(str(weights_folder)).to(device).eval()
    with torch.device(device):  # initialise on the GPU directly: seconds instead of a minute on the CPU
        return diffusers_cls.from_config(config).eval()


def twin(minidiff_cls, diffusers_model, config: dict):
    """The minidiff model of the same config with diffusers_model's weights (strict: the names are equal)."""
    with torch.device("meta"):
        model = minidiff_cls.from_config(config)
    model.load_state_dict(diffusers_model.state_dict(), strict=True, assign=True)
    # assign=True took diffusers' tensors themselves: copy them, so the two models share no memory
    for param in model.parameters():
        param.data = param.data.clone()
    return model.eval()


def model_sources(args) -> dict:
    """Where each model's config (and weights) come from: {'sd': {...}, 'ddpm': {...}, 'label': str}."""
    ref = Path(args.reference)
    sd_ref, ddpm_ref = ref / "stable-diffusion-v1-4", ref / "ddpm-cat-256"
    if not (sd_ref / "unet" / "config.json").is_file() or not (ddpm_ref / "config.json").is_file():
        raise SystemExit(f"Expected the real configs in {ref} (stable-diffusion-v1-4/, ddpm-cat-256/), found none. "
                         "Pass --reference FOLDER or set MINIDIFF_REFERENCE.")
    sd = dict(unet=read_json(sd_ref / "unet" / "config.json"), vae=read_json(sd_ref / "vae" / "config.json"),
              text=read_json(sd_ref / "text_encoder" / "config.json"), tokenizer=sd_ref / "tokenizer",
              scheduler=read_json(sd_ref / "scheduler" / "scheduler_config.json"), folder=None)
    ddpm = dict(unet=read_json(ddpm_ref / "config.json"), scheduler=read_json(ddpm_ref / "scheduler_config.json"),
                folder=None)
    if args.models == "real":
        return dict(sd=sd, ddpm=ddpm, label="real configs (SD v1-4, google/ddpm-cat-256), random weights")

    tiny = REPO / "minidiff" / "checkpoints"
    if (tiny / "tiny-sd" / "model_index.json").is_file() and (tiny / "tiny-ddpm" / "model_index.json").is_file():
        folder = tiny / "tiny-sd"
        sd = dict(unet=read_json(folder / "unet" / "config.json"), vae=read_json(folder / "vae" / "config.json"),
                  text=read_json(folder / "text_encoder" / "config.json"), tokenizer=folder / "tokenizer",
                  scheduler=sd["scheduler"], folder=folder)
        fd = tiny / "tiny-ddpm"
        ddpm = dict(unet=read_json(fd / "config.json" if (fd / "config.json").is_file() else fd / "unet" / "config.json"),
                    scheduler=ddpm["scheduler"], folder=fd)
        return dict(sd=sd, ddpm=ddpm, label="bundled tiny checkpoints (tiny-sd, tiny-ddpm)")
    sd.update(unet={**sd["unet"], **SMALL_SD_UNET}, vae={**sd["vae"], **SMALL_SD_VAE},
              text={**sd["text"], **SMALL_CLIP_TEXT})
    ddpm.update(unet={**ddpm["unet"], **SMALL_DDPM_UNET})
    return dict(sd=sd, ddpm=ddpm, label="small random configs (the bundled tiny checkpoints are not there yet)")


def make_sd_pipelines(src: dict, device: str):
    """(minidiff pipeline, diffusers pipeline) with equal weights, on `device`, fp32."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    import minidiff

    folder = src["folder"]
    torch.manual_seed(0)
    unet = build(diffusers.UNet2DConditionModel, src["unet"], folder and folder / "unet", device)
    vae = build(diffusers.AutoencoderKL, src["vae"], folder and folder / "vae", device)
    if folder is not None:
        text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"))
    else:
        with torch.device(device):
            text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(src["text"]))
    text_encoder = text_encoder.to(device).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(src["tokenizer"]))

    theirs = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=diffusers.UniPCMultistepScheduler.from_config(src["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ours = minidiff.StableDiffusionPipeline(
        vae=twin(minidiff.AutoencoderKL, vae, src["vae"]), text_encoder=copy.deepcopy(text_encoder), tokenizer=tokenizer,
        unet=twin(minidiff.UNet2DConditionModel, unet, src["unet"]),
        scheduler=minidiff.UniPCMultistepScheduler.from_config(src["scheduler"]))
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def make_ddpm_pipelines(src: dict, device: str):
    import diffusers

    import minidiff

    torch.manual_seed(0)
    folder = src["folder"]
    if folder is not None and not (folder / "config.json").is_file():
        folder = folder / "unet"
    unet = build(diffusers.UNet2DModel, src["unet"], folder, device)
    theirs = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler.from_config(src["scheduler"]))
    ours = minidiff.DDPMPipeline(unet=twin(minidiff.UNet2DModel, unet, src["unet"]),
                                 scheduler=minidiff.DDPMScheduler.from_config(src["scheduler"]))
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def sd_models(pipe):
    return [pipe.unet, pipe.vae, pipe.text_encoder]


def to_dtype(pipes, dtype):
    for pipe in pipes:
        for m in sd_models(pipe) if hasattr(pipe, "vae") else [pipe.unet]:
            m.to(dtype=dtype)


def same_image(a, b) -> int:
    """max |pixel difference| (0-255) between two PIL images: both libraries must make the same picture."""
    import numpy as np

    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


# --- the report ------------------------------------------------------------------------------------------
class Report:
    """Rows of (section, metric, minidiff, diffusers, target), written as markdown and JSON after each section."""

    def __init__(self, args, hardware: dict, models_label: str):
        self.args, self.rows, self.notes, self.skipped = args, [], [], []
        env = f"MINIDIFF_REFERENCE={os.environ['MINIDIFF_REFERENCE']} " if "MINIDIFF_REFERENCE" in os.environ else ""
        self.meta = dict(hardware=hardware, models=models_label, commit=git_commit(),
                         command=env + shlex.join(["python", "benchmarks/bench.py", *args.argv]),
                         started=time.strftime("%Y-%m-%d %H:%M:%S"))
        self.t0 = time.perf_counter()

    def add(self, section: str, metric: str, ours, theirs=None, target: float | None = None, unit: str = ""):
        ratio = ours / theirs if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and theirs else None
        met = None if target is None or ratio is None else ratio <= target
        self.rows.append(dict(section=section, metric=metric, unit=unit, minidiff=ours, diffusers=theirs,
                              ratio=ratio, target=target, met=met))
        shown = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
        print(f"  {section:<44} {metric:<38} minidiff {shown(ours):>9}  diffusers {shown(theirs):>9}"
              + (f"  ratio {ratio:.3f}" if ratio is not None else ""), flush=True)

    def note(self, text: str):
        self.notes.append(text)
        print("  note:", text, flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def write(self):
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = self.args.name or self.meta["hardware"]["slug"]
        data = dict(**self.meta, elapsed_s=round(self.elapsed(), 1), rows=self.rows, notes=self.notes,
                    skipped=self.skipped)
        (out / f"{name}.json").write_text(json.dumps(data, indent=1, default=str))
        (out / f"{name}.md").write_text(self.markdown())
        return out / f"{name}.md"

    def markdown(self) -> str:
        hw = self.meta["hardware"]
        lines = [f"# minidiff vs diffusers: {hw['device']}", "",
                 f"- command: `{self.meta['command']}`" + (f" (minidiff commit {self.meta['commit']})"
                                                            if self.meta.get("commit") else ""),
                 f"- models: {self.meta['models']}",
                 f"- hardware: {hw['device']}; {hw['cpu']}; {hw['cores']} CPU cores "
                 + (f"(load average {hw['load']:.1f} at the start)" if hw.get('load') is not None else ""),
                 f"- software: {hw['software']}", f"- started {self.meta['started']}, took {self.elapsed():.0f} s",
                 "- ratio = minidiff / diffusers (lower is better for minidiff); times are medians; peak memory "
                 "is the pipeline's weights plus the most its call allocated", ""]
        sections = list(dict.fromkeys(r["section"] for r in self.rows))
        for section in sections:
            lines += [f"## {section}", "", "| metric | minidiff | diffusers | ratio | target | met |",
                      "|---|---:|---:|---:|---:|:---:|"]
            for r in (r for r in self.rows if r["section"] == section):
                fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
                metric = r["metric"] + (f" ({r['unit']})" if r["unit"] else "")
                target = "" if r["target"] is None else f"<= {r['target']}"
                met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
                ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
                lines.append(f"| {metric} | {fmt(r['minidiff'])} | {fmt(r['diffusers'])} | {ratio} | {target} | {met} |")
            lines.append("")
        if self.notes:
            lines += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        if self.skipped:
            lines += ["## Skipped", ""] + [f"- {s}" for s in self.skipped] + [""]
        return "\n".join(lines)


def git_commit() -> str | None:
    """The commit of the code that ran (with '+changes' if the tree differs from it), when git is there."""
    import subprocess

    try:
        run = lambda *cmd: subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True,  # noqa: E731
                                          timeout=10).stdout.strip()
        commit = run("rev-parse", "--short", "HEAD")
        return (commit + ("+changes" if run("status", "--porcelain", "--untracked-files=no") else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def hardware(device: str) -> dict:
    import diffusers
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    software = (f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
                f"Python {platform.python_version()}")
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        name = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        software += f", CUDA {torch.version.cuda}"
        slug = props.name.lower().replace("nvidia ", "").replace(" ", "-")
    else:
        name, slug = f"CPU ({cpu})", "cpu"
    # other programs running at the same time slow a CPU run down: the load says how busy the machine was
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return dict(device=name, cpu=cpu, cores=os.cpu_count(), load=load, software=software, slug=slug)


# --- the sections ------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.clock = Clock(args.device)
        self.src = model_sources(args)
        self.report = Report(args, hardware(args.device), self.src["label"])
        self.sd = None
        self.ddpm = None

    # -- helpers
    def fits(self, name: str, estimate_s: float) -> bool:
        """Whether a section estimated at `estimate_s` ends inside --budget-s; records it as skipped if not."""
        budget = self.args.budget_s
        if budget is None or self.report.elapsed() + estimate_s <= budget:
            print(f"\n== {name} (t = {self.report.elapsed():.0f} s, estimate {estimate_s:.0f} s)", flush=True)
            return True
        self.report.skipped.append(f"{name}: estimated {estimate_s:.0f} s, {budget - self.report.elapsed():.0f} s "
                                   "of --budget-s left")
        print(f"\n== skipped {name}", flush=True)
        return False

    def sd_pipes(self):
        if self.sd is None:
            self.sd = make_sd_pipelines(self.src["sd"], self.device)
        return self.sd

    def ddpm_pipes(self):
        if self.ddpm is None:
            self.ddpm = make_ddpm_pipelines(self.src["ddpm"], self.device)
        return self.ddpm

    def sd_inputs(self, pipe, dtype):
        f = pipe.vae_scale_factor                                         # pixels per latent: 8 for SD
        size = self.args.height or pipe.unet.config.sample_size * f
        g = torch.Generator().manual_seed(0)
        latents = torch.randn((1, 4, size // f, size // f), generator=g).to(self.device, dtype)
        return size, latents

    def run_sd(self, pipe, latents, size, capture=False, steps=None):
        """One image; returns it (PIL). `capture` keeps every step's latents."""
        steps = steps or self.args.sd_steps
        kw = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=self.args.guidance,
                  latents=latents.clone())
        if type(pipe).__module__.startswith("minidiff"):
            return pipe(PROMPT, return_intermediates=capture, **kw).images[0]
        kept = []

        def keep(p, i, t, tensors):  # diffusers' per-step callback
            kept.append(tensors["latents"].detach().clone())
            return tensors

        return pipe(PROMPT, callback_on_step_end=keep if capture else None, **kw).images[0]

    def run_ddpm(self, pipe, steps, capture=False):
        g = torch.Generator(self.device).manual_seed(0)
        if type(pipe).__module__.startswith("minidiff"):
            return pipe(batch_size=1, generator=g, num_inference_steps=steps, return_intermediates=capture).images[0]
        return pipe(batch_size=1, generator=g, num_inference_steps=steps).images[0]

    def time_pipelines(self, section, calls: dict, repeats: int, warmup: int, targets: dict):
        """calls: {label: (ours_fn, theirs_fn or None)}, timed interleaved, every other round in reverse order, so
        that a drift of the clocks or the temperature hits all alike; the median of `repeats` is reported."""
        times = {label: ([], []) for label in calls}
        for _ in range(warmup):
            for fns in calls.values():
                for fn in fns:
                    if fn is not None:
                        fn()
        labels = list(calls)
        for r in range(repeats):
            # every other repeat in reverse, labels and libraries: (a, b, c, d), (d, c, b, a), ...
            order = [(label, which) for label in labels for which in (0, 1)]
            for label, which in order if r % 2 == 0 else reversed(order):
                if calls[label][which] is not None:
                    times[label][which].append(self.clock.wall(calls[label][which]))
        medians = {}
        for label, (ours_t, theirs_t) in times.items():
            medians[label] = statistics.median(ours_t)
            self.report.add(section, label, medians[label], statistics.median(theirs_t) if theirs_t else None,
                            targets.get(label), "s")
        return medians

    # -- Stable Diffusion, one dtype
    def section_sd(self, dtype_name: str, repeats: int, capture: bool, components: bool = True):
        args, dtype = self.args, DTYPES[dtype_name]
        ours, theirs = self.sd_pipes()
        to_dtype((ours, theirs), dtype)
        size, latents = self.sd_inputs(ours, dtype)
        section = f"SD {size}x{size}, {args.sd_steps} UniPC steps, guidance {args.guidance}, {dtype_name}, eager"
        rep = self.report

        # one image from each: the same picture (a sanity check of the set-up, not a parity test); then the peak
        # memory of a second call (the first allocates one-time buffers, e.g. cuBLAS's workspace)
        images = [self.run_sd(p, latents, size) for p in (ours, theirs)]
        rep.add(section, "max pixel difference of the two images", same_image(*images), unit="0-255")
        peaks = [peak_memory_gib(self.device, lambda p=p: self.run_sd(p, latents, size), weight_bytes(*sd_models(p)))
                 for p in (ours, theirs)]
        if peaks[0] is not None:
            rep.add(section, "peak GPU memory", *peaks, target=1.0, unit="GiB")
        if components:
            self.sd_components(section, ours, theirs, latents, dtype)
        calls = {"time per image": (lambda: self.run_sd(ours, latents, size), lambda: self.run_sd(theirs, latents, size))}
        if capture:
            calls["time per image, every step captured"] = (lambda: self.run_sd(ours, latents, size, capture=True),
                                                           lambda: self.run_sd(theirs, latents, size, capture=True))
        # the calls above warmed both pipelines up (and --warmup more, for the capture path)
        med = self.time_pipelines(section, calls, repeats, args.warmup if capture else 0, {"time per image": 0.9})
        if capture:
            extra = med["time per image, every step captured"] / med["time per image"] - 1
            rep.add(section, "minidiff: time added by per-step capture", 100 * extra, unit="%")
            if extra >= 0.05:
                rep.note(f"{section}: per-step capture added {100 * extra:.1f}% (target < 5%).")

    def sd_components(self, section, ours, theirs, latents, dtype):
        from minidiff.pipelines.text import prompt_embeddings

        args, rep, n = self.args, self.report, self.args.component_calls
        text = torch.randn(2, 77, ours.unet.config.cross_attention_dim, device=self.device, dtype=dtype)
        x2 = torch.cat([latents] * 2)
        t = torch.tensor(500, device=self.device)
        with torch.no_grad():
            unet_ms = self.clock.per_call_ms([lambda p=p: p.unet(x2, t, encoder_hidden_states=text)
                                              for p in (ours, theirs)], n)
            rep.add(section, "UNet step, batch 2 (guidance)", *unet_ms, unit="ms")
            z = latents / 0.18215
            vae_ms = self.clock.per_call_ms([lambda p=p: p.vae.decode(z) for p in (ours, theirs)], max(3, n // 4), warmup=1)
            rep.add(section, "VAE decode", *vae_ms, unit="ms")
            text_ms = self.clock.per_call_ms(
                [lambda: prompt_embeddings(ours.tokenizer, ours.text_encoder, [PROMPT], None, 1, True, self.device),
                 lambda: theirs.encode_prompt(PROMPT, self.device, 1, True)], n)
            rep.add(section, "text encoding (prompt + empty prompt)", *text_ms, unit="ms")
            # the scheduler: its step alone, over a whole schedule, and the GPU syncs it forces
            eps = torch.randn_like(latents)

            def steps(p):
                x = latents
                for step_t in p.scheduler.timesteps:
                    x = p.scheduler.step(eps, step_t, x).prev_sample

            def schedule(p):
                p.scheduler.set_timesteps(args.sd_steps, device=self.device)
                steps(p)

            step_ms = [ms / args.sd_steps for ms in
                       self.clock.per_call_ms([lambda p=p: schedule(p) for p in (ours, theirs)], 3, warmup=1)]
            syncs = []
            for p in (ours, theirs):
                p.scheduler.set_timesteps(args.sd_steps, device=self.device)
                n_syncs = syncs_during(self.device, lambda p=p: steps(p))
                syncs.append(None if n_syncs is None else n_syncs / args.sd_steps)
            rep.add(section, "scheduler step (UniPC)", *step_ms, unit="ms")
            if syncs[0] is not None:
                rep.add(section, "GPU syncs per scheduler step", *syncs)
                unet_syncs = [syncs_during(self.device, lambda p=p: p.unet(x2, t, encoder_hidden_states=text))
                              for p in (ours, theirs)]
                rep.add(section, "GPU syncs per UNet call", *unet_syncs)
        if self.device == "cuda":
            image_syncs = [syncs_during(self.device, lambda p=p: self.run_sd(p, latents, latents.shape[-1] * p.vae_scale_factor))
                           for p in (ours, theirs)]
            rep.add(section, "GPU syncs per image (whole call)", *image_syncs)

    # -- DDPM, one dtype
    def section_ddpm(self, dtype_name: str, steps: int, repeats: int, capture: bool, components: bool = True,
                     warmup: int | None = None):
        dtype = DTYPES[dtype_name]
        ours, theirs = self.ddpm_pipes()
        to_dtype((ours, theirs), dtype)
        size = ours.unet.config.sample_size
        section = f"DDPM {size}x{size} (ddpm-cat-256 architecture), {steps} steps, {dtype_name}, eager"
        rep = self.report
        if components:
            x = torch.randn(1, ours.unet.config.in_channels, size, size, device=self.device, dtype=dtype)
            t = torch.tensor(500, device=self.device)
            with torch.no_grad():
                unet_ms = self.clock.per_call_ms([lambda p=p: p.unet(x, t) for p in (ours, theirs)],
                                                 self.args.component_calls)
            rep.add(section, "UNet step, batch 1", *unet_ms, unit="ms")
            images = [self.run_ddpm(p, steps) for p in (ours, theirs)]
            rep.add(section, "max pixel difference of the two images", same_image(*images), unit="0-255")
            peaks = [peak_memory_gib(self.device, lambda p=p: self.run_ddpm(p, steps), weight_bytes(p.unet))
                     for p in (ours, theirs)]
            if peaks[0] is not None:
                rep.add(section, "peak GPU memory", *peaks, target=1.0, unit="GiB")
        calls = {"time per image": (lambda: self.run_ddpm(ours, steps), lambda: self.run_ddpm(theirs, steps))}
        if capture:  # diffusers' DDPMPipeline has no per-step callback: minidiff only
            calls["time per image, every step captured"] = (lambda: self.run_ddpm(ours, steps, capture=True), None)
        med = self.time_pipelines(section, calls, repeats, self.args.warmup if warmup is None else warmup,
                                  {"time per image": 0.9})
        if capture:
            extra = med["time per image, every step captured"] / med["time per image"] - 1
            rep.add(section, "minidiff: time added by per-step capture", 100 * extra, unit="%")
            if extra >= 0.05:
                rep.note(f"{section}: per-step capture added {100 * extra:.1f}% (target < 5%).")

    # -- minidiff's switches (and diffusers' counterparts where it has them)
    def section_switches(self):
        dtype_name = self.args.main_dtype
        dtype = DTYPES[dtype_name]
        ours, theirs = self.sd_pipes()
        to_dtype((ours, theirs), dtype)
        size, latents = self.sd_inputs(ours, dtype)
        section = f"Switches, SD {size}x{size}, {dtype_name}"
        rep, n = self.report, self.args.component_calls
        text = torch.randn(2, 77, ours.unet.config.cross_attention_dim, device=self.device, dtype=dtype)
        x2, t = torch.cat([latents] * 2), torch.tensor(500, device=self.device)

        def unet_ms():
            with torch.no_grad():
                return self.clock.per_call_ms([lambda p=p: p.unet(x2, t, encoder_hidden_states=text)
                                               for p in (ours, theirs)], n)

        rep.add(section, "UNet step, plain (measured beside the switches)", *unet_ms(), unit="ms")

        # fused QKV: one matmul for q, k, v (self-attention) or k, v (cross-attention); both libraries have it
        with torch.no_grad():
            plain = ours.unet(x2, t, encoder_hidden_states=text).sample
            for p in (ours, theirs):
                p.fuse_qkv_projections()
            fused = ours.unet(x2, t, encoder_hidden_states=text).sample
        rep.add(section, "UNet step, fused QKV", *unet_ms(), unit="ms")
        err = ((fused.float() - plain.float()).abs().max() / plain.float().abs().max()).item()
        rep.add(section, "minidiff fused QKV: max rel. difference to unfused", err)
        for p in (ours, theirs):
            p.unfuse_qkv_projections()

        # channels_last weights and activations (minidiff: one switch; diffusers: the torch call)
        ours.enable_channels_last()
        theirs.unet.to(memory_format=torch.channels_last)
        rep.add(section, "UNet step, channels_last", *unet_ms(), unit="ms")
        for p in (ours, theirs):
            p.unet.to(memory_format=torch.contiguous_format)

        # VAE tiling: an image of 2x2 tiles (1024x1024 for SD); slicing: a batch of 4 images of one tile
        tile = ours.vae.tile_latent_size
        big = torch.randn(1, 4, 2 * tile, 2 * tile, device=self.device, dtype=dtype)
        batch = torch.randn(4, 4, tile, tile, device=self.device, dtype=dtype)
        with torch.no_grad():
            for label, z, on, off in (
                    (f"VAE decode {16 * tile}x{16 * tile}", big, "enable_tiling", "disable_tiling"),
                    (f"VAE decode 4 x {8 * tile}x{8 * tile}", batch, "enable_slicing", "disable_slicing")):
                plain = [peak_memory_gib(self.device, lambda p=p: p.vae.decode(z), weight_bytes(p.vae))
                         for p in (ours, theirs)]
                plain_ms = self.clock.per_call_ms([lambda p=p: p.vae.decode(z) for p in (ours, theirs)], 3, warmup=1)
                for p in (ours, theirs):
                    getattr(p.vae, on)()
                switched = [peak_memory_gib(self.device, lambda p=p: p.vae.decode(z), weight_bytes(p.vae))
                            for p in (ours, theirs)]
                switched_ms = self.clock.per_call_ms([lambda p=p: p.vae.decode(z) for p in (ours, theirs)], 3,
                                                     warmup=1)
                for p in (ours, theirs):
                    getattr(p.vae, off)()
                how = on.replace("enable_", "")
                rep.add(section, f"{label}, plain", *plain_ms, unit="ms")
                rep.add(section, f"{label}, {how}", *switched_ms, unit="ms")
                if plain[0] is not None:
                    rep.add(section, f"{label}, plain: peak GPU memory", *plain, unit="GiB")
                    rep.add(section, f"{label}, {how}: peak GPU memory", *switched, target=1.0, unit="GiB")

        # model CPU offload: each model on the GPU only while it runs
        if self.device == "cuda":
            self.offload(section, ours, theirs, latents, size)

    def offload(self, section, ours, theirs, latents, size):
        rep = self.report
        for p in (ours, theirs):  # nothing of either pipeline on the GPU
            for m in sd_models(p):
                m.to("cpu")
        torch.cuda.empty_cache()
        peaks, reserved, times = [], [], []
        for p in (ours, theirs):
            try:
                p.enable_model_cpu_offload()
                self.run_sd(p, latents, size)  # warm-up
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                times.append(self.clock.wall(lambda p=p: self.run_sd(p, latents, size)))
                peaks.append((torch.cuda.max_memory_allocated() - base) / 2**30)
                reserved.append(torch.cuda.max_memory_reserved() / 2**30)
            except Exception as e:  # e.g. diffusers' offload needs accelerate
                rep.note(f"model CPU offload failed for {type(p).__module__.split('.')[0]}: {type(e).__name__}: {e}")
                peaks.append(None), reserved.append(None), times.append(None)
        rep.add(section, "model CPU offload: peak GPU memory allocated", *peaks, unit="GiB")
        rep.add(section, "model CPU offload: peak GPU memory reserved by PyTorch", *reserved, unit="GiB")
        rep.add(section, "model CPU offload: time per image", *times, unit="s")
        if peaks[0] is not None and peaks[0] * 2**30 >= 2.5e9:
            rep.note(f"model CPU offload peaked at {peaks[0]:.2f} GiB (target < 2.5 GB).")
        # back to the plain layout: a fresh pair is built by the next section that needs one
        self.sd = None
        del ours, theirs
        torch.cuda.empty_cache()

    # -- torch.compile of the UNet (Inductor; CUDA graphs with mode="reduce-overhead")
    def section_compiled(self):
        args, rep = self.args, self.report
        dtype_name, dtype = args.main_dtype, DTYPES[args.main_dtype]
        ours, theirs = self.sd_pipes()
        to_dtype((ours, theirs), dtype)
        size, latents = self.sd_inputs(ours, dtype)
        section = (f"SD {size}x{size}, {args.sd_steps} UniPC steps, {dtype_name}, UNet compiled "
                   f"(mode={args.compile_mode!r})")
        originals = [p.unet for p in (ours, theirs)]
        try:
            for p in (ours, theirs):
                p.unet = copy.deepcopy(p.unet)
            ours.compile_unet(mode=args.compile_mode)                        # = unet.compile(mode, fullgraph=True)
            theirs.unet.compile(mode=args.compile_mode, fullgraph=True)
            first = []
            for p in (ours, theirs):
                first.append(self.clock.wall(lambda p=p: self.run_sd(p, latents, size)))
                print(f"  first call of {type(p).__module__.split('.')[0]} (compiles): {first[-1]:.1f} s", flush=True)
            rep.add(section, "first call (compiles)", *first, unit="s")
            text = torch.randn(2, 77, ours.unet.config.cross_attention_dim, device=self.device, dtype=dtype)
            x2, t = torch.cat([latents] * 2), torch.tensor(500, device=self.device)
            with torch.no_grad():
                ms = self.clock.per_call_ms([lambda p=p: p.unet(x2, t, encoder_hidden_states=text)
                                             for p in (ours, theirs)], args.component_calls)
            rep.add(section, "UNet step, batch 2 (guidance)", *ms, unit="ms")
            calls = {"time per image": (lambda: self.run_sd(ours, latents, size), lambda: self.run_sd(theirs, latents, size)),
                     "time per image, every step captured": (lambda: self.run_sd(ours, latents, size, capture=True),
                                                             lambda: self.run_sd(theirs, latents, size, capture=True))}
            med = self.time_pipelines(section, calls, args.repeats, 1, {"time per image": 0.8})
            rep.add(section, "minidiff: time added by per-step capture",
                    100 * (med["time per image, every step captured"] / med["time per image"] - 1), unit="%")
        finally:
            for p, unet in zip((ours, theirs), originals):
                p.unet = unet

    # -- the run
    def run(self):
        a, rep = self.args, self.report
        main, others = a.main_dtype, [d for d in a.dtypes if d != a.main_dtype]
        gpu = self.device == "cuda"
        # rough costs (s) on an H100, for --budget-s; the per-step numbers measured first refine the long ones
        plan = [
            ("sd", f"SD, {main}", 50 if gpu else 5, lambda: self.section_sd(main, a.repeats, capture=True)),
            ("ddpm", f"DDPM {a.ddpm_steps[0]} steps, {main}", 20 if gpu else 5,
             lambda: self.section_ddpm(main, a.ddpm_steps[0], a.repeats, capture=True)),
            ("compiled", "SD, UNet compiled", 190 if gpu else 120, self.section_compiled),
            ("switches", "switches", 30 if gpu else 5, self.section_switches),
        ]
        plan += [("sd-dtypes", f"SD, {d}", 40 if gpu else 5,
                  lambda d=d: self.section_sd(d, a.other_repeats, capture=False, components=True)) for d in others]
        plan += [("ddpm-dtypes", f"DDPM {a.ddpm_steps[0]} steps, {d}", 15 if gpu else 5,
                  lambda d=d: self.section_ddpm(d, a.ddpm_steps[0], a.other_repeats, capture=False)) for d in others]
        for steps in a.ddpm_steps[1:]:
            for d in [main, *others]:
                estimate = 2 * steps * (0.025 if gpu else 0.05)
                plan.append(("ddpm-long", f"DDPM {steps} steps, {d}", estimate,
                             lambda d=d, steps=steps: self.section_ddpm(d, steps, 1, capture=False, components=False,
                                                                        warmup=0)))
        for key, name, estimate, fn in plan:
            if key not in a.sections or (key == "compiled" and a.compile_mode == "none"):
                continue
            if not self.fits(name, estimate):
                continue
            try:
                fn()
            except Exception as e:  # one failing section must not lose the others' numbers
                import traceback

                traceback.print_exc()
                rep.note(f"section '{name}' failed: {type(e).__name__}: {str(e)[:300]}")
            rep.write()
        path = rep.write()
        print(f"\nwrote {path} and .json ({rep.elapsed():.0f} s)")
        print(rep.markdown())
        return path


def main(argv=None):
    args = parse_args(argv)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()      # its fp16-cast and deprecation warnings, every call
    transformers.utils.logging.set_verbosity_error()
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default: fp32 means fp32 (no TF32 matmuls)
    return Bench(args).run()


if __name__ == "__main__":
    main()
