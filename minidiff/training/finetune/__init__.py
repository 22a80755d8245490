"""Fine-tuning tiny-sd (or any SD v1 folder) on a new concept: Textual Inversion, DreamBooth (full and LoRA) and
Custom Diffusion, written out as loops that save in diffusers' formats through minidiff.loaders.

    python -m minidiff.training textual-inversion --out runs/ti
    python -m minidiff.training dreambooth --out runs/db [--lora-rank 4] [--prior-preservation]
    python -m minidiff.training custom-diffusion --out runs/cd --concept '<new1>:purple:heart' --concept '<new2>:cyan:triangle'
    python -m minidiff.training finetune-compare --out runs/compare     # all of them, same data and budget

| file                   | what it holds                                                          |
|------------------------|------------------------------------------------------------------------|
| `common.py`            | the concept's images, its new token, the loss, the judge's two numbers |
| `textual_inversion.py` | only the new word's embedding row(s) learn                             |
| `dreambooth.py`        | the UNet (or LoRA adapters on its attention) learns, prior preservation |
| `custom_diffusion.py`  | cross-attention to_k / to_v plus the new words learn                   |
| `compare.py`           | every technique on the same data and budget: one table                 |
"""
