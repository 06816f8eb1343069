"""Released distilled students (downloaded checkpoints) run against their teachers, one file per
method; ``base.py`` holds the shared loading, the authors' scheduler loop and the quoted costs."""

from methods.released import dmd2_sdxl, flux_schnell, hyper_sd, lcm_lora, lcm_unet, sdxl_lightning, sdxl_turbo  # noqa: F401
