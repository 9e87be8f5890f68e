"""Fine-tune, evaluate and serve Stable Diffusion. Importing the package drops the warnings every command would
otherwise print at start (sdtune.logs), before any submodule imports diffusers."""

from sdtune.logs import silence_expected_warnings

silence_expected_warnings()
