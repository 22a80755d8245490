"""The fine-tuning comparison as measured (notebook 18 and README.md show it; running it took 5.5 minutes on 1 CPU thread):

    OMP_NUM_THREADS=1 python -m minidiff.training finetune-compare --out runs/compare

Every run: tiny-sd, the concept "<sks>" = purple square (a pair tiny-sd never saw), 5 drawings, 400 steps x
batch 4, seed 0; each run's own command is under "command". Judged after loading the saved files back through
the loaders: "concept_rate" on 32 images of the concept prompt, "old_prompts" on the 22 pairs tiny-sd was
trained on x 2 seeds. "seconds" is the training loop alone, on 1 CPU thread of a 2-core machine shared with
other jobs: the second of two runs of the command. Every other number was identical in both; the first run,
with more jobs on the cores, took up to 2.5x longer.
"""

WHEN = "2026-12-06"
MACHINE = "CPU, 1 thread (OMP_NUM_THREADS=1), torch 2.13.0+cpu"

COMPARISON = {'steps': 400,
 'batch_size': 4,
 'eval_seeds': 32,
 'threads': 1,
 'old_prompts_before': {'color': 0.9318181818181818, 'shape': 0.8181818181818182, 'both': 0.75},
 'runs': [{'technique': 'Textual Inversion (1 vector)',
           'trained_parameters': 64,
           'seconds': 15.7,
           'steps': 400,
           'file_bytes': 360,
           'files': ['learned_embeds.safetensors'],
           'name': 'ti-1',
           'command': 'OMP_NUM_THREADS=1 python -m minidiff.training textual-inversion --base tiny-sd --out '
                      'runs/compare/ti-1 --overwrite --steps 400 --eval-seeds 0 --lr 5e-2',
           'concept_rate': {'<sks>': {'both': 0.0, 'color': 0.96875, 'shape': 0.0}},
           'old_prompts': {'color': 0.9318181818181818, 'shape': 0.8181818181818182, 'both': 0.75}},
          {'technique': 'Textual Inversion (2 vectors)',
           'trained_parameters': 128,
           'seconds': 15.7,
           'steps': 400,
           'file_bytes': 616,
           'files': ['learned_embeds.safetensors'],
           'name': 'ti-2',
           'command': 'OMP_NUM_THREADS=1 python -m minidiff.training textual-inversion --base tiny-sd --out '
                      'runs/compare/ti-2 --overwrite --steps 400 --eval-seeds 0 --lr 5e-2 --num-vectors 2',
           'concept_rate': {'<sks>': {'both': 0.0, 'color': 1.0, 'shape': 0.0}},
           'old_prompts': {'color': 0.9318181818181818, 'shape': 0.8181818181818182, 'both': 0.75}},
          {'technique': 'DreamBooth, full UNet, no prior preservation',
           'trained_parameters': 3152644,
           'seconds': 34.6,
           'steps': 400,
           'file_bytes': 12636023,
           'files': ['unet', 'learned_embeds.safetensors'],
           'name': 'db-full',
           'command': 'OMP_NUM_THREADS=1 python -m minidiff.training dreambooth --base tiny-sd --out '
                      'runs/compare/db-full --overwrite --steps 400 --eval-seeds 0 --lr 1e-4',
           'concept_rate': {'<sks>': {'both': 0.5, 'color': 1.0, 'shape': 0.5}},
           'old_prompts': {'color': 0.18181818181818182,
                           'shape': 0.8409090909090909,
                           'both': 0.1590909090909091}},
          {'technique': 'DreamBooth, full UNet, with prior preservation',
           'trained_parameters': 3152644,
           'seconds': 65.4,
           'steps': 400,
           'file_bytes': 12636023,
           'files': ['unet', 'learned_embeds.safetensors'],
           'name': 'db-full-prior',
           'command': 'OMP_NUM_THREADS=1 python -m minidiff.training dreambooth --base tiny-sd --out '
                      'runs/compare/db-full-prior --overwrite --steps 400 --eval-seeds 0 --lr 1e-4 '
                      '--prior-preservation',
           'concept_rate': {'<sks>': {'both': 0.0, 'color': 1.0, 'shape': 0.0}},
           'old_prompts': {'color': 0.4090909090909091,
                           'shape': 0.7045454545454546,
                           'both': 0.36363636363636365}},
          {'technique': 'DreamBooth, LoRA r=4, no prior preservation',
           'trained_parameters': 19968,
           'seconds': 20.0,
           'steps': 400,
           'file_bytes': 89160,
           'files': ['pytorch_lora_weights.safetensors', 'learned_embeds.safetensors'],
           'name': 'db-lora',
           'command': 'OMP_NUM_THREADS=1 python -m minidiff.training dreambooth --base tiny-sd --out '
                      'runs/compare/db-lora --overwrite --steps 400 --eval-seeds 0 --lr 1e-3 --lora-rank 4',
           'concept_rate': {'<sks>': {'both': 0.53125, 'color': 1.0, 'shape': 0.53125}},
           'old_prompts': {'color': 0.36363636363636365,
                           'shape': 0.6590909090909091,
                           'both': 0.22727272727272727}},
          {'technique': 'DreamBooth, LoRA r=4, with prior preservation',
           'trained_parameters': 19968,
           'seconds': 37.3,
           'steps': 400,
           'file_bytes': 89160,
           'files': ['pytorch_lora_weights.safetensors', 'learned_embeds.safetensors'],
           'name': 'db-lora-prior',
           'command': 'OMP_NUM_THREADS=1 python -m minidiff.training dreambooth --base tiny-sd --out '
                      'runs/compare/db-lora-prior --overwrite --steps 400 --eval-seeds 0 --lr 1e-3 --lora-rank '
                      '4 --prior-preservation',
           'concept_rate': {'<sks>': {'both': 0.0, 'color': 0.875, 'shape': 0.0}},
           'old_prompts': {'color': 0.4772727272727273,
                           'shape': 0.6590909090909091,
                           'both': 0.3181818181818182}},
          {'technique': 'Custom Diffusion (1 concept)',
           'trained_parameters': 41024,
           'seconds': 17.3,
           'steps': 400,
           'file_bytes': 165480,
           'files': ['pytorch_custom_diffusion_weights.safetensors', '<sks>.safetensors'],
           'name': 'cd',
           'command': 'OMP_NUM_THREADS=1 python -m minidiff.training custom-diffusion --base tiny-sd --out '
                      'runs/compare/cd --overwrite --steps 400 --eval-seeds 0 --lr 3e-3 --concept '
                      "'<sks>:purple:square'",
           'concept_rate': {'<sks>': {'both': 0.0, 'color': 0.625, 'shape': 0.0}},
           'old_prompts': {'color': 0.13636363636363635,
                           'shape': 0.5227272727272727,
                           'both': 0.11363636363636363}},
          {'technique': 'Custom Diffusion (2 concepts)',
           'trained_parameters': 41088,
           'seconds': 17.0,
           'steps': 400,
           'file_bytes': 165840,
           'files': ['pytorch_custom_diffusion_weights.safetensors', '<sks>.safetensors', '<new2>.safetensors'],
           'name': 'cd-2',
           'command': 'OMP_NUM_THREADS=1 python -m minidiff.training custom-diffusion --base tiny-sd --out '
                      'runs/compare/cd-2 --overwrite --steps 400 --eval-seeds 0 --lr 3e-3 --concept '
                      "'<sks>:purple:square' --concept '<new2>:cyan:triangle'",
           'concept_rate': {'<sks>': {'both': 0.0, 'color': 0.125, 'shape': 0.0},
                            '<new2>': {'both': 0.0, 'color': 0.0, 'shape': 1.0}},
           'old_prompts': {'color': 0.4090909090909091, 'shape': 0.6590909090909091, 'both': 0.25}}]}
