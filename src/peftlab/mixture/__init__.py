"""Mixtures of LoRA experts (method `xlora`): settings, expert checks, the model, its training, runs.

Submodules load torch only when a mixture is built (settings and resolve stay light for config checks)."""
