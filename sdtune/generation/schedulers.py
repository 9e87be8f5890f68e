"""The samplers a user can pick, by name. Names only, no diffusers import: command lines offer them as choices
before any heavy library loads (generate.make_scheduler builds the scheduler)."""

# name -> (diffusers scheduler class, the name AUTOMATIC1111's "Sampler" field uses for it)
SCHEDULERS = {
    "dpmsolver++": ("DPMSolverMultistepScheduler", "DPM++ 2M"),
    "euler_a": ("EulerAncestralDiscreteScheduler", "Euler a"),
    "ddim": ("DDIMScheduler", "DDIM"),
    "pndm": ("PNDMScheduler", "PLMS"),
}
DEFAULT_SCHEDULER = "dpmsolver++"
