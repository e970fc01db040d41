"""ckptd for the trainers people already run; each module imports its framework, so import only the one you use.

- `ckptd.client.integrations.lightning`: `CkptdCheckpointIO`, a Lightning checkpoint plugin.
- `ckptd.client.integrations.transformers`: `CkptdTrainer`, a Hugging Face `Trainer` that saves through ckptd.
- `ckptd.client.integrations.accelerate`: `AcceleratorComponents`, the state of an `Accelerator` as ckptd components.

docs/integrations.md shows the few lines each needs and what is saved under which pattern.
"""
