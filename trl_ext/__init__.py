"""TRL extensions of peft-selective (continual DPO). Importing it registers the PEFT methods too."""

import peft_selective  # noqa: F401
