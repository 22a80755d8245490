#!/usr/bin/env bash
# Train and evaluate the bundled tiny checkpoints from scratch, as they were made (one GPU, ~8 minutes):
#
#     bash minidiff/training/make_checkpoints.sh runs            # smoke test, train, evaluate
#     bash minidiff/training/make_checkpoints.sh runs train      # or one phase: smoke | train | evaluate
#     INIT=runs bash minidiff/training/make_checkpoints.sh runs2 continue   # run 2: more steps from run 1
#     bash minidiff/training/make_checkpoints.sh runs-v2 v2        # the second edition (scenes, 16x16 latents)
#     bash minidiff/training/make_checkpoints.sh runs-v2 v2-lessons  # then ControlNet, T2I-Adapter, IP2P, Depth2Img on it
#
# tiny-ddpm trains alongside the two tiny-sd stages (VAE, then UNet + text encoder): models this small
# leave most of a GPU idle. Each stage stops at --max-minutes and saves the EMA of its weights. A second
# tiny-sd whose text encoder stays random (--freeze-text-encoder) trains beside the first, to compare:
# the bundled tiny-sd is runs/tiny-sd-frozen (it scored better), the bundled tiny-ddpm runs2/tiny-ddpm-2.
# On a CPU: DEVICE=cpu, no bf16 speed-up, and expect hours for the same number of steps.
set -u
RUNS=${1:-runs}
PHASE=${2:-all}
mkdir -p "$RUNS"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
N=${NUM_IMAGES:-100000}          # size of the shapes data set
DEVICE=${DEVICE:-cuda}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
train() { $PY -m minidiff.training "$@" --bf16 --device "$DEVICE"; }

if [ "$PHASE" = smoke ] || [ "$PHASE" = all ]; then
    stamp "smoke test: 3 steps of each loop"
    S="$RUNS/smoke"
    fail() { stamp "smoke test failed"; tail -30 "$S.log"; exit 1; }
    # --overwrite: the smoke runs are throwaway, and a second call of this script replaces them
    train vae --out "$S/vae" --steps 3 --num-images 256 --overwrite > "$S.log" 2>&1 || fail
    train ddpm --out "$S/ddpm" --steps 3 --num-images 256 --overwrite >> "$S.log" 2>&1 &
    train sd --vae "$S/vae/vae" --out "$S/sd" --steps 3 --num-images 256 --overwrite >> "$S.log" 2>&1 || fail
    wait $! || fail
    stamp "smoke test passed"
fi

if [ "$PHASE" = train ] || [ "$PHASE" = all ]; then
    stamp "tiny-ddpm: start (in the background)"
    train ddpm --out "$RUNS/tiny-ddpm" --steps 100000 --batch-size 128 --lr 3e-4 --num-images "$N" \
        --max-minutes "${DDPM_MINUTES:-6}" --workers 5 > "$RUNS/ddpm.log" 2>&1 &
    DDPM=$!
    stamp "vae: start"
    train vae --out "$RUNS/vae" --steps 100000 --batch-size 64 --lr 5e-4 --kl-weight 1e-5 --num-images "$N" \
        --max-minutes "${VAE_MINUTES:-2.5}" --workers 10 > "$RUNS/vae.log" 2>&1 || stamp "vae failed"
    stamp "tiny-sd (text encoder trained) and tiny-sd-frozen (text encoder random): start"
    for variant in tiny-sd tiny-sd-frozen; do
        train sd --vae "$RUNS/vae/vae" --out "$RUNS/$variant" --steps 100000 --batch-size 256 --lr 3e-4 \
            --num-images "$N" --max-minutes "${SD_MINUTES:-3.25}" --workers 5 \
            $([ $variant = tiny-sd-frozen ] && echo --freeze-text-encoder) > "$RUNS/$variant.log" 2>&1 &
    done
    wait
    stamp "training done"
    for log in vae ddpm tiny-sd tiny-sd-frozen; do tail -c 300 "$RUNS/$log.log" | tr '\r' '\n' | tail -2; done
fi

