# tiny-sd v2 on the CPU (2 shared cores, niced below the other jobs): the commands as run, in order
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
nice -n 10 python -m minidiff.training vae --data scenes --latent-size 16 --num-images 20000 --out runs/v2/vae \
    --device cpu --batch-size 32 --lr 1e-3 --warmup 100 --kl-weight 1e-5 --steps 3000 --save-every 100 --workers 1
# continue with the same command plus --resume
# stopped at step 1100 (saved state); finished with 150 more steps at a short EMA, so the saved EMA is the trained VAE:
python -m minidiff.training vae --data scenes --latent-size 16 --num-images 20000 --out runs/v2/vae \
    --device cpu --batch-size 32 --lr 1e-3 --warmup 100 --kl-weight 1e-5 --steps 1250 --save-every 50 --workers 2 \
    --ema-decay 0.98 --resume
# tiny-sd v2, UNet + text encoder trained jointly, on the CPU (2 threads), resumable with --resume:
python -m minidiff.training sd --data scenes --vae runs/v2/vae/vae --num-images 20000 --out runs/v2/tiny-sd \
    --device cpu --batch-size 32 --lr 5e-4 --warmup 100 --ema-decay 0.995 --steps 200000 --save-every 200 \
    --max-minutes 35 --workers 2
# tiny-ddpm v2 (session 2026-12-06, CPU, 2 threads, niced): v-prediction, starting from the first edition (eps) weights,
# i.e. minidiff/checkpoints/tiny-ddpm as of commit 044140f (the folder now holds this run's output)
OMP_NUM_THREADS=2 nice -n 5 python -m minidiff.training ddpm --prediction-type v_prediction --init minidiff/checkpoints/tiny-ddpm \
    --out runs/v2/tiny-ddpm --device cpu --batch-size 128 --lr 2e-4 --warmup 100 --ema-decay 0.995 --steps 200000 \
    --num-images 100000 --save-every 200 --max-minutes 50 --workers 1
# VAE, continued (session 2026-12-06): 74 of 80 squares came back as circles (evaluate vae), so the reconstruction
# term switches to LDM's L1; lower learning rate; --max-minutes counts the whole run (62 min before this)
OMP_NUM_THREADS=2 nice -n 10 python -m minidiff.training vae --data scenes --latent-size 16 --num-images 20000 --out runs/v2/vae \
    --device cpu --batch-size 32 --lr 5e-4 --warmup 100 --kl-weight 1e-5 --steps 6000 --save-every 50 --workers 1 \
    --ema-decay 0.99 --rec-loss l1 --max-minutes 150 --resume
# VAE, continued again at the session's end (lowest priority beside CI), same settings; --max-minutes counts the whole run
OMP_NUM_THREADS=1 nice -n 19 python -m minidiff.training vae --data scenes --latent-size 16 --num-images 20000 --out runs/v2/vae \
    --device cpu --batch-size 32 --lr 5e-4 --warmup 100 --kl-weight 1e-5 --steps 20000 --save-every 50 --workers 1 \
    --ema-decay 0.99 --rec-loss l1 --max-minutes 185 --resume
# stopped by hand at 07:22 (the session's end) after step 4,700, its state saved; not yet a vae/ folder
# VAE, run 3 (session 2026-12-06, third): continued from step 4,700 with the same settings, alone on the CPU
# (2 threads); --max-minutes counts the whole run. Stopped at step 7,500 by hand to evaluate it, then resumed:
OMP_NUM_THREADS=2 nice -n 5 python -m minidiff.training vae --data scenes --latent-size 16 --num-images 20000 --out runs/v2/vae \
    --device cpu --batch-size 32 --lr 5e-4 --warmup 100 --kl-weight 1e-5 --steps 20000 --save-every 50 --workers 1 \
    --ema-decay 0.99 --rec-loss l1 --max-minutes 320 --resume
OMP_NUM_THREADS=2 nice -n 5 python -m minidiff.training vae --data scenes --latent-size 16 --num-images 20000 --out runs/v2/vae \
    --device cpu --batch-size 32 --lr 5e-4 --warmup 100 --kl-weight 1e-5 --steps 30000 --save-every 50 --workers 1 \
    --ema-decay 0.99 --rec-loss l1 --max-minutes 299 --resume
# stopped at step 11,985 (--max-minutes 299), then the last ~1,000 steps at a lower learning rate:
OMP_NUM_THREADS=2 nice -n 5 python -m minidiff.training vae --data scenes --latent-size 16 --num-images 20000 --out runs/v2/vae \
    --device cpu --batch-size 32 --lr 2e-4 --warmup 100 --kl-weight 1e-5 --steps 30000 --save-every 50 --workers 1 \
    --ema-decay 0.99 --rec-loss l1 --max-minutes 313 --resume
