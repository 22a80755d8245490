"""The fine-tuning comparison as measured on tiny-sd's second edition (notebook 18 and README.md show it; running
it took 35 minutes on 1 CPU thread of a 2-core machine shared with four other jobs):

    OMP_NUM_THREADS=1 python -m minidiff.training finetune-compare --out runs/compare-v2

Every run: tiny-sd, the concept "<sks>" = purple square (a pair held out of tiny-sd's training, which the second
edition nevertheless draws when asked for "a purple square": 32 of 32 images right), 5 drawings, 400 steps x
batch 4, seed 0; each run's own command is under "command". Judged after loading the saved files back through
the loaders: "concept_rate" on 32 images of the concept prompt, "old_prompts" on the 22 pairs tiny-sd was
trained on x 2 seeds. "seconds" is the training loop alone, on 1 CPU thread of a 2-core machine shared with
four other jobs (training runs and tests): indicative only. A second run of the command (into another folder)
gave every other number identical; its times were 0.5x to 1.7x these.
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
           'seconds': 110.3,
           'steps': 400,
           'file_bytes': 360,
           'files': ['learned_embeds.safetensors'],
           'name': 'ti-1',
           'command': 'OMP_NUM_THREADS=1 python -m minidiff.training textual-inversion --base tiny-sd --out '
                      'runs/compare-v2/ti-1 --overwrite --steps 400 --eval-seeds 0 --lr 5e-2',
           'concept_rate': {'<sks>': {'both': 0.0625, 'color': 1.0, 'shape': 0.0625}},
           'old_prompts': {'color': 1.0, 'shape': 0.9772727272727273, 'both': 0.9772727272727273}},
          {'technique': 'Textual Inversion (2 vectors)',
           'trained_parameters': 128,
           'seconds': 108.5,
           'steps': 400,
           'file_bytes': 616,
           'files': ['learned_embeds.safetensors'],
           'name': 'ti-2',
           'command': 'OMP_NUM_THREADS=1 python -m minidiff.training textual-inversion --base tiny-sd --out '
                      'runs/compare-v2/ti-2 --overwrite --steps 400 --eval-seeds 0 --lr 5e-2 --num-vectors 2',
           'concept_rate': {'<sks>': {'both': 0.03125, 'color': 1.0, 'shape': 0.03125}},
           'old_prompts': {'color': 1.0, 'shape': 0.9772727272727273, 'both': 0.9772727272727273}},
          {'technique': 'DreamBooth, full UNet, no prior preservation',
           'trained_parameters': 5835012,
           'seconds': 111.1,
           'steps': 400,
           'file_bytes': 23379463,
           'files': ['unet', 'learned_embeds.safetensors'],
           'name': 'db-full',
           'command': 'OMP_NUM_THREADS=1 python -m minidiff.training dreambooth --base tiny-sd --out '
                      'runs/compare-v2/db-full --overwrite --steps 400 --eval-seeds 0 --lr 1e-4',
           'concept_rate': {'<sks>': {'both': 0.78125, 'color': 0.9375, 'shape': 0.78125}},
           'old_prompts': {'color': 1.0, 'shape': 0.9318181818181818, 'both': 0.9318181818181818}},
          {'technique': 'DreamBooth, full UNet, with prior preservation',
           'trained_parameters': 5835012,
           'seconds': 293.4,
           'steps': 400,
           'file_bytes': 23379463,
           'files': ['unet', 'learned_embeds.safetensors'],
           'name': 'db-full-prior',
           'command': 'OMP_NUM_THREADS=1 python -m minidiff.training dreambooth --base tiny-sd --out '
                      'runs/compare-v2/db-full-prior --overwrite --steps 400 --eval-seeds 0 --lr 1e-4 '
                      '--prior-preservation',
           'concept_rate': {'<sks>': {'both': 0.21875, 'color': 0.9375, 'shape': 0.21875}},
           'old_prompts': {'color': 0.9772727272727273, 'shape': 0.9318181818181818, 'both': 0.9090909090909091}},
          {'technique': 'DreamBooth, LoRA r=4, no prior preservation',
           'trained_parameters': 43008,
           'seconds': 118.0,
           'steps': 400,
           'file_bytes': 188176,
           'files': ['pytorch_lora_weights.safetensors', 'learned_embeds.safetensors'],
           'name': 'db-lora',
           'command': 'OMP_NUM_THREADS=1 python -m minidiff.training dreambooth --base tiny-sd --out '
                      'runs/compare-v2/db-lora --overwrite --steps 400 --eval-seeds 0 --lr 1e-3 --lora-rank 4',
           'concept_rate': {'<sks>': {'both': 0.25, 'color': 1.0, 'shape': 0.25}},
           'old_prompts': {'color': 0.9545454545454546, 'shape': 0.7272727272727273, 'both': 0.7272727272727273}},
          {'technique': 'DreamBooth, LoRA r=4, with prior preservation',
           'trained_parameters': 43008,
           'seconds': 248.0,
           'steps': 400,
           'file_bytes': 188176,
           'files': ['pytorch_lora_weights.safetensors', 'learned_embeds.safetensors'],
           'name': 'db-lora-prior',
           'command': 'OMP_NUM_THREADS=1 python -m minidiff.training dreambooth --base tiny-sd --out '
                      'runs/compare-v2/db-lora-prior --overwrite --steps 400 --eval-seeds 0 --lr 1e-3 --lora-rank '
                      '4 --prior-preservation',
           'concept_rate': {'<sks>': {'both': 0.0, 'color': 0.84375, 'shape': 0.0}},
           'old_prompts': {'color': 1.0, 'shape': 0.8409090909090909, 'both': 0.8409090909090909}},
          {'technique': 'Custom Diffusion (1 concept)',
           'trained_parameters': 90176,
           'seconds': 130.9,
           'steps': 400,
           'file_bytes': 363032,
           'files': ['pytorch_custom_diffusion_weights.safetensors', '<sks>.safetensors'],
           'name': 'cd',
           'command': 'OMP_NUM_THREADS=1 python -m minidiff.training custom-diffusion --base tiny-sd --out '
                      'runs/compare-v2/cd --overwrite --steps 400 --eval-seeds 0 --lr 3e-3 --concept '
                      "'<sks>:purple:square'",
           'concept_rate': {'<sks>': {'both': 0.0625, 'color': 0.96875, 'shape': 0.0625}},
           'old_prompts': {'color': 0.9090909090909091, 'shape': 0.6363636363636364, 'both': 0.6136363636363636}},
          {'technique': 'Custom Diffusion (2 concepts)',
           'trained_parameters': 90240,
           'seconds': 89.2,
           'steps': 400,
           'file_bytes': 363392,
           'files': ['pytorch_custom_diffusion_weights.safetensors', '<sks>.safetensors', '<new2>.safetensors'],
           'name': 'cd-2',
           'command': 'OMP_NUM_THREADS=1 python -m minidiff.training custom-diffusion --base tiny-sd --out '
                      'runs/compare-v2/cd-2 --overwrite --steps 400 --eval-seeds 0 --lr 3e-3 --concept '
                      "'<sks>:purple:square' --concept '<new2>:cyan:triangle'",
           'concept_rate': {'<sks>': {'both': 0.1875, 'color': 0.96875, 'shape': 0.1875},
                            '<new2>': {'both': 0.78125, 'color': 0.96875, 'shape': 0.8125}},
           'old_prompts': {'color': 0.9090909090909091, 'shape': 0.6363636363636364, 'both': 0.6363636363636364}}]}