if [ "$PHASE" = continue ]; then
    # Run 2 of the bundled checkpoints: more steps from run 1's weights ($INIT/tiny-ddpm, $INIT/tiny-sd-frozen),
    # each model alone on the GPU with larger batches (run 1's speed was bound by per-step overhead).
    INIT=${INIT:-$RUNS}
    stamp "continue tiny-ddpm and tiny-sd-frozen from $INIT"
    train ddpm --init "$INIT/tiny-ddpm" --out "$RUNS/tiny-ddpm-2" --steps 100000 --batch-size 512 --lr 3e-4 \
        --warmup 100 --num-images "$N" --max-minutes "${DDPM_MINUTES:-2}" --workers 8 > "$RUNS/ddpm-2.log" 2>&1 &
    train sd --init "$INIT/tiny-sd-frozen" --vae "$INIT/tiny-sd/vae" --out "$RUNS/tiny-sd-frozen-2" --steps 100000 \
        --batch-size 1024 --lr 3e-4 --warmup 100 --num-images "$N" --max-minutes "${SD_MINUTES:-2}" --workers 8 \
        --freeze-text-encoder > "$RUNS/tiny-sd-frozen-2.log" 2>&1 &
    wait
    stamp "training done"
    for log in ddpm-2 tiny-sd-frozen-2; do tail -c 300 "$RUNS/$log.log" | tr '\r' '\n' | tail -2; done
fi

if [ "$PHASE" = v2 ]; then
    # The second edition (issue: the tiny world, second edition): scenes data, a factor-4 VAE (16x16 latents), the
    # 16x16 UNet with a jointly trained text encoder. Every stage can be continued with RESUME=--resume (same
    # command, same --out), on a GPU or on a CPU (DEVICE=cpu, no --bf16 gain).
    #   VAE=folder    skip the VAE stage and train tiny-sd on this AutoencoderKL (e.g. one trained on a CPU)
    #   INIT_SD=dir   start tiny-sd from this pipeline folder's UNet and text encoder (--init)
    #   DDPM=1        also train tiny-ddpm from scratch on v (the bundled one continued the first edition on v:
    #                 run 3 of its card, on a CPU, 1,842 x 128 steps; this line has not been run yet)
    RESUME=${RESUME:-}
    if [ -z "${VAE:-}" ]; then
        stamp "v2 vae (L1 reconstruction: squared error rounds the squares' corners, see training_logs/second-edition)"
        train vae --data scenes --latent-size 16 --out "$RUNS/vae" --steps 100000 --batch-size 64 --lr 5e-4 \
            --kl-weight 1e-5 --rec-loss l1 --num-images "$N" --max-minutes "${VAE_MINUTES:-4}" --workers 8 $RESUME \
            > "$RUNS/vae.log" 2>&1 || { stamp "vae failed"; exit 1; }
        VAE="$RUNS/vae/vae"
    fi
    $PY -m minidiff.training evaluate vae --model "$VAE" 2>&1 | tee "$RUNS/vae-evaluation.txt"
    stamp "v2 tiny-sd on $VAE"
    train sd --data scenes --vae "$VAE" --out "$RUNS/tiny-sd" --steps 200000 --batch-size 256 --lr 3e-4 \
        --num-images "$N" --max-minutes "${SD_MINUTES:-20}" --workers 8 ${INIT_SD:+--init "$INIT_SD"} $RESUME \
        > "$RUNS/tiny-sd.log" 2>&1 &
    if [ "${DDPM:-0}" = 1 ]; then
        train ddpm --prediction-type v_prediction --out "$RUNS/tiny-ddpm" --steps 200000 --batch-size 256 --lr 3e-4 \
            --num-images "$N" --max-minutes "${DDPM_MINUTES:-20}" --workers 4 $RESUME > "$RUNS/ddpm.log" 2>&1 &
    fi
    wait
    stamp "v2 evaluate"
    $PY -m minidiff.training evaluate scenes --model "$RUNS/tiny-sd" --device "$DEVICE" 2>&1 | grep -v "Loading weights" \
        | tee "$RUNS/tiny-sd-evaluation.txt"
    if [ "${DDPM:-0}" = 1 ]; then
        $PY -m minidiff.training evaluate ddpm --model "$RUNS/tiny-ddpm" --device "$DEVICE" --images 64 --steps 50 \
            --sampler all --grid "$RUNS/tiny-ddpm-samples.png"
    fi
    stamp "v2 done"
fi

