"""The checks every pipeline call makes: numbers up front, and non-finite values where they first appear.

Two kinds of mistakes give a wrong image with no error at all unless they are looked for:

- a number that turns the work off or into NaN: `guidance_scale=float("nan")` (`nan > 1` is False, so
  guidance is silently off), `float("inf")` (every pixel NaN), `num_images_per_prompt=0`;
- one NaN anywhere (a NaN weight, float16 overflow, NaN latents or image pixels): it spreads to every
  latent within a step or two, and the image comes out all black.

So the numbers are checked before any work starts, the tensors a user hands in are checked for NaN, and
while sampling `FiniteWatch` notes the first step whose UNet output or scheduler output is not finite.
Each error says what was expected, what was found and what to do.
"""

from __future__ import annotations

import math
import numbers

import torch

# What to try when a non-finite value appears, by where it appeared.
FLOAT16_HELP = ("float16 overflow (float16 holds values up to 65504): run in torch.float32 or torch.bfloat16, "
                "e.g. pipe.to(torch.float32)")
CAUSES = {
    "unet": ("a NaN or inf weight in the UNet (check the checkpoint: "
             "all(p.isfinite().all() for p in pipe.unet.parameters())), " + FLOAT16_HELP
             + ", or a huge guidance_scale"),
    "scheduler": ("the scheduler's step turned finite inputs into non-finite latents: a scheduler setting that "
                  "divides by zero (a beta schedule with ᾱ_t = 0 or 1, a timestep outside the schedule) or "
                  + FLOAT16_HELP),
    "start": ("the latents entering the first step come from latents= or, for image-to-image, from the VAE "
              "encoder: check the input tensors and the VAE's weights, or " + FLOAT16_HELP),
    "vae": "a NaN or inf weight in the VAE decoder, or " + FLOAT16_HELP,
}


# --- numbers, before any work ----------------------------------------------------------------------------
# The default of a check_inputs argument that a pipeline does not take. (Not None: guidance_scale=None is a
# mistake to catch.)
NOT_TAKEN = object()


def is_int(value) -> bool:
    """An int but not a bool (True would otherwise count as 1 image)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_count(value, name: str, what: str) -> None:
    """An int >= 1, e.g. num_images_per_prompt (`what`: "images per prompt")."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be an int >= 1 (the number of {what}); found {value!r}.")


def check_steps(num_inference_steps, scheduler=None) -> None:
    """A Python int >= 1 (the schedulers take no numpy integer), and at most the scheduler's num_train_timesteps
    (T) when it has one (the scheduler would refuse more too, but only after the prompt was encoded)."""
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
        hint = " Pass int(num_inference_steps)." if is_int(num_inference_steps) else ""
        raise ValueError(f"num_inference_steps must be an int >= 1 (the number of denoising steps; 20 to 50 is "
                         f"usual); found {num_inference_steps!r}.{hint}")
    T = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    if T is not None and num_inference_steps > T:
        raise ValueError(f"num_inference_steps must be at most num_train_timesteps={T} (the steps the model was "
                         f"trained on; {type(scheduler).__name__} picks a subset of them); found {num_inference_steps}.")


def check_guidance_scale(guidance_scale) -> None:
    """A finite real number. NaN would silently turn guidance off (nan > 1 is False); inf makes every pixel NaN."""
    if isinstance(guidance_scale, torch.Tensor) and guidance_scale.numel() == 1:   # torch.tensor(7.5) worked before
        guidance_scale = guidance_scale.item()
    if not isinstance(guidance_scale, numbers.Real) or isinstance(guidance_scale, bool):
        raise TypeError(f"guidance_scale must be a number (7.5 is usual; <= 1 turns guidance off); found "
                        f"{type(guidance_scale).__name__} {guidance_scale!r}.")
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number (7.5 is usual; <= 1 turns guidance off); found "
                         f"{guidance_scale!r}, which would give a NaN image or silently no guidance.")


def check_strength(strength) -> None:
    """Image-to-image: the fraction of the steps to run, in (0, 1]. 0 would run no step at all."""
    if not isinstance(strength, numbers.Real) or isinstance(strength, bool) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1] (the fraction of the steps to run: 1 ignores the "
                         f"image, near 0 returns it almost unchanged); found {strength!r}.")


