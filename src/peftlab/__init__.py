"""peftlab: a lab bench for parameter-efficient fine-tuning.

One experiment file (model + task + data + methods + training) and one command give trained
adapters and the tables and figures a PEFT paper reports. See README.md and DESIGN.md.
"""

__version__ = "0.1.0"