# -> 12,981 steps in 18,829 s of training in all; vae/ saved with scaling_factor 0.37059
python -m minidiff.training evaluate vae --model runs/v2/vae/vae
# tiny-sd v2 on the frozen run-3 VAE, first leg (the session's last minutes), from run 1's tiny-sd (UNet + text
# encoder, a fresh optimizer and EMA); continue with the same command plus --resume (and a larger --max-minutes)
OMP_NUM_THREADS=2 python -m minidiff.training sd --data scenes --vae runs/v2/vae/vae --init runs/v2/tiny-sd --num-images 20000 \
    --out runs/v2/tiny-sd-l1 --device cpu --batch-size 32 --lr 5e-4 --warmup 100 --ema-decay 0.995 --steps 200000 \
    --save-every 200 --max-minutes 14 --workers 2

# tiny-sd v2, second leg (2026-12-06): the same run continued; --resume takes the weights, optimizer, EMA and
# random state from runs/v2/tiny-sd-l1, so --init goes (the two cannot go together); --max-minutes counts the
# whole run, the first leg's 14 minutes included
OMP_NUM_THREADS=2 python -m minidiff.training sd --data scenes --vae runs/v2/vae/vae --num-images 20000 \
    --out runs/v2/tiny-sd-l1 --device cpu --batch-size 32 --lr 5e-4 --warmup 100 --ema-decay 0.995 --steps 200000 \
    --save-every 200 --max-minutes 128 --workers 2 --resume
# stopped at 11,530 steps (7,680 s); evaluated with the default 4 seeds per prompt, then kept as runs/v2/tiny-sd-final
python -m minidiff.training evaluate scenes --model runs/v2/tiny-sd-l1

# the ControlNet of the later lessons on the second-edition tiny-sd, first leg (--data: picked from --sd: scenes)
OMP_NUM_THREADS=2 python -m minidiff.training controlnet --sd runs/v2/tiny-sd-final --out runs/v2/tiny-controlnet-mask \
    --device cpu --num-images 10000 --batch-size 32 --lr 5e-4 --save-every 100 --max-minutes 20 --workers 2
python -m minidiff.training evaluate-control --model runs/v2/tiny-controlnet-mask --sd runs/v2/tiny-sd-final --num 16

# 2026-12-06, fifth session: the T2I-Adapter on the second-edition tiny-sd, first leg (2 threads; the cores were shared
# with notebook runs, so 2-thread runs stalled: 504 steps in the 15 minutes), then resumed on one thread
OMP_NUM_THREADS=2 python -m minidiff.training adapter --sd runs/v2/tiny-sd-final --out runs/v2/tiny-t2i-adapter-mask \
    --device cpu --num-images 10000 --batch-size 32 --lr 5e-4 --save-every 100 --max-minutes 15 --workers 2
python -m minidiff.training evaluate-control --model runs/v2/tiny-t2i-adapter-mask --sd runs/v2/tiny-sd-final --num 16
OMP_NUM_THREADS=1 python -m minidiff.training adapter --sd runs/v2/tiny-sd-final --out runs/v2/tiny-t2i-adapter-mask \
    --device cpu --num-images 10000 --batch-size 32 --lr 5e-4 --save-every 100 --max-minutes 40 --workers 1 --resume
# InstructPix2Pix and Depth2Image on it were started (one thread each, --max-minutes 35) and stopped by hand after
# 156 and 205 steps (4.5 s per step on the shared cores); their states are kept in runs/v2 for a later --resume
OMP_NUM_THREADS=1 python -m minidiff.training instruct-pix2pix --sd runs/v2/tiny-sd-final --out runs/v2/tiny-instruct-pix2pix \
    --device cpu --num-images 4000 --batch-size 32 --lr 5e-4 --warmup 50 --save-every 100 --max-minutes 35 --workers 1
OMP_NUM_THREADS=1 python -m minidiff.training depth2img --sd runs/v2/tiny-sd-final --out runs/v2/tiny-depth2img \
    --device cpu --num-images 4000 --batch-size 32 --lr 6e-4 --save-every 100 --max-minutes 35 --workers 1
# both resumed (one thread each, still on shared cores) up to 1,000 steps
OMP_NUM_THREADS=1 python -m minidiff.training instruct-pix2pix --sd runs/v2/tiny-sd-final --out runs/v2/tiny-instruct-pix2pix \
    --device cpu --num-images 4000 --batch-size 32 --lr 5e-4 --warmup 50 --save-every 100 --steps 1000 --max-minutes 100 --workers 1 --resume
OMP_NUM_THREADS=1 python -m minidiff.training depth2img --sd runs/v2/tiny-sd-final --out runs/v2/tiny-depth2img \
    --device cpu --num-images 4000 --batch-size 32 --lr 6e-4 --save-every 100 --steps 1000 --max-minutes 100 --workers 1 --resume