def check_callback(callback) -> None:
    """None or a function `callback(i, t, latents, x0)`; checked before the first step rather than after it."""
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be a function callback(i, t, latents, x0), called after every step, or None; "
                        f"found {type(callback).__name__} {callback!r}.")


# --- tensors a user hands in --------------------------------------------------------------------------------
def check_finite(tensor: torch.Tensor, name: str, hint: str) -> None:
    """Refuse a tensor with NaN or inf in it: one NaN spreads to the whole image. (One host sync.)"""
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise ValueError(f"{name} holds {bad} non-finite values (NaN or inf) out of {tensor.numel()}; one is enough "
                         f"to make the whole image NaN (all black). {hint}")


def check_latents(latents, latent_shape: tuple, what: str) -> None:
    """latents=: a floating-point tensor of `latent_shape` (B, C, h, w) with finite values; `what`: for what images.

    Another float dtype or device is fine: `prepare_latents` casts to the pipeline's dtype and device.
    """
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor of shape {latent_shape}; found {type(latents).__name__}.")
    if not latents.is_floating_point():
        raise TypeError(f"latents must be a floating-point tensor (noise drawn with torch.randn); found dtype "
                        f"{latents.dtype}. Pass latents.float().")
    if tuple(latents.shape) != latent_shape:
        raise ValueError(f"latents must have shape {latent_shape} for {what}; found {tuple(latents.shape)}.")
    check_finite(latents, "latents", "Draw them with torch.randn(shape, generator=...).")


# --- while sampling -----------------------------------------------------------------------------------------
class FiniteWatch:
    """Finds the first step at which the UNet's output or the scheduler's output stops being finite.

    On the CPU each check runs at once (there is no device to wait for, and an isfinite over the latents costs
    far less than the UNet). On a GPU `bool(tensor)` would make the host wait for the GPU at every step, so
    that the next step's kernels could not be queued while this one runs; there the flags stay on the device
    and `raise_if_any()` reads them all with one sync after the loop. The loop then runs to its end before the
    error, which costs time only when something is already wrong.
    """

    def __init__(self, device: torch.device):
        self.immediate = device.type == "cpu"
        self.flags: list[tuple[int, object, str, torch.Tensor]] = []   # (i, t, where, 0-dim bool on the device)

    def check(self, x: torch.Tensor | None, i: int, t, where: str) -> None:
        """where: "start" (latents entering step 0), "unet" (the noise estimate), "scheduler" (its output)."""
        if x is None:
            return
        finite = torch.isfinite(x).all()
        if self.immediate:
            if not finite:
                raise FloatingPointError(non_finite_message(i, t, where))
        else:
            self.flags.append((i, t, where, finite))

    def raise_if_any(self) -> None:
        """Read the flags kept on the device (one sync) and raise for the first non-finite one."""
        if not self.flags:
            return
        ok = torch.stack([flag for *_, flag in self.flags]).cpu()
        flags, self.flags = self.flags, []
        if not ok.all():
            i, t, where, _ = flags[int((~ok).nonzero()[0])]
            raise FloatingPointError(non_finite_message(i, t, where))


def non_finite_message(i: int, t, where: str) -> str:
    what = {"start": "the latents entering the step", "unet": "the UNet's noise estimate (after guidance)",
            "scheduler": "the scheduler's output latents"}[where]
    t = t.item() if isinstance(t, torch.Tensor) else t
    return (f"Step i={i} (t={t:g}): non-finite values (NaN or inf) in {what}, so every later step and the image "
            f"would be NaN (an all-black image). Expected finite values. Likely cause: {CAUSES[where]}.")


def check_decoded(image: torch.Tensor, latents: torch.Tensor) -> None:
    """The VAE's output (one sync). Non-finite latents were reported by the sampling steps where they were
    watched; otherwise (latents handed to decode directly) they are named here before the VAE is blamed."""
    if not torch.isfinite(image).all():
        if not torch.isfinite(latents).all():
            raise FloatingPointError("The latents to decode hold non-finite values (NaN or inf), so the image would be "
                                     "all black. Expected finite latents. Likely cause: a NaN weight or "
                                     + FLOAT16_HELP + ".")
        raise FloatingPointError("The VAE decoder turned finite latents into non-finite pixels (NaN or inf); the image "
                                 f"would be all black. Expected finite pixels. Likely cause: {CAUSES['vae']}.")
