"""How minidiff's bundled tiny checkpoints were made: the data, the tokenizer, the training loops, the
evaluation. One command per step (see `python -m minidiff.training --help`):

    python -m minidiff.training vae  --out runs/vae --bf16                        # tiny-sd's autoencoder
    python -m minidiff.training sd   --vae runs/vae/vae --out runs/tiny-sd --bf16 # tiny-sd's UNet + text encoder
    python -m minidiff.training ddpm --out runs/tiny-ddpm --bf16                  # tiny-ddpm
    python -m minidiff.training evaluate sd --model runs/tiny-sd

| file            | what it holds                                                                |
|-----------------|------------------------------------------------------------------------------|
| `shapes.py`     | the captioned synthetic shapes data set ("a small red circle at the top")    |
| `tokenizer.py`  | CLIP tokenizer files with one token per caption word                         |
| `common.py`     | options, device / bf16, EMA, loss log, saving and resuming a training state  |
| `train_vae.py`  | AutoencoderKL: reconstruction + KL, then the measured `scaling_factor`       |
| `train_ddpm.py` | UNet2DModel: DDPM's epsilon loss with `add_noise` (Ho et al. 2020, Alg. 1)   |
| `train_sd.py`   | UNet2DConditionModel + CLIPTextModel, caption dropout for guidance           |
| `evaluate.py`   | a rule-based colour and shape classifier, and the model-card numbers         |
| `train_control.py` | a ControlNet / T2I-Adapter for frozen tiny-sd on the objects' masks       |
| `evaluate_control.py` | mask IoU with and without the control, the conditioning-scale curve    |
| `finetune/`     | Textual Inversion, DreamBooth (full, LoRA), Custom Diffusion; `compare.py`   |
| `scenes.py`     | the second edition of the data: two objects, relations, masks, edges, depth, edit pairs |
| `judge.py`      | the second edition's evaluator: colour, shape, size, position, count, relation, mask IoU |
"""