if [ "$PHASE" = v2-lessons ]; then
    # The later lessons' networks for the second-edition tiny-sd (SD=folder, default $RUNS/tiny-sd): a ControlNet and
    # a T2I-Adapter on the scenes' object masks (tiny-sd frozen; the condition shrunk by the VAE's factor 4), then
    # InstructPix2Pix and Depth2Image (tiny-sd's UNet widened). Two at a time; a run that fails is reported and
    # not evaluated; each evaluation is written beside its run. RESUME=--resume continues them.
    # Not run yet as one phase: the bundled ones were trained on a CPU, leg by leg (their cards and
    # training_logs/second-edition/commands.sh).
    SD=${SD:-$RUNS/tiny-sd}
    RESUME=${RESUME:-}
    finished() { wait "$1" && return 0; stamp "$2 failed: see $RUNS/$2.log"; tail -5 "$RUNS/$2.log"; return 1; }
    stamp "v2 ControlNet and T2I-Adapter for $SD"
    train controlnet --sd "$SD" --data scenes --out "$RUNS/tiny-controlnet-mask" --num-images 20000 --batch-size 64 \
        --lr 5e-4 --max-minutes "${CONTROL_MINUTES:-6}" --workers 4 $RESUME > "$RUNS/tiny-controlnet-mask.log" 2>&1 &
    CONTROLNET=$!
    train adapter --sd "$SD" --data scenes --out "$RUNS/tiny-t2i-adapter-mask" --num-images 20000 --batch-size 64 \
        --lr 5e-4 --max-minutes "${CONTROL_MINUTES:-6}" --workers 4 $RESUME > "$RUNS/tiny-t2i-adapter-mask.log" 2>&1 &
    ADAPTER=$!
    OK=()
    finished $CONTROLNET tiny-controlnet-mask && OK+=(tiny-controlnet-mask)
    finished $ADAPTER tiny-t2i-adapter-mask && OK+=(tiny-t2i-adapter-mask)
    stamp "v2 InstructPix2Pix and Depth2Image from $SD"
    train instruct-pix2pix --sd "$SD" --out "$RUNS/tiny-instruct-pix2pix" --num-images 4000 --batch-size 64 --lr 5e-4 \
        --warmup 50 --max-minutes "${EDIT_MINUTES:-6}" $RESUME > "$RUNS/tiny-instruct-pix2pix.log" 2>&1 &
    IP2P=$!
    train depth2img --sd "$SD" --out "$RUNS/tiny-depth2img" --num-images 4000 --batch-size 64 --lr 6e-4 \
        --max-minutes "${EDIT_MINUTES:-6}" $RESUME > "$RUNS/tiny-depth2img.log" 2>&1 &
    DEPTH=$!
    finished $IP2P tiny-instruct-pix2pix && OK+=(tiny-instruct-pix2pix)
    finished $DEPTH tiny-depth2img && OK+=(tiny-depth2img)
    stamp "v2 evaluate: ${OK[*]:-nothing}"
    for name in ${OK[@]+"${OK[@]}"}; do
        case $name in
            tiny-controlnet-mask|tiny-t2i-adapter-mask) what=evaluate-control ;;
            *) what=evaluate-edit ;;
        esac
        $PY -m minidiff.training $what --model "$RUNS/$name" --sd "$SD" > "$RUNS/$name-evaluation.txt" 2>&1 \
            || stamp "$what $name failed"
        grep -v "Loading weights" "$RUNS/$name-evaluation.txt"
    done
    stamp "v2 lessons done"
fi

if [ "$PHASE" = evaluate ] || [ "$PHASE" = all ]; then
    for model in tiny-sd tiny-sd-frozen; do
        stamp "evaluate $model"
        $PY -m minidiff.training evaluate sd --model "$RUNS/$model" --device "$DEVICE" --images "${SD_EVAL_IMAGES:-4}" \
            --grid "$RUNS/$model-samples.png" 2>&1 | grep -v "Loading weights"
    done
    stamp "evaluate tiny-ddpm"
    $PY -m minidiff.training evaluate ddpm --model "$RUNS/tiny-ddpm" --device "$DEVICE" \
        --images "${DDPM_EVAL_IMAGES:-64}" --steps "${DDPM_EVAL_STEPS:-1000}" --grid "$RUNS/tiny-ddpm-samples.png"
    stamp "evaluation done"
fi
