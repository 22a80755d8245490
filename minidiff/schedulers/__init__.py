"""The samplers: each file is one method, written as its paper writes it."""

from .base import SchedulerBase, SchedulerOutput
from .ddim import DDIMScheduler, DDIMSchedulerConfig
from .ddim_inverse import DDIMInverseScheduler, DDIMInverseSchedulerConfig
from .ddpm import DDPMScheduler, DDPMSchedulerConfig
from .euler import EulerDiscreteScheduler, EulerDiscreteSchedulerConfig
from .euler_ancestral import EulerAncestralDiscreteScheduler, EulerAncestralDiscreteSchedulerConfig
from .pndm import PNDMScheduler, PNDMSchedulerConfig
from .dpmsolver_multistep import DPMSolverMultistepScheduler, DPMSolverMultistepSchedulerConfig
from .unipc_multistep import UniPCMultistepScheduler, UniPCMultistepSchedulerConfig
from .compare import Schedule, schedule_table
