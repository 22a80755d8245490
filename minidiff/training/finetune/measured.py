"""The fine-tuning comparison as measured on tiny-sd's second edition (notebook 18 and README.md show it; running
it took 13 minutes on 1 CPU thread of a 2-core machine, beside one or two other jobs):

    OMP_NUM_THREADS=1 python -m minidiff.training finetune-compare --out runs/compare-heart

Every run: tiny-sd, the concept "<sks>" = a purple heart (a shape tiny-sd never saw in training: "a purple
heart" gives no heart in 5 images, notebook 18), 5 drawings by scenes.py, 400 steps x batch 4, seed 0; Custom Diffusion's
second concept "<new2>" is the cyan triangle, a held-out pair that tiny-sd draws when asked in words. Each run's
own command is under "command". Judged by judge.py after loading the saved files back through the loaders:
"concept_rate" on 32 images of the concept prompt, "old_prompts" on the 22 colour x shape pairs tiny-sd was
trained on x 2 seeds. "seconds" is the training loop alone, on 1 CPU thread of a 2-core machine shared with
one or two other jobs: indicative only.
"""

WHEN = "2026-12-06"
MACHINE = "CPU, 1 thread (OMP_NUM_THREADS=1), torch 2.13.0+cpu"

COMPARISON = {'steps': 400,
 'batch_size': 4,
 'eval_seeds': 32,
 'threads': 1,
 'old_prompts_before': {'color': 1.0, 'shape': 0.9772727272727273, 'both': 0.9772727272727273},
 'runs': [{'technique': 'Textual Inversion (1 vector)',
           'trained_parameters': 64,
           'seconds': 34.7,
           'steps': 400,
           'file_bytes': 360,
           'files': ['learned_embeds.safetensors'],
           'name': 'ti-1',
           'command': 'OMP_NUM_THREADS=1 python -m minidiff.training textual-inversion --base tiny-sd --out '
                      'runs/compare-heart/ti-1 --overwrite --steps 400 --eval-seeds 0 --lr 5e-2',
           'concept_rate': {'<sks>': {'both': 0.0, 'color': 0.65625, 'shape': 0.0}},
           'old_prompts': {'color': 1.0, 'shape': 0.9772727272727273, 'both': 0.9772727272727273}},
          {'technique': 'Textual Inversion (2 vectors)',
           'trained_parameters': 128,
           'seconds': 36.2,
           'steps': 400,
           'file_bytes': 616,
           'files': ['learned_embeds.safetensors'],
           'name': 'ti-2',
           'command': 'OMP_NUM_THREADS=1 python -m minidiff.training textual-inversion --base tiny-sd --out '
                      'runs/compare-heart/ti-2 --overwrite --steps 400 --eval-seeds 0 --lr 5e-2 --num-vectors 2',
           'concept_rate': {'<sks>': {'both': 0.0, 'color': 0.53125, 'shape': 0.0}},
           'old_prompts': {'color': 1.0, 'shape': 0.9772727272727273, 'both': 0.9772727272727273}},
          {'technique': 'DreamBooth, full UNet, no prior preservation',
           'trained_parameters': 5835012,
           'seconds': 57.0,
           'steps': 400,
           'file_bytes': 23379463,
           'files': ['unet', 'learned_embeds.safetensors'],
           'name': 'db-full',
           'command': 'OMP_NUM_THREADS=1 python -m minidiff.training dreambooth --base tiny-sd --out '
                      'runs/compare-heart/db-full --overwrite --steps 400 --eval-seeds 0 --lr 1e-4',
           'concept_rate': {'<sks>': {'both': 0.84375, 'color': 0.96875, 'shape': 0.84375}},
           'old_prompts': {'color': 1.0, 'shape': 0.6818181818181818, 'both': 0.6818181818181818}},
          {'technique': 'DreamBooth, full UNet, with prior preservation',
           'trained_parameters': 5835012,
           'seconds': 112.1,
           'steps': 400,
           'file_bytes': 23379463,
           'files': ['unet', 'learned_embeds.safetensors'],
           'name': 'db-full-prior',
           'command': 'OMP_NUM_THREADS=1 python -m minidiff.training dreambooth --base tiny-sd --out '
                      'runs/compare-heart/db-full-prior --overwrite --steps 400 --eval-seeds 0 --lr 1e-4 '
                      '--prior-preservation',
           'concept_rate': {'<sks>': {'both': 0.6875, 'color': 1.0, 'shape': 0.6875}},
           'old_prompts': {'color': 0.9090909090909091, 'shape': 0.8863636363636364, 'both': 0.7954545454545454}},
          {'technique': 'DreamBooth, LoRA r=4, no prior preservation',
           'trained_parameters': 43008,
           'seconds': 45.7,
           'steps': 400,
           'file_bytes': 188176,
           'files': ['pytorch_lora_weights.safetensors', 'learned_embeds.safetensors'],
           'name': 'db-lora',
           'command': 'OMP_NUM_THREADS=1 python -m minidiff.training dreambooth --base tiny-sd --out '
                      'runs/compare-heart/db-lora --overwrite --steps 400 --eval-seeds 0 --lr 1e-3 --lora-rank 4',
           'concept_rate': {'<sks>': {'both': 0.21875, 'color': 1.0, 'shape': 0.21875}},
           'old_prompts': {'color': 1.0, 'shape': 0.75, 'both': 0.75}},
          {'technique': 'DreamBooth, LoRA r=4, with prior preservation',
           'trained_parameters': 43008,
           'seconds': 78.8,
           'steps': 400,
           'file_bytes': 188176,
           'files': ['pytorch_lora_weights.safetensors', 'learned_embeds.safetensors'],
           'name': 'db-lora-prior',
           'command': 'OMP_NUM_THREADS=1 python -m minidiff.training dreambooth --base tiny-sd --out '
                      'runs/compare-heart/db-lora-prior --overwrite --steps 400 --eval-seeds 0 --lr 1e-3 '
                      '--lora-rank 4 --prior-preservation',
           'concept_rate': {'<sks>': {'both': 0.0625, 'color': 1.0, 'shape': 0.0625}},
           'old_prompts': {'color': 0.9545454545454546, 'shape': 0.9090909090909091, 'both': 0.8636363636363636}},
          {'technique': 'Custom Diffusion (1 concept)',
           'trained_parameters': 90176,
           'seconds': 35.3,
           'steps': 400,
           'file_bytes': 363032,
           'files': ['pytorch_custom_diffusion_weights.safetensors', '<sks>.safetensors'],
           'name': 'cd',
           'command': 'OMP_NUM_THREADS=1 python -m minidiff.training custom-diffusion --base tiny-sd --out '
                      'runs/compare-heart/cd --overwrite --steps 400 --eval-seeds 0 --lr 3e-3 --concept '
                      "'<sks>:purple:heart'",
           'concept_rate': {'<sks>': {'both': 0.03125, 'color': 1.0, 'shape': 0.03125}},
           'old_prompts': {'color': 0.7727272727272727, 'shape': 0.4318181818181818, 'both': 0.36363636363636365}},
          {'technique': 'Custom Diffusion (2 concepts)',
           'trained_parameters': 90240,
           'seconds': 40.3,
           'steps': 400,
           'file_bytes': 363392,
           'files': ['pytorch_custom_diffusion_weights.safetensors', '<sks>.safetensors', '<new2>.safetensors'],
           'name': 'cd-2',
           'command': 'OMP_NUM_THREADS=1 python -m minidiff.training custom-diffusion --base tiny-sd --out '
                      'runs/compare-heart/cd-2 --overwrite --steps 400 --eval-seeds 0 --lr 3e-3 --concept '
                      "'<sks>:purple:heart' --concept '<new2>:cyan:triangle'",
           'concept_rate': {'<sks>': {'both': 0.125, 'color': 1.0, 'shape': 0.125},
                            '<new2>': {'both': 0.46875, 'color': 0.96875, 'shape': 0.46875}},
           'old_prompts': {'color': 0.9318181818181818, 'shape': 0.5909090909090909, 'both': 0.5454545454545454}}]}
