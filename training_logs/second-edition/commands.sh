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
