"""`python -m minidiff.training COMMAND ...`: one command per model; `COMMAND --help` lists its options."""

import sys

COMMANDS = {
    "vae": "train tiny-sd's AutoencoderKL",
    "sd": "train tiny-sd's UNet and text encoder on the VAE's latents (needs --vae)",
    "ddpm": "train tiny-ddpm's pixel UNet",
    "controlnet": "train a ControlNet for the frozen tiny-sd on the objects' masks (--data shapes or scenes)",
    "adapter": "train a T2I-Adapter for the frozen tiny-sd on the objects' masks (--data shapes or scenes)",
    "instruct-pix2pix": "fine-tune tiny-sd's UNet with 8 input channels on the scenes' edit pairs (InstructPix2Pix)",
    "depth2img": "fine-tune tiny-sd's UNet with a 5th input channel, the scenes' depth map (Depth2Image)",
    "textual-inversion": "teach tiny-sd (or an SD v1 folder) a new word: only its embedding row(s) learn",
    "dreambooth": "fine-tune the UNet (or LoRA adapters) on a new word, with or without prior preservation",
    "custom-diffusion": "fine-tune cross-attention to_k / to_v plus one new word per concept",
    "finetune-compare": "all fine-tuning techniques on the same data and budget: one table",
    "tokenizer": "write the tiny CLIP tokenizer files (--out FOLDER)",
    "evaluate": "classifier accuracy, or the colour / shape scores of a trained model",
    "evaluate-control": "mask IoU of a ControlNet / T2I-Adapter for tiny-sd, by conditioning scale (--model)",
    "evaluate-edit": "InstructPix2Pix: edits applied / the rest kept; Depth2Image: IoU with the depth (--model)",
}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:10s} {help}" for name, help in COMMANDS.items())
        found = f"found {argv[0]!r}" if argv else "found none"
        sys.exit(f"usage: python -m minidiff.training COMMAND [options]; expected a COMMAND, {found}:\n{lines}")
    command, rest = argv[0], argv[1:]
    if command == "vae":
        from .train_vae import main as run
    elif command == "sd":
        from .train_sd import main as run
    elif command == "ddpm":
        from .train_ddpm import main as run
    elif command == "controlnet":
        from .train_control import main as run
    elif command == "adapter":
        from .train_control import main_adapter as run
    elif command == "instruct-pix2pix":
        from .train_edit import main as run
    elif command == "depth2img":
        from .train_edit import main_depth as run
    elif command == "evaluate-control":
        from .evaluate_control import main as run
    elif command == "evaluate-edit":
        from .evaluate_edit import main as run
    elif command == "textual-inversion":
        from .finetune.textual_inversion import main as run
    elif command == "dreambooth":
        from .finetune.dreambooth import main as run
    elif command == "custom-diffusion":
        from .finetune.custom_diffusion import main as run
    elif command == "finetune-compare":
        from .finetune.compare import main as run
    elif command == "evaluate":
        from .evaluate import main as run
    else:
        from .tokenizer import main as run
    run(rest)


if __name__ == "__main__":
    main()
